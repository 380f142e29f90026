"""The paths a GPU user runs (bf16 autocast, true fp32, serialised downloads), exercised on a
CPU."""

import importlib
import os
import threading
import time

import numpy as np
import pytest
import torch
from conftest import pipeline, read_losses

import common

CPU = torch.device("cpu")


def test_attention_fp32_stays_fp32_under_bf16_autocast(monkeypatch):
    """autocast would cast q, k, v straight back to bf16 inside scaled_dot_product_attention:
    fp32=True must not."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 32, generator=g) for _ in range(3))
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 32**0.5, -1) @ v.double()
    with common.autocast(CPU):
        fp32 = common.attention(q, k, v, fp32=True)
        bf16 = common.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert fp32.dtype == torch.float32
    assert (fp32.double() - exact).abs().max() < 1e-5
    # what plain bf16 gives: the switch is what is measured
    assert (bf16.double() - exact).abs().max() > 1e-3


def test_cpu_bf16_switch_turns_autocast_on(monkeypatch):
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    monkeypatch.delenv("REPDIFF_CPU_BF16", raising=False)
    with common.autocast(CPU):
        assert lin(x).dtype == torch.float32  # a CPU runs fp32 by default
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    with common.autocast(CPU):
        assert lin(x).dtype == torch.bfloat16
        # a region that promises fp32 stays fp32 inside a bf16 one
        with common.autocast(CPU, enabled=False):
            assert lin(x).dtype == torch.float32


def test_fp32_regions_turn_tf32_off_and_put_it_back():
    """setup_dist turns TF32 on for a GPU run; where a file promises fp32 (enabled=False) it is off
    inside."""
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
        # reading sigma.max() would sync a GPU and break a compiled graph
        common.gaussian_blur(x, sigma)
    a = common.gaussian_blur(x, sigma, 1.0)
    b = common.gaussian_blur(x[1:], 1.0)
    torch.testing.assert_close(a[1:], b)


def test_dataset_download_is_serialised(tmp_path, monkeypatch):
    """Processes (here threads with their own lock handles) take turns on torchvision's download
    into ./data."""
    from torchvision import datasets

    inside, overlaps = [0], []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.2)
            inside[0] -= 1
            self.data, self.targets = (
                torch.zeros(4, 32, 32, 3, dtype=torch.uint8).numpy(),
                [0, 1, 2, 3],
            )

    monkeypatch.setattr(datasets, "CIFAR10", FakeCIFAR10)
    common.load_images.cache_clear()
    root = str(tmp_path / "data")
    threads = [
        threading.Thread(target=common.load_images.__wrapped__, args=("cifar10", s, 32, root))
        for s in ("train", "test")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1]
    assert os.path.isfile(os.path.join(root, ".cifar10.lock"))


# Each file's `default` preset: the full-size networks a GPU user's first commands build, one
# training step at batch 2 on `shapes`, then `sample`. The frozen encoder is random-vit-b@56:
# DINOv2-B's width and depth (no download) at 16 of its 256 tokens at 224 px, which the generators'
# shapes follow. In fp32: a CPU without bf16 units runs bf16 matmuls about 16 times slower than fp32
# ones (minutes a file at full size), and the bf16 path does not depend on the size
# (test_gpu_path_on_the_tiny_preset runs it, and eval).
FULL = ["--preset", "default", "--data", "shapes:8", "--batch-size", 2, "--steps", 1]
# no warm-up and a large lr: the first step moves the zero-initialised output layers, so a sample
# has structure
FULL += ["--device", "cpu", "--set", "log_every=1", "--set", "warmup=0", "--lr", 1e-3]
ENC = ["--encoder", "random-vit-b@56"]
FILES = ["jit_xpred", "consistency", "repa", "soda", "rae", "rcg", "decoupled_latent"]


def pipeline_commands(name, preset_argv, folder):
    """-> the argv of one file's first stage (or None), train, sample and eval (conftest.pipeline);
    the run is folder / "run". The default presets of the files with a frozen encoder read
    random-vit-b@56."""
    module = importlib.import_module(name)
    encoder = ENC if name in ("repa", "rae", "rcg") and "default" in preset_argv else []
    first_stage, train, extra = pipeline(module, [*preset_argv, *encoder], folder / "first")
    run = folder / "run"
    if name != "rae":  # rae.py's train reads the encoder of its --decoder run
        train = [*train, *encoder]
    train = [*train, *preset_argv, "--out", run]
    read = ["--n", 2, "--batch", 2, "--sample-steps", 2, "--device", "cpu", *extra]
    if name == "rcg":
        read += ["--rdm-steps", 2]
    sample = ["sample", "--ckpt", run / "ckpt.pt", *read, "--out", folder / "samples.npz"]
    evaluate = ["eval", "--ckpt", run / "ckpt.pt", *read]
    return first_stage, train, sample, evaluate


def sampled_images(folder):
    """-> the images `sample` wrote, float64 [N, H, W, 3]."""
    return np.load(folder / "samples.npz")["arr_0"].astype(np.float64)


def assert_images_have_structure(images):
    """Each image is not one flat value, and the two are not one image twice."""
    assert images.shape[0] == 2 and all(im.std() > 0 for im in images)
    assert images[0].tolist() != images[1].tolist()


@pytest.mark.parametrize("name", FILES)
def test_default_preset_trains_and_samples_on_a_cpu(name, cli, tmp_path):
    module = importlib.import_module(name)
    first_stage, train, sample, _ = pipeline_commands(name, FULL, tmp_path)
    for argv in [first_stage, train, sample]:
        assert argv is None or cli(module, argv) == 0, argv
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 1 and np.isfinite(losses[0]), losses
    assert_images_have_structure(sampled_images(tmp_path))


# The GPU path on each file's tiny preset: bf16 autocast (REPDIFF_CPU_BF16 turns it on on a CPU) in
# every command, and `train --compile` with the aot_eager backend (TorchDynamo's graph capture and
# AOT autograd as on a GPU, without generating kernels) with its graph breaks pinned (0: one graph
# per step).
GRAPH_BREAKS = {
    "jit_xpred": 0,
    "consistency": 0,
    "repa": 0,
    "soda": 0,
    "rae": 0,
    "rcg": 0,
    "decoupled_latent": 0,
}


@pytest.mark.parametrize("name", FILES)
def test_gpu_path_on_the_tiny_preset(name, cli, tmp_path, monkeypatch, few_probe_images):
    import json

    from torch._dynamo.utils import counters

    module, compile = importlib.import_module(name), torch.compile

    def aot_eager(model, **kwargs):
        return compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)
    few_probe_images(8, 8)
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    tiny = ["--preset", "tiny", "--data", "shapes:64", "--steps", 2, "--device", "cpu"]
    tiny += ["--set", "log_every=1", "--set", "warmup=0", "--lr", 1e-3]
    first_stage, train, sample, evaluate = pipeline_commands(name, tiny, tmp_path)
    assert first_stage is None or cli(module, first_stage) == 0, first_stage
    torch._dynamo.reset()
    counters.clear()
    assert cli(module, [*train, "--compile"]) == 0
    assert sum(counters["graph_break"].values()) == GRAPH_BREAKS[name], dict(
        counters["graph_break"]
    )
    assert cli(module, sample) == 0
    assert cli(module, evaluate) == 0
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert_images_have_structure(sampled_images(tmp_path))
    assert json.load(open(tmp_path / "run" / "eval.json"))["n_samples"] == 2
