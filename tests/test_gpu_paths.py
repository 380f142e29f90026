"""The paths a GPU user runs (bf16 autocast, true fp32, serialised downloads), exercised on a CPU."""
import os, threading, time

import pytest
import torch
import torch.nn.functional as F

import common

CPU = torch.device("cpu")


def test_attention_fp32_stays_fp32_under_bf16_autocast(monkeypatch):
    """autocast would cast q, k, v straight back to bf16 inside scaled_dot_product_attention: fp32=True must not."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 32, generator=g) for _ in range(3))
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 32 ** 0.5, -1) @ v.double()
    with common.autocast(CPU):
        fp32 = common.attention(q, k, v, fp32=True)
        bf16 = common.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert fp32.dtype == torch.float32
    assert (fp32.double() - exact).abs().max() < 1e-5
    assert (bf16.double() - exact).abs().max() > 1e-3  # what plain bf16 gives: the switch is what is measured


def test_cpu_bf16_switch_turns_autocast_on(monkeypatch):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    monkeypatch.delenv("REPDIFF_CPU_BF16", raising=False)
    with common.autocast(CPU):
        assert lin(x).dtype == torch.float32  # a CPU runs fp32 by default
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    with common.autocast(CPU):
        assert lin(x).dtype == torch.bfloat16
        with common.autocast(CPU, enabled=False):  # a region that promises fp32 stays fp32 inside a bf16 one
            assert lin(x).dtype == torch.float32


def test_fp32_regions_turn_tf32_off_and_put_it_back():
    """setup_dist turns TF32 on for a GPU run; where a file promises fp32 (enabled=False) it is off inside."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with common.autocast(CPU, enabled=False):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_blur_radius_comes_from_the_bound_not_the_tensor():
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 1.0])
    with pytest.raises(ValueError):
        common.gaussian_blur(x, sigma)  # reading sigma.max() would sync a GPU and break a compiled graph
    a = common.gaussian_blur(x, sigma, 1.0)
    b = common.gaussian_blur(x[1:], 1.0)
    torch.testing.assert_close(a[1:], b)


def test_dataset_download_is_serialised(tmp_path, monkeypatch):
    """Processes (here threads with their own lock handles) take turns on torchvision's download into ./data."""
    from torchvision import datasets
    inside, overlaps = [0], []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.2)
            inside[0] -= 1
            self.data, self.targets = torch.zeros(4, 32, 32, 3, dtype=torch.uint8).numpy(), [0, 1, 2, 3]

    monkeypatch.setattr(datasets, "CIFAR10", FakeCIFAR10)
    common.load_images.cache_clear()
    root = str(tmp_path / "data")
    threads = [threading.Thread(target=common.load_images.__wrapped__, args=("cifar10", s, 32, root))
               for s in ("train", "test")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1]
    assert os.path.isfile(os.path.join(root, ".cifar10.lock"))


# Each file's `default` preset (the full-size model) under bf16 autocast on a CPU, 2 steps at batch 2 on `shapes`, then
# sample and eval: the GPU user's first commands, in seconds to a minute each. Frozen encoders are random-vit-b@224
# (DINOv2-B's compute, no download).
SMALL = ["--data", "shapes:8", "--batch-size", 2, "--steps", 2, "--device", "cpu"]
ENC = ["--encoder", "random-vit-b@224"]


def default_preset_commands(name, d):
    """-> the commands (file, argv) of one file's default preset, run folder d."""
    sample = lambda run, *extra: ["sample", "--ckpt", d / run / "ckpt.pt", "--n", 2, "--batch", 2, "--sample-steps", 2,
                                  "--device", "cpu", *extra, "--out", d / f"{run}.npz"]
    ev = lambda run, *extra: ["eval", "--ckpt", d / run / "ckpt.pt", "--n", 2, "--batch", 2, "--sample-steps", 2,
                              "--device", "cpu", *extra]
    train = lambda cmd, run, *extra: [cmd, "--preset", "default", *SMALL, *extra, "--out", d / run]
    if name == "rae":
        return [train("train-decoder", "dec", *ENC), train("train", "gen", "--decoder", d / "dec" / "ckpt.pt"),
                sample("gen"), ev("gen")]
    if name == "rcg":
        rdm = ["--rdm", d / "rdm" / "ckpt.pt", "--rdm-steps", 2]
        return [train("train-rdm", "rdm", *ENC), train("train", "gen", *ENC), sample("gen", *rdm), ev("gen", *rdm)]
    if name == "decoupled_latent":
        return [train("train", "ae"), train("train-gen", "gen", "--ae", d / "ae" / "ckpt.pt"), sample("gen"), ev("gen")]
    return [train("train", "run", *(ENC if name == "repa" else [])), sample("run"), ev("run")]


@pytest.mark.parametrize("name", ["jit_xpred", "consistency", "repa", "soda", "rae", "rcg", "decoupled_latent"])
def test_default_preset_runs_in_bf16_on_a_cpu(name, cli, tmp_path, monkeypatch):
    import importlib
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    real = common.probe_data  # eval's code path at 8 / 8 probe images: the full-size model in bf16 is slow on a CPU
    monkeypatch.setattr(common, "probe_data", lambda spec, size, n_train=10_000, n_test=5_000:
                        real(spec, size, min(n_train, 8), min(n_test, 8)))
    module = importlib.import_module(name)
    for argv in default_preset_commands(name, tmp_path):
        assert cli(module, argv) == 0, argv
    assert (tmp_path / "gen.npz").exists() or (tmp_path / "run.npz").exists()


# --compile: each file's tiny-preset step compiled (the aot_eager backend: TorchDynamo's graph capture and AOT autograd
# as on a GPU, without generating kernels), with the number of graph breaks pinned (0: one graph per step).
GRAPH_BREAKS = {"jit_xpred": 0, "consistency": 0, "repa": 0, "soda": 0, "rae": 0, "rcg": 0, "decoupled_latent": 0}


@pytest.mark.parametrize("name", sorted(GRAPH_BREAKS))
def test_compiled_step_runs_and_its_graph_breaks_are_pinned(name, cli, tmp_path, monkeypatch):
    import importlib
    from torch._dynamo.utils import counters
    module, compile = importlib.import_module(name), torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **k: compile(model, backend="aot_eager", **k))
    tiny = ["--preset", "tiny", "--steps", 2, "--device", "cpu"]
    cmd, extra = "train", []
    if name == "rae":  # stage 2, on a stage-1 decoder trained without compile
        assert cli(module, ["train-decoder", *tiny, "--out", tmp_path / "dec"]) == 0
        extra = ["--decoder", tmp_path / "dec" / "ckpt.pt"]
    torch._dynamo.reset()
    counters.clear()
    assert cli(module, [cmd, *tiny, *extra, "--compile", "--out", tmp_path / "run"]) == 0
    assert sum(counters["graph_break"].values()) == GRAPH_BREAKS[name], dict(counters["graph_break"])
