import argparse
import json
import os
import textwrap

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
    assert {k: v.shape[1] for k, v in parts.items()} == dict(
        z_u=16, z_s=32, z_d=48, z_us=48, all=96
    )
    assert torch.equal(parts["z_d"], tokens[..., 2:].flatten(1)) and torch.equal(
        parts["all"][:, :16], z_u
    )
    with pytest.raises(common.UsageError, match="divide"):
        _model(split=[16, 15, 16])


def test_dropping_z_d_zeroes_only_z_d():
    m = _model()
    seen = []
    m.decoder.register_forward_pre_hook(lambda mod, a: seen.append([t.clone() for t in a]))
    # split 16/16/16: one z_s and one z_d channel a token
    z_u, tokens = torch.randn(2, 16), torch.randn(2, 16, 2)
    m.decode(z_u, tokens, torch.tensor([True, False]))
    ((u, tok),) = seen
    assert torch.equal(u, z_u) and torch.equal(tok[0], tokens[0])  # kept: unchanged
    # dropped: z_d is 0, z_s kept
    assert torch.equal(tok[1, :, 0], tokens[1, :, 0]) and (tok[1, :, 1] == 0).all()


def test_reconstruction_does_not_reach_z_u():
    """detach_u: the decoder reads z_u, but L_rec sends E_u no gradient; without it (or in the
    control) it does."""
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    for kw, reaches in (
        (dict(), False),
        (dict(detach_u=False), True),
        (dict(decouple=False), True),
    ):
        m = _model(sem_coeff=0.0, drop_d=0.0, **kw)
        m(x)[0].backward()
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
    g = g / g[8 - 5 : 8 + 6].sum()  # the kernel is cut at 3 sigma (radius 5)
    expected = torch.outer(g, g)
    expected[(r.abs() > 5)[:, None] | (r.abs() > 5)[None]] = 0
    assert torch.allclose(y[0, 0], expected, atol=1e-6)
    assert torch.allclose(
        common.gaussian_blur(torch.full((2, 3, 16, 16), 0.3), torch.tensor([0.5, 2.0]), 2.0),
        # a constant image is its own low pass
        torch.full((2, 3, 16, 16), 0.3),
        atol=1e-6,
    )
    m = _model()
    # in pixels, at any size
    assert torch.allclose(m.lowpass(x), common.gaussian_blur(x, m.cfg.lowpass))


def test_info_nce_by_hand():
    """SimCLR's NT-Xent: view i of 2B picks its other view among the other 2B - 1, cosine
    similarities over tau."""
    g = torch.Generator().manual_seed(0)
    h1, h2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    z = torch.nn.functional.normalize(torch.cat([h1, h2]), dim=-1)
    total = 0.0
    for i in range(6):
        others = [j for j in range(6) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.2 for j in others])
        total -= torch.log_softmax(logits, 0)[others.index((i + 3) % 6)]
    assert DL.info_nce(h1, h2, 0.2).item() == pytest.approx(total.item() / 6, rel=1e-5)
    # the two views agree: the loss vanishes at a low tau
    assert DL.info_nce(h1, h1 * 3, 0.05).item() < 0.01


def test_views_remove_colour_and_pose_but_keep_the_image():
    cfg = DL.Config(**DL.PRESETS["tiny"])
    x = common.to_float(common.load_images("shapes:200", "train", 16)[0][:8])
    torch.manual_seed(0)
    v1, v2 = DL.views(x, cfg), DL.views(x, cfg)
    assert v1.shape == x.shape and v1.min() >= -1 and v1.max() <= 1
    assert (v1 - v2).abs().mean() > 0.1  # two views differ
    cfg.crop_scale, cfg.jitter, cfg.blur = [1.0, 1.0], 0.0, [1e-4, 1e-4]
    # no jitter, no blur, a full crop: only rotation, flip and channel order change, so the sorted
    # values survive
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
            # offset from the centre / side
            assert f[i, 6].item() * 32 + 15.5 == pytest.approx(p["cx"], abs=1e-4)
    assert all(("stripe" in k) == (j >= 11) for j, k in enumerate(common.FACTORS))


def test_r2_read_outs():
    """Linear ridge: a linear factor is read exactly, one that is an even function of the features
    not at all; the MLP reads both (the stripe case: a waveform whose phase varies)."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3000, 4, generator=g)
    v = torch.stack([2 * f[:, 0] - f[:, 1], f[:, 2] ** 2 + f[:, 3] ** 2], 1)  # [N, 2]
    lin = common.r2(common.ridge(f[:2000], v[:2000], lam=1e-6)(f[2000:]), v[2000:])
    mlp = DL.r2_mlp(f[:2000], v[:2000], f[2000:], v[2000:])
    assert lin[0] > 0.999 and lin[1] < 0.05
    assert mlp[0] > 0.95 and mlp[1] > 0.9


def test_swap_z_d_takes_only_the_donors_z_d():
    g = torch.Generator().manual_seed(0)
    # 3 z_s and 2 z_d channels a token
    a, b = torch.randn(4, 16, 5, generator=g), torch.randn(4, 16, 5, generator=g)
    out = DL.swap_z_d(a, b, 3)
    assert out.shape == a.shape
    assert torch.equal(out[..., :3], a[..., :3]) and torch.equal(out[..., 3:], b[..., 3:])
    # on a model: the decoder gets A's z_u and z_s, B's z_d
    m = _model(split=[16, 32, 16])
    seen = []
    m.decoder.register_forward_pre_hook(lambda mod, args: seen.append([t.clone() for t in args]))
    z_u, tokens = m.encode(torch.rand(3, 3, 16, 16) * 2 - 1)
    donor = tokens.roll(-1, 0)
    m.decode(z_u, DL.swap_z_d(tokens, donor, m.c_s))
    ((u, tok),) = seen
    assert torch.equal(u, z_u) and torch.equal(tok[..., :2], tokens[..., :2])
    assert torch.equal(tok[..., 2:], tokens[[1, 2, 0], :, 2:])


def test_class_read_of_the_swap_test():
    """fit_classifier: separable features are read exactly against their own labels and at chance
    against another image's (a shuffle, as B's labels are to A's images)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (2000,), generator=g)
    f = 3 * torch.nn.functional.one_hot(y).float() + 0.3 * torch.randn(2000, 4, generator=g)
    f = torch.cat([f, torch.randn(2000, 6, generator=g)], 1)  # and noise dimensions
    classify = DL.fit_classifier(f[:1000], y[:1000])
    pred = classify(f[1000:])
    assert pred.shape == (1000,) and (pred == y[1000:]).float().mean() == 1.0
    shuffled = y[1000:][torch.randperm(1000, generator=g)]
    assert abs((pred == shuffled).float().mean().item() - 0.25) < 0.06


def test_resume_continues_exactly(cli, logged_losses, tmp_path):
    """The same command plus --resume continues the run bit for bit (every training flag is a Config
    field: here the control's --no-decouple, which test_contract's tiny run does not set)."""
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["train", *TINY, "--no-decouple", "--steps", 4, "--out", b]
    assert cli(DL, ["train", *TINY, "--no-decouple", "--steps", 6, "--out", a]) == 0
    assert cli(DL, argv) == 0
    assert cli(DL, [*argv, "--resume", "--steps", 6]) == 0
    assert logged_losses(b) == logged_losses(a)
    row = json.loads(open(a / "log.jsonl").readline())
    # the terms forward returns
    assert row["loss"] == pytest.approx(row["loss_rec"] + row["loss_sem"], rel=1e-5)


def test_train_eval_export_and_generation(cli, tmp_path, monkeypatch, few_probe_images):
    few_probe_images(200, 100)
    b = tmp_path / "b"
    assert cli(DL, ["train", *TINY, "--steps", 11, "--out", b]) == 0
    # at multiples of sample_every
    assert [f for f in os.listdir(b) if f.endswith(".png")] == ["samples_0000010.png"]
    assert cli(DL, ["eval", "--ckpt", b / "ckpt.pt", "--device", "cpu"]) == 0
    res = json.load(open(b / "eval.json"))
    assert set(res["parts"]) == {"z_u", "z_s", "z_d", "z_us", "all"} and res["fd"] is None
    assert res["probe_linear"] == res["parts"]["z_u"]["probe_linear"]
    assert res["probe_linear_init"] == res["parts_init"]["z_u"]["probe_linear"]
    for kind in ("pattern", "amplitude"):
        for suffix in ("", "_drop_d", "_init", "_pixels", "_blurred"):
            # R^2 clipped at 0: 0 when it is lost
            value = res[f"detail_{kind}{suffix}"]
            assert isinstance(value, float) and 0 <= value <= 1, (kind, suffix)
    # the swap test: four decodings of the same images, each read against A's and B's stripes and
    # labels; `all` and `drop_d` are reconstruction()'s own
    swap = res["swap"]
    assert list(swap) == ["all", "drop_d", "z_d_from_B", "z_u_from_B"]
    for row in swap.values():
        assert list(row) == [
            "pattern_A",
            "pattern_B",
            "amplitude_A",
            "amplitude_B",
            "class_A",
            "class_B",
            "psnr_A",
        ]
        assert all(isinstance(v, float) and 0 <= v <= 1 for k, v in row.items() if k != "psnr_A")
    for name, suffix in (("all", ""), ("drop_d", "_drop_d")):
        assert swap[name]["pattern_A"] == res["detail_pattern" + suffix]
        assert swap[name]["amplitude_A"] == res["detail_amplitude" + suffix]
        assert swap[name]["psnr_A"] == pytest.approx(res[f"psnr_{name}"], abs=1e-3)
    for key in ("r2", "r2_mlp"):
        assert [k for k in res["parts"]["z_d"][key] if "stripe" in k] == [
            k for k in common.FACTORS if "stripe" in k
        ]
    # export: common.load_encoder gives E_u's global token, from which z_u is one linear map
    assert cli(DL, ["export-encoder", "--ckpt", b / "ckpt.pt", "--out", tmp_path / "enc.pt"]) == 0
    enc = common.load_encoder(str(tmp_path / "enc.pt"))
    cfg, ae = DL.load_ae(str(b / "ckpt.pt"), "cpu")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert enc.resolution is None and torch.allclose(
        ae.head_u(enc(x)[0]), ae.encode(x)[0], atol=1e-4
    )
    # stage 2 on the latent: grids only at multiples of sample_every, of `grid` images, with the
    # run's sampler steps
    calls, sample = [], DL.LatentGenerator.sample
    monkeypatch.setattr(
        DL.LatentGenerator,
        "sample",
        lambda self, n, **k: calls.append((n, k.get("steps"))) or sample(self, n, **k),
    )
    g = tmp_path / "g"
    assert (
        cli(
            DL,
            [
                "train-gen",
                *TINY,
                "--steps",
                7,
                "--set",
                "grid=8",
                "--set",
                "sample_every=3",
                "--ae",
                b / "ckpt.pt",
                "--out",
                g,
            ],
        )
        == 0
    )
    assert calls == [(8, None), (8, None)]
    # sample and eval honour --compile (the decoder and the DiT) and --sample-steps
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(type(m).__name__) or m)
    assert (
        cli(
            DL,
            [
                "sample",
                "--ckpt",
                g / "ckpt.pt",
                "--n",
                5,
                "--out",
                tmp_path / "s.npz",
                "--device",
                "cpu",
                "--sample-steps",
                2,
                "--compile",
            ],
        )
        == 0
    )
    assert compiled == ["Decoder", "LatentDiT"] and calls[-1] == (5, 2)
    # stage 1
    *_, gen = DL.load_any(argparse.Namespace(ckpt=str(b / "ckpt.pt"), device="cpu", compile=True))
    assert gen is None and compiled == ["Decoder", "LatentDiT", "Decoder"]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (5, 16, 16, 3)
    assert cli(DL, ["eval", "--ckpt", g / "ckpt.pt", "--n", 50, "--device", "cpu"]) == 0
    res_g = json.load(open(g / "eval.json"))
    # the same autoencoder
    assert res_g["n_samples"] == 50 and res_g["parts"] == res["parts"]
    assert res_g["swap"] == res["swap"]
    # the FD is that of the samples `sample` draws with eval's seed and batch, to the training split
    assert (
        cli(DL, ["sample", "--ckpt", g / "ckpt.pt", "--n", 50, "--out", tmp_path / "s50.npz"]) == 0
    )
    made = common.to_float(
        torch.from_numpy(np.load(tmp_path / "s50.npz")["arr_0"]).permute(0, 3, 1, 2)
    )
    fd = common.fd_to_train(
        common.FDFeatures("pixels", torch.device("cpu")), made, "shapes:1000", 16
    )
    assert res_g["fd"] == pytest.approx(fd, rel=0.02)  # uint8 rounding apart
    # the docstring's snippet samples from the stage-2 checkpoint
    snippet = textwrap.dedent(DL.__doc__.split("in Python:\n")[1]).replace(
        "runs/dl_gen/ckpt.pt", str(g / "ckpt.pt")
    )
    scope = {}
    exec(snippet, scope)
    assert scope["x"].shape == (8, 3, 16, 16)


def test_bad_inputs(cli, tmp_path, capsys):
    for argv in (
        ["train", *TINY, "--set", "split=16,16", "--out", tmp_path / "x"],
        ["train", *TINY, "--set", "drop_d=1.5", "--out", tmp_path / "x"],
        ["train", *TINY, "--image-size", 18, "--out", tmp_path / "x"],
        ["train-gen", *TINY, "--ae", tmp_path / "none.pt", "--out", tmp_path / "x"],
        ["export-encoder", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "e.pt"],
    ):
        assert cli(DL, argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1
    assert cli(DL, ["train", *TINY, "--steps", 2, "--out", tmp_path / "ae"]) == 0
    assert (
        cli(DL, ["sample", "--ckpt", tmp_path / "ae" / "ckpt.pt", "--out", tmp_path / "s.npz"]) == 2
    )
    assert "train-gen" in capsys.readouterr().err
