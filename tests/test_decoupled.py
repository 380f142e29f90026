import json, math

import numpy as np
import pytest
import torch

import common
import decoupled_latent as DL

TINY = ["--preset", "tiny", "--device", "cpu"]


def _model(**kw):
    torch.manual_seed(0)
    return DL.DecoupledAE(DL.Config(**dict(DL.PRESETS["tiny"], **kw)))


def test_split_sizes():
    m = _model(split=[16, 32, 48])  # 16 tokens: z_s 2 and z_d 3 channels a token
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z_u, tokens = m.encode(x)
    assert z_u.shape == (3, 16) and tokens.shape == (3, 16, 5)
    parts = m.parts(z_u, tokens)
    assert {k: v.shape[1] for k, v in parts.items()} == dict(z_u=16, z_s=32, z_d=48, z_us=48, all=96)
    assert torch.equal(parts["z_d"], tokens[..., 2:].flatten(1)) and torch.equal(parts["all"][:, :16], z_u)
    with pytest.raises(common.UsageError, match="divide"):
        _model(split=[16, 15, 16])


def test_dropping_z_d_zeroes_only_z_d():
    m = _model()
    seen = []
    m.decoder.register_forward_pre_hook(lambda mod, a: seen.append([t.clone() for t in a]))
    z_u, tokens = torch.randn(2, 16), torch.randn(2, 16, 2)  # split 16/16/16: one z_s and one z_d channel a token
    m.decode(z_u, tokens, torch.tensor([True, False]))
    (u, tok), = seen
    assert torch.equal(u, z_u) and torch.equal(tok[0], tokens[0])  # kept: unchanged
    assert torch.equal(tok[1, :, 0], tokens[1, :, 0]) and (tok[1, :, 1] == 0).all()  # dropped: z_d is 0, z_s kept


def test_reconstruction_does_not_reach_z_u():
    """detach_u: the decoder reads z_u, but L_rec sends E_u no gradient; without it (or in the control) it does."""
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    for kw, reaches in ((dict(), False), (dict(detach_u=False), True), (dict(decouple=False), True)):
        m = _model(sem_coeff=0.0, drop_d=0.0, **kw)
        m(x).backward()
        g = sum(p.grad.abs().sum() for p in m.enc_u.parameters() if p.grad is not None)
        assert (g > 0) == reaches, kw
        assert m.decoder.embed_u.weight.grad.abs().sum() > 0  # the decoder does use z_u


def test_lowpass_target_is_a_gaussian_blur():
    x = torch.zeros(1, 3, 16, 16)
    x[0, :, 8, 8] = 1.0
    sigma = 1.5
    y = common.gaussian_blur(x, sigma)
    r = torch.arange(16.0) - 8
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g[8 - 5:8 + 6].sum()  # the kernel is cut at 3 sigma (radius 5)
    expected = torch.outer(g, g)
    expected[(r.abs() > 5)[:, None] | (r.abs() > 5)[None]] = 0
    assert torch.allclose(y[0, 0], expected, atol=1e-6)
    assert torch.allclose(common.gaussian_blur(torch.full((2, 3, 16, 16), 0.3), torch.tensor([0.5, 2.0]), 2.0),
                          torch.full((2, 3, 16, 16), 0.3), atol=1e-6)  # a constant image is its own low pass
    m = _model()
    assert torch.allclose(m.lowpass(x), common.gaussian_blur(x, m.cfg.lowpass))  # in pixels, at any size


def test_simsiam_gradient_passes_only_through_the_predictor():
    u1, u2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    DL.simsiam(p1, p2, u1, u2).backward()
    assert u1.grad is None and u2.grad is None  # the targets carry no gradient
    # by hand: d/dp1 of -1/2 mean cos(p1, u2)
    p = p1.detach().clone().requires_grad_()
    (-0.5 * torch.nn.functional.cosine_similarity(p, u2.detach(), dim=-1).mean()).backward()
    assert torch.allclose(p1.grad, p.grad)


def test_views_remove_colour_and_pose_but_keep_the_image():
    cfg = DL.Config(**DL.PRESETS["tiny"])
    x = common.to_float(common.load_images("shapes:200", "train", 16)[0][:8])
    torch.manual_seed(0)
    v1, v2 = DL.views(x, cfg), DL.views(x, cfg)
    assert v1.shape == x.shape and v1.min() >= -1 and v1.max() <= 1
    assert (v1 - v2).abs().mean() > 0.1  # two views differ
    cfg.crop_scale, cfg.jitter, cfg.blur = [1.0, 1.0], 0.0, [1e-4, 1e-4]
    # no jitter, no blur, a full crop: only rotation, flip and channel order change, so the sorted values survive
    v = DL.views(torch.full((2, 3, 16, 16), 0.2), cfg)
    assert torch.allclose(v, torch.full_like(v, 0.2), atol=1e-5)


def test_shape_factors_match_what_was_drawn():
    f = common.shape_factors("shapes:50", "train")
    assert f.shape == (50, len(common.FACTORS))
    for i in range(50):
        img, label = common.render_shape(i, 32)
        p = common.shape_params(i, 32)
        bg = img[:, 0, 0] / 255  # a corner is background
        assert np.allclose(f[i, 3:6].numpy(), p["bg"]) and label == p["label"]
        if common.SHAPE_CLASSES[label] == "circle":  # the centroid of the shape is its position
            mask = np.abs(img.transpose(1, 2, 0) / 255 - bg).sum(-1) > 0.3
            yy, xx = np.nonzero(mask)
            assert abs(xx.mean() - p["cx"]) < 1.0 and abs(yy.mean() - p["cy"]) < 1.0
            assert f[i, 6].item() * 32 + 15.5 == pytest.approx(p["cx"], abs=1e-4)  # offset from the centre / side
    assert all(("stripe" in k) == (j >= 11) for j, k in enumerate(common.FACTORS))


def test_r2_read_outs():
    """Linear ridge: a linear factor is read exactly, one that is an even function of the features not at all; the MLP
    reads both (the stripe case: a waveform whose phase varies)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3000, 4, generator=g)
    v = torch.stack([2 * f[:, 0] - f[:, 1], f[:, 2] ** 2 + f[:, 3] ** 2], 1)  # [N, 2]
    lin = common.r2_scores(f[:2000], v[:2000], f[2000:], v[2000:], ridge=1e-6)
    mlp = DL.r2_mlp(f[:2000], v[:2000], f[2000:], v[2000:])
    assert lin[0] > 0.999 and lin[1] < 0.05
    assert mlp[0] > 0.95 and mlp[1] > 0.9


def test_spectrum_finds_the_stripes_whatever_their_phase():
    xx = torch.arange(16.0).view(1, 16).expand(16, 16)
    for phase in (0.0, 1.0, 2.5):
        x = torch.sin(2 * math.pi * 5 / 16 * xx + phase).expand(1, 3, 16, 16)  # 5 cycles along x
        s = DL.spectrum(x).view(16, 16)
        assert s.argmax().item() in (5, 11)  # row 0 (no variation along y), column 5 or its mirror 16 - 5
    a = DL.spectrum(torch.sin(2 * math.pi * 5 / 16 * xx).expand(1, 3, 16, 16))
    b = DL.spectrum(torch.sin(2 * math.pi * 5 / 16 * xx + 2.0).expand(1, 3, 16, 16))
    assert a[0, 5].item() == pytest.approx(b[0, 5].item(), rel=1e-2)  # the peak's power (the blur pads by reflection)


def test_train_resume_eval_export_and_generation(cli, logged_losses, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(DL, ["train", *TINY, "--steps", 10, "--out", a]) == 0
    assert cli(DL, ["train", *TINY, "--steps", 5, "--out", b]) == 0
    assert cli(DL, ["train", *TINY, "--steps", 10, "--out", b, "--resume"]) == 0
    assert logged_losses(b) == logged_losses(a)
    row = json.loads(open(a / "log.jsonl").readline())
    assert row["loss"] == pytest.approx(row["loss_rec"] + row["loss_sem"], rel=1e-5)
    assert cli(DL, ["eval", "--ckpt", b / "ckpt.pt", "--device", "cpu"]) == 0
    res = json.load(open(b / "eval.json"))
    assert set(res["parts"]) == {"z_u", "z_s", "z_d", "z_us", "all"} and res["fd"] is None
    assert res["probe_linear"] == res["parts"]["z_u"]["probe_linear"]
    assert res["probe_linear_init"] == res["parts_init"]["z_u"]["probe_linear"]
    assert set(res["stripe_r2_decoded"]) == {"images", "all", "drop_d"}
    for key in ("r2", "r2_mlp"):
        assert [k for k in res["parts"]["z_d"][key] if "stripe" in k] == [k for k in common.FACTORS if "stripe" in k]
    # export: common.load_encoder gives E_u's global token, from which z_u is one linear map
    assert cli(DL, ["export-encoder", "--ckpt", b / "ckpt.pt", "--out", tmp_path / "enc.pt"]) == 0
    enc = common.load_encoder(str(tmp_path / "enc.pt"))
    cfg, ae = DL.load_ae(str(b / "ckpt.pt"), "cpu")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert enc.resolution is None and torch.allclose(ae.head_u(enc(x)[0]), ae.encode(x)[0], atol=1e-4)
    # stage 2 on the latent, then sample and eval with FD
    g = tmp_path / "g"
    assert cli(DL, ["train-gen", *TINY, "--steps", 6, "--ae", b / "ckpt.pt", "--out", g]) == 0
    assert cli(DL, ["sample", "--ckpt", g / "ckpt.pt", "--n", 5, "--out", tmp_path / "s.npz", "--device", "cpu"]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (5, 16, 16, 3)
    assert cli(DL, ["eval", "--ckpt", g / "ckpt.pt", "--n", 50, "--device", "cpu"]) == 0
    res_g = json.load(open(g / "eval.json"))
    assert res_g["fd"] > 0 and res_g["n_samples"] == 50 and res_g["parts"] == res["parts"]  # the same autoencoder


def test_bad_inputs(cli, tmp_path, capsys):
    for argv in (["train", *TINY, "--set", "split=16,16", "--out", tmp_path / "x"],
                 ["train", *TINY, "--set", "drop_d=1.5", "--out", tmp_path / "x"],
                 ["train", *TINY, "--image-size", 18, "--out", tmp_path / "x"],
                 ["train-gen", *TINY, "--ae", tmp_path / "none.pt", "--out", tmp_path / "x"],
                 ["export-encoder", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "e.pt"]):
        assert cli(DL, argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1
    assert cli(DL, ["train", *TINY, "--steps", 2, "--out", tmp_path / "ae"]) == 0
    assert cli(DL, ["sample", "--ckpt", tmp_path / "ae" / "ckpt.pt", "--out", tmp_path / "s.npz"]) == 2
    assert "train-gen" in capsys.readouterr().err


def test_torchrun_two_cpu_processes(torchrun, tmp_path):
    """DDP: the logged step-1 loss is the mean of the two ranks' losses, each recomputed here in one process."""
    r = torchrun("decoupled_latent.py", ["train", *TINY, "--steps", 3, "--out", tmp_path], 29535)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3]
    cfg = DL.Config(**torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"])
    images, labels, _ = common.load_images(cfg.data, "train", cfg.image_size)
    losses = []
    for rank in (0, 1):
        torch.manual_seed(cfg.seed)
        model = DL.DecoupledAE(cfg)
        torch.manual_seed(cfg.seed * 1_000_003 + rank)
        x, _ = common.batch(images, labels, cfg.batch_size // 2, cfg.seed, 0, rank)
        losses.append(model(x).item())
    assert losses[0] != losses[1]
    assert rows[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_variance_hinge_by_hand():
    u = torch.tensor([[0.0, 0.0], [2.0, 0.2]])  # std: sqrt(2) (no penalty) and sqrt(0.02)
    expected = 0.5 * (1 - (0.02 + 1e-4) ** 0.5)
    assert DL.variance_hinge(u).item() == pytest.approx(expected, rel=1e-4)
    assert DL.variance_hinge(torch.ones(8, 3)).item() == pytest.approx(1 - 1e-2, rel=1e-4)  # collapsed: ~1
