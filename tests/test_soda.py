import json

import numpy as np
import pytest
import torch

import common
import soda as S

TINY = ["--preset", "tiny", "--device", "cpu"]


def _model(**kw):
    torch.manual_seed(0)
    m = S.SODA(S.Config(**dict(S.PRESETS["tiny"], **kw)))
    for blk in m.net.res_blocks:  # give every block a non-trivial z-FiLM, and open the zero-initialised layers
        torch.nn.init.normal_(blk.z_film.weight)
        torch.nn.init.normal_(blk.conv2.weight, std=0.1)
    torch.nn.init.normal_(m.net.conv_out.weight, std=0.1)
    return m


def test_each_sub_vector_reaches_only_its_layers():
    m = _model()
    G = m.net.groups
    # tiny: ch_mult [1, 2], one block a level: down 0, down 1, the middle pair, up 1 (x2), up 0 (x2): mirrored groups
    assert G == 3 and m.net.block_group == [0, 1, 2, 2, 1, 1, 0, 0]
    seen = {}  # what each block really receives in a forward pass
    for blk in m.net.res_blocks:
        blk.register_forward_hook(lambda mod, inp, out: seen.setdefault(id(mod), []).append(inp[2].clone()))
    z, keep, x_t, t = torch.randn(2, 12), torch.ones(2, G), torch.randn(2, 3, 16, 16), torch.rand(2)
    m.net(x_t, t, z, keep)
    for g in range(G):
        z2 = z.clone()
        z2[:, g * 4:(g + 1) * 4] += 1.0  # change sub-vector g only
        m.net(x_t, t, z2, keep)
        for blk, bg in zip(m.net.res_blocks, m.net.block_group):
            assert (not torch.equal(seen[id(blk)][0], seen[id(blk)][-1])) == (bg == g), (g, bg)


def test_layer_masking_and_guidance():
    m = _model().eval()
    z, G = torch.randn(2, 12), m.net.groups
    keep = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mods = m.net.z_modulation(z, keep)
    for mod, g in zip(mods, m.net.block_group):
        assert (mod[0].abs().sum() > 0) == (g != 1) and mod[1].abs().sum() == 0  # masked groups get no modulation
    x_t, w = torch.randn(2, 3, 16, 16), 0.3
    tt = torch.full((2,), 0.5)
    e_c, e_u = m.net(x_t, tt, z, torch.ones(2, G)), m.net(x_t, tt, z, torch.zeros(2, G))
    assert not torch.allclose(e_c, e_u)
    assert torch.allclose(m.eps(x_t, 0.5, z, w), (1 + w) * e_c - w * e_u, atol=1e-5)
    assert torch.allclose(m.eps(x_t, 0.5, z, 0.0), e_c, atol=1e-6)


def test_views_differ_but_come_from_one_image():
    torch.manual_seed(0)
    x = -torch.ones(2, 3, 16, 16)
    x[0, 0] = torch.rand(16, 16) * 2 - 1  # image 0 lives in the red channel, image 1 in the green one
    x[1, 1] = torch.rand(16, 16) * 2 - 1
    a, b = S.random_crops(x, [0.2, 1.0]), S.random_crops(x, [0.2, 1.0])
    for v in (a, b):  # every view is made of its own image only
        assert torch.allclose(v[0, 1:], torch.full_like(v[0, 1:], -1.0)) and torch.allclose(v[1, [0, 2]], torch.full_like(v[1, [0, 2]], -1.0))
    assert not torch.allclose(a, b) and not torch.allclose(a, x)  # and two views differ
    j = S.color_jitter(x, 0.4)
    assert j.shape == x.shape and j.min() >= -1 and j.max() <= 1 and not torch.allclose(j, x)
    assert torch.allclose(S.random_crops(torch.full((1, 3, 8, 8), 0.3), [0.2, 1.0]), torch.full((1, 3, 8, 8), 0.3))


def test_inverted_cosine_schedule():
    t = torch.tensor([0.0, 0.5, 1.0])
    a = S.abar(t, 0.008)
    assert a[0].item() == pytest.approx(1.0) and a[2].item() == pytest.approx(1e-4)  # clamped at t = 1
    assert a[1].item() == pytest.approx(2 * 1.008 / np.pi * np.arccos(np.sqrt(0.5)) - 0.008)  # = 0.496


def test_train_resume_sample_eval_export(cli, logged_losses, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(S, ["train", *TINY, "--steps", 10, "--out", a]) == 0
    assert cli(S, ["train", *TINY, "--steps", 5, "--out", b]) == 0
    assert cli(S, ["train", *TINY, "--steps", 10, "--out", b, "--resume"]) == 0
    assert logged_losses(b) == logged_losses(a)
    assert cli(S, ["sample", "--ckpt", b / "ckpt.pt", "--n", 6, "--out", tmp_path / "s.npz"]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (6, 16, 16, 3)
    assert cli(S, ["eval", "--ckpt", b / "ckpt.pt", "--n", 8]) == 0
    res = json.load(open(b / "eval.json"))
    assert res["step"] == 10 and res["psnr"] > 0 and {"probe_linear_z", "probe_linear_z_init", "probe_knn_z"} <= set(res)
    # export -> common.load_encoder gives the trained encoder's global token
    assert cli(S, ["export-encoder", "--ckpt", b / "ckpt.pt", "--out", tmp_path / "enc.pt"]) == 0
    enc = common.load_encoder(str(tmp_path / "enc.pt"))
    model = S.SODA(S.Config(**torch.load(b / "ckpt.pt", weights_only=True)["config"]))
    model.load_state_dict(torch.load(b / "ckpt.pt", weights_only=True)["ema"])
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        g_ref = model.encoder(((x + 1) / 2 - model.mean) / model.std)[0]
    assert enc.resolution == 16 and torch.allclose(enc(x)[0], g_ref, atol=1e-4)


def test_bad_inputs(cli, tmp_path):
    assert cli(S, ["train", *TINY, "--image-size", 18, "--out", tmp_path / "x"]) == 2
    assert cli(S, ["export-encoder", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "e.pt"]) == 2


def test_z_carries_what_the_denoiser_uses():
    """The bottleneck works: on 16 images, z from the encoder lowers the denoising loss against no z (all groups
    masked). (The class-probe gain itself does not show at a CPU's budget on shapes: see the README.)"""
    cfg = S.Config(**dict(S.PRESETS["tiny"], data="shapes:16", z_dim=48, enc_dim=128, source_scale=[1.0, 1.0],
                          target_scale=[1.0, 1.0], jitter=0.0))
    images, labels, _ = common.load_images(cfg.data, "train", cfg.image_size)
    torch.manual_seed(0)
    m = S.SODA(cfg)
    enc = list(m.encoder.parameters()) + list(m.head.parameters())
    opt = torch.optim.AdamW([{"params": m.net.parameters(), "lr": 1e-3}, {"params": enc, "lr": 2e-3}],
                            betas=(0.9, 0.95), weight_decay=0.05)  # as train(): the encoder at 2x
    for step in range(600):
        loss = m(common.batch(images, labels, 32, 0, step, flip=False)[0])
        opt.zero_grad(); loss.backward(); opt.step()
    x, B = images.float() / 127.5 - 1, len(images)
    t = torch.full((B,), 0.9)
    a = S.abar(t, cfg.schedule_s).view(B, 1, 1, 1)
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    x_t = a.sqrt() * x + (1 - a).sqrt() * e
    with torch.no_grad():
        z = m.encode(x)
        with_z, without_z = (((m.net(x_t, t, z, torch.full((B, 3), k)) - e) ** 2).mean().item() for k in (1.0, 0.0))
    assert with_z < 0.95 * without_z, (with_z, without_z)
