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
