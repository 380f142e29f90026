import json, math, os

import numpy as np
import pytest
import torch

import repa as R

TINY = ["--preset", "tiny", "--device", "cpu"]


def test_projector_shapes():
    h = R.projector(64, 2048, 384)
    assert [type(m).__name__ for m in h] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert h(torch.randn(2, 16, 64)).shape == (2, 16, 384)  # every token


def test_align_loss_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, N=2, D=2]
    assert R.align_loss(a, 3 * a).item() == pytest.approx(-1.0)  # same directions, any scale
    assert R.align_loss(a, -a).item() == pytest.approx(1.0)
    assert R.align_loss(a, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])).item() == pytest.approx(0.0)  # orthogonal
    # one token aligned (cos 1), one at 60 degrees (cos 0.5): mean -0.75
    b = torch.tensor([[[1.0, 0.0], [math.sin(math.pi / 3), 0.5]]])
    assert R.align_loss(a, b).item() == pytest.approx(-0.75)


def test_to_grid_interpolation():
    z = torch.randn(2, 16, 5)
    assert torch.equal(R.to_grid(z, 4), z)
    # a 2x2 grid whose value is its column index, to 4x4 (bilinear, half-pixel centres): columns 0, .25, .75, 1
    cols = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1)  # row-major tokens (r0c0, r0c1, r1c0, r1c1)
    out = R.to_grid(cols, 4).view(4, 4)  # [rows, cols]
    assert torch.allclose(out, torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4))


def test_proj_coeff_zero_is_exactly_the_baseline():
    cfg = R.Config(**R.PRESETS["tiny"])
    aligned = R.REPA(cfg, enc_dim=384)
    base = R.REPA(R.Config(**dict(R.PRESETS["tiny"], proj_coeff=0.0)))
    base.net.load_state_dict(aligned.net.state_dict())
    assert base.proj is None
    x, y, z = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.randn(4, 4, 384)
    torch.manual_seed(0); loss_a = aligned(x, y, z)
    torch.manual_seed(0); loss_b = base(x, y)
    assert torch.equal(loss_b, aligned.last["loss_v"])
    assert torch.allclose(loss_a, loss_b + 0.5 * aligned.last["loss_align"])
    assert -1 <= aligned.last["loss_align"].item() <= 1


def _gaussian_velocity(mu, sigma):
    """The exact v(x, t) = E[e | x_t] - E[x | x_t] for data N(mu, sigma^2) under x_t = (1 - t) x + t e: linear in x."""
    def v(x, t):
        m, s2 = (1 - t) * mu, (1 - t) ** 2 * sigma ** 2 + t ** 2
        return (t - (1 - t) * sigma ** 2) / s2 * (x - m) - mu
    return v


def test_samplers_integrate_a_known_velocity_field():
    mu, sigma = 0.5, 0.2
    z = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {n: (R.sample_ode(_gaussian_velocity(mu, sigma), z.clone(), n) - (mu + sigma * z)).abs().max().item()
           for n in (50, 200)}  # the exact flow map of a Gaussian is affine: x_0 = mu + sigma z
    assert err[50] < 5e-3 and err[200] < err[50] / 8, err  # and Heun converges at second order (16x for 4x steps)
    x = R.sample_sde(_gaussian_velocity(mu, sigma), z.clone(), 250, torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - mu) < 0.01 and abs(x.std().item() - sigma) < 0.01


def test_train_resume_sample_eval(cli, logged_losses, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(R, ["train", *TINY, "--steps", 10, "--out", a]) == 0
    assert cli(R, ["train", *TINY, "--steps", 5, "--out", b]) == 0
    assert cli(R, ["train", *TINY, "--steps", 10, "--out", b, "--resume"]) == 0
    assert logged_losses(b) == logged_losses(a)
    row = json.loads(open(a / "log.jsonl").readline())
    assert row["loss"] == pytest.approx(row["loss_v"] + 0.5 * row["loss_align"], rel=1e-5)
    for sampler in ("ode", "sde"):
        assert cli(R, ["sample", "--ckpt", b / "ckpt.pt", "--n", 6, "--sampler", sampler, "--out", tmp_path / "s.npz"]) == 0
        arr = np.load(tmp_path / "s.npz")["arr_0"]
        assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert cli(R, ["eval", "--ckpt", b / "ckpt.pt", "--n", 32]) == 0
    res = json.load(open(b / "eval.json"))
    assert res["step"] == 10 and res["fd"] > 0 and res["encoder"] == "random-vit-s@28"
    assert 0 <= res["probe_linear"] <= 1 and 0 <= res["encoder_probe_linear"] <= 1


def test_baseline_run_and_bad_inputs(cli, tmp_path, capsys):
    assert cli(R, ["train", *TINY, "--steps", 3, "--proj-coeff", 0, "--out", tmp_path / "sit"]) == 0
    assert "loss_align" not in json.loads(open(tmp_path / "sit" / "log.jsonl").readline())
    assert cli(R, ["train", *TINY, "--encoder", "resnet50", "--out", tmp_path / "x"]) == 2
    assert "unknown --encoder" in capsys.readouterr().err
    assert cli(R, ["train", *TINY, "--image-size", 18, "--out", tmp_path / "y"]) == 2
