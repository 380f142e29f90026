import json, math, os

import numpy as np
import pytest
import torch

import common
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


def test_precomputed_latents(cli, tmp_path):
    """--latents: the SiT models the float `latents` of an .npz while the encoder reads the same rows' images."""
    import torch.nn.functional as F
    images, labels = common._shapes("train", 16, 200)
    x = torch.from_numpy(images).float() / 127.5 - 1
    pooled = F.avg_pool2d(x, 2)  # a stand-in for a VAE: [N,3,16,16] -> [N,3,8,8], plus a fourth channel
    latents = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1).numpy()  # [N,4,8,8]
    path = tmp_path / "lat.npz"
    np.savez(path, arr_0=images.transpose(0, 2, 3, 1), labels=labels, latents=latents)
    # the batches of latents and of images are the same rows (flips included)
    lat_b, y_l = common.batch(torch.from_numpy(latents), torch.from_numpy(labels), 8, 0, 3, flip=True)
    img_b, y_i = common.batch(torch.from_numpy(images), torch.from_numpy(labels), 8, 0, 3, flip=True)
    assert torch.equal(y_l, y_i) and torch.allclose(lat_b[:, :3], F.avg_pool2d(img_b, 2), atol=1e-5)
    run = tmp_path / "run"
    assert cli(R, ["train", *TINY, "--data", path, "--latents", "--steps", 3, "--out", run]) == 0
    sd = torch.load(run / "ckpt.pt", weights_only=True)
    assert sd["config"]["channels"] == 4 and sd["config"]["image_size"] == 8
    assert sd["model"]["net.patch_embed.weight"].shape[1] == 4
    assert cli(R, ["sample", "--ckpt", run / "ckpt.pt", "--n", 5, "--out", tmp_path / "new" / "s.npz"]) == 0
    assert np.load(tmp_path / "new" / "s.npz")["latents"].shape == (5, 4, 8, 8)
    assert cli(R, ["eval", "--ckpt", run / "ckpt.pt"]) == 0
    res = json.load(open(run / "eval.json"))
    assert res["fd"] is None and 0 <= res["probe_linear"] <= 1 and 0 <= res["encoder_probe_linear"] <= 1
    assert cli(R, ["train", *TINY, "--latents", "--out", tmp_path / "bad"]) == 2  # shapes has no latents
