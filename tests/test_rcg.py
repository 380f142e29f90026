import argparse
import contextlib
import datetime
import json
import os
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import Draws, assert_close32, assert_close64, detail_bounded

import common
import rcg as R

TINY = ["--preset", "tiny", "--device", "cpu"]


def tiny_cfg(**kw):
    return replace(R.Config(**R.PRESETS["tiny"]), **kw)


def test_standardise_per_vector():
    r = torch.randn(5, 32) * 3 + 7
    s = R.standardise(r)
    assert torch.allclose(s.mean(-1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(s.std(-1), torch.ones(5), atol=1e-5)
    # blind to each vector's scale and offset
    assert torch.allclose(R.standardise(2.5 * r - 4), s, atol=1e-5)
    # batch size 1 (the official code's squeeze() broke it)
    assert R.standardise(r[:1]).shape == (1, 32)


def test_fixed_projection_is_orthonormal_and_seeded():
    p = R.fixed_projection(64, 16)
    assert torch.allclose(p.T @ p, torch.eye(16), atol=1e-5)
    assert torch.equal(p, R.fixed_projection(64, 16))


def test_linear_sqrt_betas_by_hand():
    b = R.betas_linear_sqrt(3, 0.0015, 0.0195)
    assert b[0].item() == pytest.approx(0.0015) and b[-1].item() == pytest.approx(0.0195)
    assert b[1].item() == pytest.approx(((0.0015**0.5 + 0.0195**0.5) / 2) ** 2)
    rdm = R.RDM(tiny_cfg(T=3), 4)
    assert torch.equal(rdm.abar, torch.cumprod(1 - b, 0))  # float64


def test_ddim_steps_by_hand():
    """Two DDIM steps on LDM's grid (T = 10, c = 5: t = 6, then 1, then to abar_0) with a network
    that always says r^ = c, against the formula."""
    rdm = R.RDM(tiny_cfg(T=10), 3)
    c = torch.tensor([1.0, -2.0, 0.5])
    calls = []

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            calls.append(x.clone())
            return c.expand(len(x), 3)

    rdm.net = Oracle()

    def step(x, a, ap, noise, eta):
        e = (x - a.sqrt() * c) / (1 - a).sqrt()
        s = eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
        return ap.sqrt() * c + (1 - ap - s**2).sqrt() * e + s * noise

    for eta in (0.0, 1.0):
        calls.clear()
        out = rdm.sample(2, steps=2, eta=eta, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        x, n1, n2 = (torch.randn(2, 3, generator=g) for _ in range(3))
        x1 = step(x, rdm.abar[6], rdm.abar[1], n1, eta)
        assert torch.allclose(calls[0], x) and torch.allclose(calls[1], x1, atol=1e-5)
        assert torch.allclose(out, step(x1, rdm.abar[1], rdm.abar[0], n2, eta), atol=1e-5)


def test_rdm_learns_a_known_mixture():
    """Two modes +-m in 16-D (a low-dimensional distribution the RDM must find): after 600 steps the
    DDIM (eta 1) samples sit on the modes, both of them."""
    torch.manual_seed(0)
    m = torch.zeros(16)
    m[:4] = 1.5
    rdm = R.RDM(tiny_cfg(rdm_width=128, rdm_depth=2, T=100), 16)
    opt = torch.optim.AdamW(rdm.parameters(), lr=2e-3)
    for _ in range(600):
        sign = torch.randint(0, 2, (256, 1)) * 2 - 1
        loss = rdm(sign * m + 0.05 * torch.randn(256, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = rdm.eval().sample(400, steps=50, generator=torch.Generator().manual_seed(1))
    dist = torch.stack([(x - m).norm(dim=1), (x + m).norm(dim=1)], 1)  # to each mode; |2m| = 6
    near = dist.min(1).values < 1.0
    share = (dist[:, 0] < dist[:, 1]).float().mean().item()
    assert near.float().mean() > 0.9, near.float().mean()
    assert 0.3 < share < 0.7, share


def test_null_vector_and_guidance():
    torch.manual_seed(0)
    model = R.RCG(tiny_cfg(rep_drop=1.0), 8)
    for p in model.parameters():  # away from the zero init
        torch.nn.init.normal_(p, std=0.1)
    x, r = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 8)
    model(x, r).backward()
    net = model.net
    # r dropped -> null
    assert net.fake_latent.grad.abs().sum() > 0 and net.rep_embedder.weight.grad is not None
    # the unconditional table: frozen, unused
    assert net.y_embedder.embedding_table.weight.grad is None
    model.zero_grad()
    net.rep_dropout_prob = 0.0
    model(x, r).backward()
    # never dropped: the null is unused
    assert net.fake_latent.grad is None or net.fake_latent.grad.abs().sum() == 0
    model.eval()
    t = torch.full((2,), 0.4)
    v_r, v_null = net(x, t, r), net(x, t, net.fake_latent.expand(2, -1))
    assert torch.allclose(model.velocity(x, 0.4, r, 3.0), v_null + 3.0 * (v_r - v_null), atol=1e-5)
    assert torch.allclose(model.velocity(x, 0.4, r, 1.0), v_r, atol=1e-6)
    plain = R.RCG(tiny_cfg(no_rep=True), 8)
    assert plain.net.fake_latent is None and plain.net.rep_embedder is None and plain.rep_dim == 0
    assert plain.net.y_embedder.embedding_table.weight.requires_grad  # c = t_emb + y_emb: trained


def test_batch_size_one():
    torch.manual_seed(0)
    rdm, gen = R.RDM(tiny_cfg(), 8), R.RCG(tiny_cfg(), 8)
    assert rdm(torch.randn(1, 8)).ndim == 0 and rdm.sample(1).shape == (1, 8)
    assert gen(torch.rand(1, 3, 16, 16), torch.randn(1, 8)).ndim == 0
    assert gen.sample(rdm.sample(1), steps=2).shape == (1, 3, 16, 16)
    rep = R.Representation(tiny_cfg(), "cpu")
    assert rep(torch.rand(1, 3, 16, 16) * 2 - 1).shape == (1, 384)


def test_data_pairs_each_image_with_its_own_representation():
    """flip_aug: a mirrored image comes with the representation of the mirror image (computed once,
    not re-flipped)."""
    d = common.setup_dist("cpu")

    # the red channel: it turns around when the image is mirrored
    def rep(x):
        return x[:, 0].flatten(1)

    data = R.Data(tiny_cfg(data="shapes:200"), rep, d)
    assert len(data.reps) == 2
    mirrored = 0
    for step in range(3):
        x, r = data.batch(step, 64)
        assert torch.equal(r, x[:, 0].flatten(1))
        # not a row as stored
        mirrored += (~(r[:, None] == data.reps[0][None]).all(-1).any(-1)).sum().item()
    assert 40 < mirrored < 150  # about half of 192
    x, r = R.Data(tiny_cfg(data="shapes:200", flip_aug=False), rep, d).batch(0, 64)
    assert torch.equal(r, x[:, 0].flatten(1))


def test_pipeline_sample_eval(cli, tmp_path, monkeypatch, few_probe_images):
    few_probe_images(400, 100)
    a, g = tmp_path / "rdm", tmp_path / "gen"
    assert cli(R, ["train-rdm", *TINY, "--steps", 10, "--out", a]) == 0
    assert cli(R, ["eval", "--ckpt", a / "ckpt.pt", "--device", "cpu", "--n-rep", 500]) == 0
    res = json.load(open(a / "eval.json"))
    assert res["fd"] is None and res["rep_fd_test"] < res["rep_fd"] < res["rep_fd_init"]
    # as many as the test split's 100 (the held-out floor, rep_fd_test, needs them)
    assert res["n_rep"] == 100
    assert {"probe_linear", "probe_knn", "probe_linear_pixels", "detail_pattern_pixels"} <= set(res)
    assert res["detail_pattern"] is None  # no generator
    assert cli(R, ["train", *TINY, "--steps", 10, "--out", g]) == 0
    assert (g / "samples_0000010.png").exists()  # sample_every 10: a grid at step 10
    out = tmp_path / "s.npz"
    assert (
        cli(
            R,
            [
                "sample",
                "--ckpt",
                g / "ckpt.pt",
                "--rdm",
                a / "ckpt.pt",
                "--n",
                5,
                "--rep-cfg",
                2,
                "--device",
                "cpu",
                "--out",
                out,
            ],
        )
        == 0
    )
    arr = np.load(out)["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    seen, sample = [], R.RCG.sample
    monkeypatch.setattr(
        R.RCG, "sample", lambda self, r=None, **k: seen.append(r) or sample(self, r, **k)
    )
    assert (
        cli(R, ["eval", "--ckpt", g / "ckpt.pt", "--rdm", a / "ckpt.pt", "--n", 50, "--n-rep", 500])
        == 0
    )
    res_g = json.load(open(g / "eval.json"))
    assert res_g["fd"] > 0 and res_g["no_rep"] is False and res_g["rep_fd"] == res["rep_fd"]
    detail_bounded(res_g)
    # detail: the pixels made from the own r of the first min(1000, 100) test images of
    # probe_data, standardised
    _, _, x_te, _ = common.probe_data("shapes:200", 16)
    torch.testing.assert_close(seen[-1], R.Representation(tiny_cfg(), "cpu")(common.to_float(x_te)))
    u = tmp_path / "uncond"
    assert cli(R, ["train", *TINY, "--no-rep", "--steps", 3, "--batch-size", 1, "--out", u]) == 0
    assert not any(f.endswith(".png") for f in os.listdir(u))  # a 3-step run draws no grid
    assert cli(R, ["eval", "--ckpt", u / "ckpt.pt", "--n", 20]) == 0  # no --rdm needed
    res_u = json.load(open(u / "eval.json"))
    assert res_u["no_rep"] is True and "rep_fd" not in res_u and res_u["detail_pattern"] is None


def test_rdm_resume_continues_exactly(cli, logged_losses, tmp_path):
    """The RDM's command plus --resume continues exactly where it stopped (test_contract resumes
    `train`)."""
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["train-rdm", *TINY, "--steps", 4, "--out", b]
    assert cli(R, ["train-rdm", *TINY, "--steps", 6, "--out", a]) == 0
    assert cli(R, argv) == 0
    assert cli(R, [*argv, "--resume", "--steps", 6]) == 0
    assert logged_losses(b) == logged_losses(a)


def test_rdm_training_and_every_sampler_run_in_true_fp32(cli, tmp_path):
    """On a GPU setup_dist turns TF32 on: the RDM's training step, the DDIM and Heun samplers
    (grids, sample, eval's FD, detail_r2 and rep_fd) turn it off; the DiT's training step keeps it
    (bf16 autocast there)."""
    seen = []

    def hook(module, args):
        if isinstance(module, (R.SimpleMLP, R.DiT)):
            seen.append(
                (type(module).__name__, module.training, torch.backends.cuda.matmul.allow_tf32)
            )

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert cli(R, ["train-rdm", *TINY, "--steps", 2, "--out", tmp_path / "rdm"]) == 0
        assert cli(R, ["train", *TINY, "--steps", 10, "--out", tmp_path / "gen"]) == 0
        assert (
            cli(
                R,
                [
                    "eval",
                    "--ckpt",
                    tmp_path / "gen" / "ckpt.pt",
                    "--rdm",
                    tmp_path / "rdm" / "ckpt.pt",
                    "--n",
                    4,
                    "--n-rep",
                    8,
                    "--sample-steps",
                    2,
                    "--rdm-steps",
                    2,
                ],
            )
            == 0
        )
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    fp32 = [tf32 for name, training, tf32 in seen if name == "SimpleMLP" or not training]
    assert fp32 and not any(fp32)
    # both training steps were seen
    assert {"SimpleMLP", "DiT"} == {name for name, training, _ in seen if training}
    # and both samplers
    assert {"SimpleMLP", "DiT"} == {name for name, training, _ in seen if not training}
    assert all(tf32 for name, training, tf32 in seen if name == "DiT" and training)


def test_compile_in_training_sampling_and_eval(cli, tmp_path, monkeypatch):
    """--compile: train-rdm's step in one graph (train's is pinned in test_gpu_paths); sample and
    eval compile the networks of both checkpoints they load (the list of what was compiled:
    torch.compile is not run there)."""
    from torch._dynamo.utils import counters

    compile, compiled = torch.compile, []

    def aot_eager(model, **kwargs):
        return compile(model, backend="aot_eager", **kwargs)

    def record(model, **kwargs):
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    counters.clear()
    assert cli(R, ["train-rdm", *TINY, "--steps", 2, "--compile", "--out", tmp_path / "rdm"]) == 0
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert cli(R, ["train", *TINY, "--steps", 2, "--out", tmp_path / "gen"]) == 0
    monkeypatch.setattr(torch, "compile", record)
    rdm, gen = (
        ["--rdm", tmp_path / "rdm" / "ckpt.pt", "--rdm-steps", 2],
        tmp_path / "gen" / "ckpt.pt",
    )
    compiled.clear()
    assert (
        cli(
            R,
            [
                "sample",
                "--ckpt",
                gen,
                *rdm,
                "--n",
                2,
                "--sample-steps",
                2,
                "--compile",
                "--device",
                "cpu",
                "--out",
                tmp_path / "s.npz",
            ],
        )
        == 0
    )
    assert (
        cli(
            R,
            ["eval", "--ckpt", gen, *rdm, "--n", 2, "--n-rep", 4, "--sample-steps", 2, "--compile"],
        )
        == 0
    )
    assert compiled == ["DiT", "SimpleMLP"] * 2


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(R, ["train-rdm", *TINY, "--steps", 2, "--out", tmp_path / "rdm"]) == 0
    assert (
        cli(
            R,
            ["train-rdm", *TINY, "--steps", 2, "--set", "rep_dim=32", "--out", tmp_path / "rdm32"],
        )
        == 0
    )
    assert cli(R, ["train", *TINY, "--steps", 2, "--out", tmp_path / "gen"]) == 0
    rdm, rdm32, gen = (tmp_path / k / "ckpt.pt" for k in ("rdm", "rdm32", "gen"))
    capsys.readouterr()
    for argv in (
        ["sample", "--ckpt", gen, "--out", tmp_path / "s.npz"],  # no --rdm
        ["sample", "--ckpt", rdm, "--out", tmp_path / "s.npz"],
        ["sample", "--ckpt", gen, "--rdm", gen, "--out", tmp_path / "s.npz"],
        ["sample", "--ckpt", gen, "--rdm", rdm32, "--out", tmp_path / "s.npz"],
        ["eval", "--ckpt", tmp_path / "none.pt"],
        ["train", *TINY, "--set", "eta=2", "--out", tmp_path / "x"],
        ["train-rdm", *TINY, "--set", "rep_dim=1000", "--out", tmp_path / "x"],
        ["train-rdm", *TINY, "--encoder", "resnet50", "--out", tmp_path / "x"],
        ["train", *TINY, "--image-size", 15, "--out", tmp_path / "x"],
    ):
        assert cli(R, argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1, argv
    assert not (tmp_path / "x" / "ckpt.pt").exists()


# ------------------------------------------------------------------- `--preset paper`: the recipes
# The official run this preset mirrors: LTH14/rcg@0c4433c, README.md "RDM" (main_rdm.py) and
# "Pixel Generator: DiT" (main_dit.py), whose released DiT-XL/2 gives FID 4.89 (README.md:211).


def parsed(monkeypatch, argv):
    """argv through rcg.main's own parser -> the parsed args, the command not run."""
    seen = []
    for name in ("train", "sample_cmd", "eval_cmd"):
        monkeypatch.setattr(R, name, seen.append)
    R.main([str(a) for a in argv])
    return seen[0]


def test_paper_preset_is_the_official_recipe():
    """`train --preset paper`: the official DiT-XL run of RCG (and the RDM it samples from), mapped
    onto this file's pixel DiT (what differs: the comment above PRESETS["paper"])."""
    expected = dict(
        data="imagenet",  # LTH14/rcg@0c4433c main_dit.py:123 (--dataset imagenet), :186
        image_size=256,  # LTH14/rcg@0c4433c README.md:196 (--image_size 256)
        # LTH14/rcg@0c4433c README.md:192 (--pretrained_enc_arch mocov3_vit_base): no loader here,
        # DINOv2-B/14 is the nearest ViT-B
        encoder="dinov2_vitb14",
        # LTH14/rcg@0c4433c README.md:191 (--rep_dim 256: MoCo v3's 256-d head); here a fixed
        # orthonormal projection to 256
        rep_dim=256,
        flip_aug=True,  # LTH14/rcg@0c4433c main_dit.py:184 (RandomHorizontalFlip)
        # the RDM (its paper row in RDM_SCHEDULE), LTH14/rcg@0c4433c
        # config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:21 (model_channels: 1536)
        rdm_width=1536,
        # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:24 (num_res_blocks)
        rdm_depth=12,
        T=1000,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:8
        beta_start=0.0015,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:4
        beta_end=0.0195,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:5
        rdm_sample_steps=250,  # LTH14/rcg@0c4433c main_dit.py:112 (--rdm_steps 250)
        eta=1.0,  # LTH14/rcg@0c4433c main_dit.py:113 (--rdm_eta 1.0)
        # LTH14/rcg@0c4433c main_dit.py:217-218 and pixel_generator/dit/models.py:379 (DiT-XL/2
        # on 32x32 latents: 16 x 16 = 256 tokens): 256 px / 16 = the same 16 x 16 tokens
        patch=16,
        hidden=1152,  # LTH14/rcg@0c4433c pixel_generator/dit/models.py:379 (hidden_size=1152)
        depth=28,  # LTH14/rcg@0c4433c pixel_generator/dit/models.py:379 (depth=28)
        heads=16,  # LTH14/rcg@0c4433c pixel_generator/dit/models.py:379 (num_heads=16)
        rep_drop=0.1,  # LTH14/rcg@0c4433c main_dit.py:222 (rep_dropout_prob=0.1)
        # LTH14/rcg@0c4433c main_dit.py:104 (--cfg 1.0, not set by README.md:189-202): no guidance
        rep_cfg=1.0,
        # LTH14/rcg@0c4433c main_dit.py:103 and README.md:209 (250 sampling steps): 125 Heun
        # steps = 2 x 125 - 1 = 249 evaluations of the DiT
        sample_steps=125,
        # LTH14/rcg@0c4433c README.md:197 (--epochs 400): 400 x 1,281,167 / 2048 = 250,227.9,
        # ceil -> 250,228 steps
        steps=250_228,
        # LTH14/rcg@0c4433c README.md:189 (8 GPUs x 16 nodes) x README.md:196 (--batch_size 16)
        batch_size=2048,
        # LTH14/rcg@0c4433c README.md:198 (--lr 1e-4, absolute: main_dit.py:265 scales only blr)
        lr=1e-4,
        weight_decay=0.0,  # LTH14/rcg@0c4433c main_dit.py:283 (weight_decay=0), README.md:198
        adam_beta2=0.95,  # LTH14/rcg@0c4433c main_dit.py:283 (betas=(0.9, 0.95))
        # LTH14/rcg@0c4433c main_dit.py:96 (--warmup_epochs 0) and engine_dit.py:58 (constant)
        warmup=0,
        ema=0.9999,  # LTH14/rcg@0c4433c main_dit.py:102 (--ema_rate 0.9999), engine_dit.py:102
        # LTH14/rcg@0c4433c main_dit.py:16-17 (TF32 on) and engine_dit.py:85 (no autocast): fp32
        bf16=False,
    )
    cfg = R.Config(**R.PRESETS["paper"])
    assert {key: getattr(cfg, key) for key in expected} == expected
    # everything else is the run's bookkeeping, as the default's
    default = R.Config()
    rest = {f for f in vars(cfg) if f not in expected}
    assert {f: getattr(cfg, f) for f in rest} == {f: getattr(default, f) for f in rest}
    assert not cfg.no_rep


def test_paper_rdm_preset_is_the_official_recipe():
    """`train-rdm --preset paper`: the official RDM run (README.md "RDM"), over the paper preset."""
    expected = dict(
        # LTH14/rcg@0c4433c README.md:84 (--epochs 200): 200 x 1,281,167 / 512 = 500,455.9,
        # ceil -> 500,456 steps
        steps=500_456,
        # LTH14/rcg@0c4433c README.md:80 (4 GPUs) x README.md:83 (--batch_size 128)
        batch_size=512,
        # LTH14/rcg@0c4433c README.md:85 (--blr 1e-6) and main_rdm.py:153-154 (lr = blr x batch):
        # 1e-6 x 512
        lr=5.12e-4,
        weight_decay=0.01,  # LTH14/rcg@0c4433c README.md:85 (--weight_decay 0.01)
        # LTH14/rcg@0c4433c main_rdm.py:174 (AdamW's default betas (0.9, 0.999))
        adam_beta2=0.999,
        # LTH14/rcg@0c4433c main_rdm.py:53 (--warmup_epochs 0) and engine_rdm.py:32 (no
        # --cosine_lr: the lr stays constant)
        warmup=0,
        # LTH14/rcg@0c4433c rdm/modules/ema.py:6 (LitEma decay 0.9999; warmed up at :30, as here)
        ema=0.9999,
        image_size=256,  # LTH14/rcg@0c4433c README.md:83 (--input_size 256)
        flip_aug=True,  # LTH14/rcg@0c4433c main_rdm.py:116 (RandomHorizontalFlip)
        rep_dim=256,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:29
        rdm_width=1536,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:21
        rdm_depth=12,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:24
        T=1000,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:8
        beta_start=0.0015,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:4
        beta_end=0.0195,  # LTH14/rcg@0c4433c config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml:5
    )
    cfg = R.Config(**R.RDM_PRESETS["paper"])
    assert {key: getattr(cfg, key) for key in expected} == expected
    # the RDM and the DiT read the same representation (load_pair checks it)
    gen = R.Config(**R.PRESETS["paper"])
    assert (cfg.encoder, cfg.rep_dim, cfg.image_size) == (gen.encoder, gen.rep_dim, gen.image_size)


def test_paper_lr_rules(monkeypatch, tmp_path, capsys):
    """train-rdm: lr = blr x batch (LTH14/rcg@0c4433c main_rdm.py:153-154), so --batch-size scales
    the preset's lr; train: the DiT's --lr 1e-4 is absolute (README.md:198), fixed at any batch."""

    def config(cmd, *flags):
        args = parsed(monkeypatch, [cmd, "--preset", "paper", *flags, "--out", tmp_path / "x"])
        return R.make_config(args, R.RDM_PRESETS if cmd == "train-rdm" else R.PRESETS)

    assert config("train-rdm").lr == 5.12e-4
    cfg = config("train-rdm", "--batch-size", 1024)
    assert cfg.batch_size == 1024 and cfg.lr == pytest.approx(1e-6 * 1024)
    assert "linear rule" in capsys.readouterr().out
    assert config("train-rdm", "--batch-size", 256).lr == pytest.approx(2.56e-4)
    # an lr given is kept
    assert config("train-rdm", "--batch-size", 1024, "--lr", 3e-4).lr == 3e-4
    for batch in (2048, 1536, 4096):
        cfg = config("train", "--batch-size", batch)
        assert (cfg.batch_size, cfg.lr) == (batch, 1e-4)
    # the other presets' train-rdm schedules follow the same rule
    args = parsed(monkeypatch, ["train-rdm", "--batch-size", 256, "--out", tmp_path / "x"])
    assert R.make_config(args, R.RDM_PRESETS).lr == pytest.approx(2.56e-4)


def test_paper_data_asks_for_the_imagenet_folder(cli, tmp_path, capsys):
    """data="imagenet" is a folder only the user has: one line naming --data DIR, before any
    encoder or network is built."""
    assert cli(R, ["train", "--preset", "paper", "--device", "cpu", "--out", tmp_path / "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data DIR" in err


def test_precision_of_the_training_forward(monkeypatch):
    """precision(): the DiT under bf16 autocast (bf16, the existing presets), or in fp32 with the
    TF32 setup_dist sets (bf16=False: `paper`, as LTH14/rcg@0c4433c main_dit.py:16-17); the RDM
    in true fp32 either way."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    cpu, saved = torch.device("cpu"), torch.backends.cuda.matmul.allow_tf32

    def inside(cfg, rdm):
        with R.precision(cfg, cpu, rdm):
            return torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.allow_tf32

    # setup_dist's TF32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert inside(tiny_cfg(), rdm=False) == (True, True)
        assert inside(tiny_cfg(bf16=False), rdm=False) == (False, True)
        assert inside(tiny_cfg(), rdm=True) == (False, False)
        assert inside(tiny_cfg(bf16=False), rdm=True) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert all(R.Config(**p).bf16 for name, p in R.PRESETS.items() if name != "paper")


# ------------------------------------------ against the official code (tests/reference/make_rcg.py)
# rcg_rdm, rcg_loss and rcg_dit are float64 (the official modules run .double() from float32
# weights), but for the official float32 sinusoid of the step: the fixtures carry it per step, ours
# gets the same rows (fed_sinusoid) and its own sinusoid is compared with them in fp32. rcg_ddim is
# float32: both samplers' tables are float32 on purpose. Every random draw comes from the fixture
# (Draws.feed); test_official_draw_order checks the order of the draws on this machine's RNG.
def fed_sinusoid(monkeypatch, ref):
    """rcg.timestep_embedding -> the official float32 sinusoid of each step in ref (sin_t, sin_emb),
    as float64, as the official networks got it; ours' own is first checked against it (fp32: both
    compute it in float32)."""
    steps, rows = ref["sin_t"], ref["sin_emb"]
    assert_close32(R.timestep_embedding(steps, rows.shape[1]), rows, "sinusoid")
    table = dict(zip(steps.tolist(), rows.double()))

    def embed(t, dim):
        assert dim == rows.shape[1]
        return torch.stack([table[v] for v in t.tolist()])

    monkeypatch.setattr(R, "timestep_embedding", embed)


def as_ours(drawn):
    """Recorded official draws -> the tensors ours draws: the official RDM's representations are
    [B, D, 1, 1] (LDM's image-shaped DDPM), ours [B, D]."""
    return [t.flatten(1) if t.dim() == 4 else t for _, t in drawn]


def test_official_rdm_network(reference, monkeypatch):
    """The official SimpleMLP's state dict loads as it is; load_official_rdm reads the EMA weights
    of the official RDM's state dict (model_ema.*), the ones its sampler uses. float64."""
    ref = reference("rcg", "rdm")
    fed_sinusoid(monkeypatch, ref)
    c, pre = ref["config"], "model.diffusion_model."
    net = R.SimpleMLP(c["dim"], c["rdm_width"], c["rdm_depth"], c["t_dim"])
    net.load_state_dict(
        {k[len(pre) :]: v for k, v in ref["state_dict"].items() if k.startswith(pre)}
    )
    rdm = R.load_official_rdm(ref["state_dict"])
    with torch.no_grad():
        assert_close64(net.double()(ref["r_t"], ref["t"]), ref["out"], "raw weights")
        assert_close64(rdm.double().net(ref["r_t"], ref["t"]), ref["out_ema"], "EMA weights")
    assert (rdm.cfg.T, rdm.cfg.beta_start, rdm.cfg.beta_end) == (
        c["T"],
        c["beta_start"],
        c["beta_end"],
    )


def test_official_rdm_file_loads_with_weights_only(reference, tmp_path):
    """A main_rdm.py checkpoint as released (weights, optimizer, scaler, epoch and its argparse
    args) loads with torch.load(weights_only=True); a file of another kind is one line of usage
    error."""
    sd = reference("rcg", "rdm")["state_dict"]
    torch.save(
        dict(
            model=sd,
            model_ema=None,
            optimizer=dict(state={}, param_groups=[]),
            epoch=5,
            scaler={},
            args=argparse.Namespace(lr=5.12e-4, output_dir="out", blr=1e-6),
        ),
        tmp_path / "rdm.pth",
    )
    rdm, ref = R.load_official_rdm(str(tmp_path / "rdm.pth")), R.load_official_rdm(sd)
    assert all(
        torch.equal(a, b) for a, b in zip(rdm.state_dict().values(), ref.state_dict().values())
    )
    # not an allowed type
    torch.save(dict(model=sd, made=datetime.date(2024, 1, 1)), tmp_path / "other.pth")
    with pytest.raises(common.UsageError):
        R.load_official_rdm(str(tmp_path / "other.pth"))


def test_official_rdm_loss(reference, monkeypatch):
    """Betas, abar, the standardisation of the representations, the r_t the network gets and its
    output (float64); the x0 loss at fixed t and noise, and with the official run's own draws (t,
    then the noise)."""
    lo = reference("rcg", "loss")
    fed_sinusoid(monkeypatch, lo)
    sd = reference("rcg", "rdm")["state_dict"]
    rdm = R.load_official_rdm(sd, ema=False).double().train()
    assert_close64(R.betas_linear_sqrt(1000, 0.0015, 0.0195), lo["betas"], "betas")
    # the official abar is a float32 buffer (ddpm.py:120); ours, float64, rounds to the same numbers
    assert_close64(rdm.abar.float(), lo["alphas_cumprod"], "abar")
    assert_close64(R.standardise(lo["raw"]), lo["rep"], "standardised r")
    seen = []
    hook = rdm.net.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    loss = rdm(lo["rep"], lo["t"], lo["e"])
    hook.remove()
    assert_close64(seen[0][0], lo["r_t"], "r_t")
    assert_close64(seen[0][1], lo["out"], "network output")
    # ours rounds the network's output to float32 before the loss (.float(): a true-fp32 loss)
    assert_close32(loss, lo["loss"], "loss")
    with Draws.feed(as_ours(lo["drawn"])):
        loss_drawn = rdm(lo["rep"])
    assert_close32(loss_drawn, lo["loss_drawn"], "loss with the official draws")


def test_official_ddim(reference):
    """The official DDIM (eta 1 and 0) on its grid, from the official run's own draws (the initial
    noise, then one a step). float32: the official sampler's tables are float32, and so are ours."""
    rdm = R.load_official_rdm(reference("rcg", "rdm")["state_dict"])
    seen = []

    def record_step(module, args):  # the step each network call gets
        seen.append(args[1][0].item())

    for run in reference("rcg", "ddim")["runs"]:
        seen.clear()
        hook = rdm.net.register_forward_pre_hook(record_step)
        with Draws.feed(as_ours(run["drawn"])):
            out = rdm.sample(3, steps=run["steps"], eta=run["eta"])
        hook.remove()
        assert seen == run["timesteps"].flip(0).tolist(), (run["steps"], seen)
        assert_close32(out, run["out"], f"steps {run['steps']}, eta {run['eta']}")


def test_official_dit(reference, monkeypatch):
    """RCG's DiT (3 channels, no learned-sigma half) loads as it is (x_embedder, t_embedder,
    y_embedder, rep_embedder, fake_latent, pos_embed, blocks, final_layer); the same output with r,
    with the null r, without r (c = t + y), guided, and in training with r dropped by the official
    run's own draw. float64."""
    ref = reference("rcg", "dit")
    fed_sinusoid(monkeypatch, ref)
    c = ref["config"]
    cfg = R.Config(**{k: v for k, v in c.items() if k != "rep_dim"}, rep_cfg=ref["cfg_scale"])
    model = R.RCG(cfg, c["rep_dim"]).eval()
    net = model.net
    net.load_state_dict(ref["state_dict"])
    # both round a float64 sin-cos table to float32
    pos = R.sincos_2d(c["image_size"] // c["patch"], c["hidden"])[None]
    assert_close32(pos, ref["state_dict"]["pos_embed"], "pos_embed")
    model.double()
    x, t, rep = ref["x"], ref["t"], ref["rep"]
    null = net.fake_latent.expand(len(x), -1)
    with torch.no_grad():
        assert_close64(net(x, t, rep), ref["out_rep"], "with r")
        assert_close64(net(x, t, null), ref["out_null"], "with the null r")
        assert_close64(net(x, t), ref["out_uncond"], "without r")
        guided = [
            model.velocity(x[i : i + 1], t[i].item(), rep[i : i + 1], ref["cfg_scale"])
            for i in range(len(x))
        ]
        # velocity returns float32 (.float(): the samplers run in true fp32): compared in fp32
        assert_close32(torch.cat(guided), ref["out_cfg"], "guided")
        net.train()
        with Draws.feed(as_ours(ref["drawn"])):
            assert_close64(net(x, t, rep), ref["out_train"], "training, r dropped")


def test_official_draw_order():
    """Each official order of draws, replayed on this machine's RNG, against ours under
    Draws.record(): the same functions, shapes (the RDM's [B, D] for the official [B, D, 1, 1])
    and values, in the same order."""

    def same(ours, official):
        assert [name for name, _ in ours] == [name for name, _ in official]
        for a, b in zip(as_ours(ours), as_ours(official)):
            assert a.shape == b.shape and torch.equal(a, b)

    rdm = R.RDM(tiny_cfg(T=1000), 16)
    r = torch.randn(4, 16)
    # the RDM's loss: t (ddpm.py:624 torch.randint), then the noise (ddpm.py:661 torch.randn_like)
    torch.manual_seed(0)
    t = torch.randint(0, 1000, (4,))
    official = [("randint", t), ("randn_like", torch.randn_like(torch.zeros(4, 16, 1, 1)))]
    torch.manual_seed(0)
    with Draws.record() as ours:
        rdm(r)
    same(ours, official)
    # DDIM: the initial noise (ddim.py:119 torch.randn), then one draw a step, at eta 0 too
    # (ddim.py:196 noise_like: util.py:266 torch.randn)
    for eta in (1.0, 0.0):
        torch.manual_seed(1)
        official = [("randn", torch.randn(3, 16, 1, 1)) for _ in range(1 + 10)]
        torch.manual_seed(1)
        with Draws.record() as ours:
            rdm.eval().sample(3, steps=10, eta=eta)
        same(ours, official)
    # the DiT in training: which r to drop (models.py:286 torch.rand(x.size(0)))
    net = R.DiT(tiny_cfg(rep_drop=0.5), 8).train()
    x, t, rep = torch.randn(4, 3, 16, 16), torch.rand(4), torch.randn(4, 8)
    torch.manual_seed(2)
    official = [("rand", torch.rand(4))]
    torch.manual_seed(2)
    with Draws.record() as ours:
        net(x, t, rep)
    same(ours, official)


def official_stand_ins():
    """sys.modules entries for what make_rcg.py imports from the official checkout (and from
    omegaconf), built from this file's classes: the API the maker uses, nothing more (the numbers
    they give are not the official ones)."""

    class SimpleMLP(R.SimpleMLP):
        """latentmlp.SimpleMLP's call: x [B, D, 1, 1], t, context."""

        def forward(self, x, t, context=None):
            return super().forward(x.flatten(1), t).view(x.shape)

    class RDM(torch.nn.Module):
        """ddpm.RDM as the maker drives it (x0-parameterised), on rcg.RDM."""

        def __init__(self, channels, timesteps, linear_start, linear_end, unet_config, **rest):
            super().__init__()
            p = unet_config["params"]
            cfg = R.Config(
                rdm_width=p["model_channels"],
                rdm_depth=p["num_res_blocks"],
                T=timesteps,
                beta_start=linear_start,
                beta_end=linear_end,
            )
            self.ours = R.RDM(cfg, channels)
            self.ours.net = SimpleMLP(channels, cfg.rdm_width, cfg.rdm_depth, p["time_embed_dim"])
            self.model = torch.nn.Module()
            self.model.diffusion_model = self.ours.net
            # LitEma: the parameters as buffers, named without dots
            self.model_ema = torch.nn.Module()
            for name, w in self.ours.net.named_parameters():
                self.model_ema.register_buffer(name.replace(".", ""), w.detach().clone())
            self.register_buffer("alphas_cumprod", self.ours.abar.float())

        def ema_scope(self):
            return contextlib.nullcontext()

        def get_learned_conditioning(self, c):
            return torch.zeros(len(c["class_label"]), 1, 512)

        def apply_model(self, x, t, cond):
            return self.model.diffusion_model(x, t, cond)

        def get_input(self, batch, key):
            rep = R.standardise(self.pretrained_encoder.forward_features(batch[key]))
            return [rep[..., None, None], batch]

        def p_losses(self, x, cond, t, noise):
            return self.ours(x.flatten(1), t, noise.flatten(1)), {}

        def forward(self, x, c):
            return self.ours(x.flatten(1)), {}

    class DDIMSampler:
        """ddim.DDIMSampler.sample, on rcg.RDM.sample."""

        def __init__(self, model):
            self.model = model

        def sample(self, S, conditioning, batch_size, shape, eta, verbose):
            T = self.model.ours.cfg.T
            self.ddim_timesteps = np.arange(0, T, T // S) + 1
            x = self.model.ours.sample(batch_size, steps=S, eta=eta)
            return x.view(batch_size, *shape), None

    class DiT(R.DiT):
        """models.DiT's constructor and calls, on rcg.DiT (whose names are the official ones)."""

        def __init__(
            self,
            input_size,
            patch_size,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            class_dropout_prob,
            rep_dropout_prob,
            num_classes,
            learn_sigma,
            rep_dim,
        ):
            cfg = R.Config(
                image_size=input_size,
                patch=patch_size,
                hidden=hidden_size,
                depth=depth,
                heads=num_heads,
                rep_drop=rep_dropout_prob,
            )
            super().__init__(cfg, rep_dim)

        def forward(self, x, t, y, rep=None):
            return super().forward(x, t / 1000, rep)

        def forward_with_cfg(self, x, t, y, cfg_scale, rep):
            half = x[: len(x) // 2]
            cond, uncond = self(torch.cat([half, half]), t, y, rep).chunk(2)
            guided = uncond + cfg_scale * (cond - uncond)
            return torch.cat([guided, guided])

    def betas(schedule, n, linear_start, linear_end):
        return R.betas_linear_sqrt(n, linear_start, linear_end).numpy()

    def load(path):
        params = dict(
            timesteps=1000,
            linear_start=0.0015,
            linear_end=0.0195,
            parameterization="x0",
            channels=256,
            unet_config=dict(params={}),
            pretrained_enc_config={},
        )
        return dict(model=dict(params=params))

    attrs = {
        "omegaconf": dict(OmegaConf=types.SimpleNamespace(load=load, to_container=lambda c: c)),
        "rdm.util": dict(instantiate_from_config=lambda conf: RDM(**conf["params"])),
        "rdm.models.diffusion.ddim": dict(DDIMSampler=DDIMSampler),
        "rdm.modules.diffusionmodules.util": dict(make_beta_schedule=betas),
        "pixel_generator.dit.models": dict(DiT=DiT),
    }
    modules = {}
    for name, names in attrs.items():
        modules[name] = types.ModuleType(name)
        modules[name].__dict__.update(names)
    return modules


def test_official_maker_runs_with_stand_ins(monkeypatch, tmp_path, capsys):
    """tests/reference/make_rcg.py's make() and bench() run on stand-ins for the official modules
    (no checkout): what the maker asks of the official API, and of this file's (rcg.DiT,
    rcg.SimpleMLP, ...), is still there."""
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.syspath_prepend(os.path.join(here, "reference"))
    import make_rcg
    import make_references

    monkeypatch.setattr(make_references, "OUT", str(tmp_path))
    monkeypatch.setattr(make_rcg, "official", lambda method, repos, *sub: str(tmp_path))
    for name, module in official_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, module)
    make_rcg.make(str(tmp_path))
    made = ["rcg_ddim.pt", "rcg_dit.pt", "rcg_loss.pt", "rcg_rdm.pt"]
    assert sorted(os.listdir(tmp_path)) == made
    dit = dict(image_size=8, patch=2, hidden=32, depth=1, heads=2, rep_dim=8, rep_drop=0.1)
    rdm = dict(make_rcg.RDM_CONFIG, rdm_width=32, rdm_depth=1)
    capsys.readouterr()
    make_rcg.bench(str(tmp_path), batch=2, repeats=1, dit=dit, rdm=rdm)
    assert capsys.readouterr().out.count("ours/official") == 2
