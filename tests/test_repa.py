import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Draws, assert_close32, assert_close64, detail_bounded

import common
import repa as R

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")

TINY = ["--preset", "tiny", "--device", "cpu"]


def test_signal_fraction_of_x_t():
    # x_t = (1 - t) x + t e (Eq. 2): t = 0 is clean, so 90% signal is t = 0.1
    assert R.t_at_signal(0.9) == pytest.approx(0.1)
    assert R.t_at_signal(0.25) == 0.75


def test_projector_shapes():
    h = R.projector(64, 2048, 384)
    assert [type(m).__name__ for m in h] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert h(torch.randn(2, 16, 64)).shape == (2, 16, 384)  # every token


def test_align_loss_by_hand():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, N=2, D=2]
    assert R.align_loss(a, 3 * a).item() == pytest.approx(-1.0)  # same directions, any scale
    assert R.align_loss(a, -a).item() == pytest.approx(1.0)
    # orthogonal
    assert R.align_loss(a, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])).item() == pytest.approx(0.0)
    # one token aligned (cos 1), one at 60 degrees (cos 0.5): mean -0.75
    b = torch.tensor([[[1.0, 0.0], [math.sin(math.pi / 3), 0.5]]])
    assert R.align_loss(a, b).item() == pytest.approx(-0.75)
    # normalised in fp32: fp16 tokens whose squared norm overflows fp16 (the official fp16 NaNs),
    # and under autocast
    with torch.autocast("cpu", torch.bfloat16):
        for dtype in (torch.float16, torch.bfloat16):
            loss = R.align_loss((300 * a).to(dtype), (300 * b).to(dtype))
            assert loss.dtype == torch.float32 and loss.item() == pytest.approx(-0.75, abs=1e-2), (
                dtype
            )


def test_to_grid_interpolation():
    z = torch.randn(2, 16, 5)
    assert torch.equal(R.to_grid(z, 4), z)
    # a 2x2 grid whose value is its column index, to 4x4 (bilinear, half-pixel centres): columns 0,
    # .25, .75, 1
    # row-major tokens (r0c0, r0c1, r1c0, r1c1)
    cols = torch.tensor([0.0, 1.0, 0.0, 1.0]).view(1, 4, 1)
    out = R.to_grid(cols, 4).view(4, 4)  # [rows, cols]
    assert torch.allclose(out, torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4))


def test_proj_coeff_zero_is_exactly_the_baseline():
    cfg = R.Config(**R.PRESETS["tiny"])
    aligned = R.REPA(cfg, enc_dim=384)
    base = R.REPA(R.Config(**dict(R.PRESETS["tiny"], proj_coeff=0.0)))
    base.net.load_state_dict(
        {k: v for k, v in aligned.net.state_dict().items() if not k.startswith("projectors.")}
    )
    assert len(base.net.projectors) == 0
    x, y, z = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.randn(4, 4, 384)
    torch.manual_seed(0)
    loss_a, terms = aligned(x, y, z)
    torch.manual_seed(0)
    loss_b, _ = base(x, y)
    assert torch.equal(loss_b, terms["loss_v"])
    assert torch.allclose(loss_a, loss_b + 0.5 * terms["loss_align"])
    assert -1 <= terms["loss_align"].item() <= 1


def _gaussian_velocity(mu, sigma):
    """The exact v(x, t) = E[e | x_t] - E[x | x_t] for data N(mu, sigma^2) under x_t = (1 - t) x + t
    e: linear in x."""

    def v(x, t):
        m, s2 = (1 - t) * mu, (1 - t) ** 2 * sigma**2 + t**2
        return (t - (1 - t) * sigma**2) / s2 * (x - m) - mu

    return v


def test_samplers_integrate_a_known_velocity_field():
    mu, sigma = 0.5, 0.2
    z = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def v2(x, t, t_cfg=None):
        return _gaussian_velocity(mu, sigma)(x, t)

    err = {
        (n, heun): (R.sample_ode(v2, z.clone(), n, heun) - (mu + sigma * z)).abs().max().item()
        # the exact flow map of a Gaussian: x_0 = mu + sigma z
        for n in (50, 200)
        for heun in (True, False)
    }
    # Heun: second order (16x for 4x steps)
    assert err[50, True] < 5e-3 and err[200, True] < err[50, True] / 8, err
    # Euler: first order
    assert err[200, False] < err[50, False] / 3 and err[50, True] < err[50, False] / 4, err
    # SDE on REPA's grid: v is evaluated at exactly linspace(1, 0.04, N), once each
    calls, v = [], _gaussian_velocity(mu, sigma)
    R.sample_sde(
        lambda x, t: calls.append(t) or v(x, t), z[:10].clone(), 7, torch.Generator().manual_seed(1)
    )
    assert calls == pytest.approx(
        torch.linspace(1, 0.04, 7, dtype=torch.float64).tolist(), abs=1e-12
    )
    # Euler-Maruyama down to t = 0.04 reaches the marginal N((1 - t) mu, (1 - t)^2 sigma^2 + t^2);
    # the last step to 0 is the mean of an EM step, x - t ((2 - t) v + x), affine in x with slope a:
    # the end is N(mu, (a sd)^2), a bit narrower than the data (0.188 here, not 0.2); a plain Euler
    # ODE step from 0.04 would give 0.196
    x = R.sample_sde(v, z.clone(), 250, torch.Generator().manual_seed(1))
    t = 0.04
    s2 = (1 - t) ** 2 * sigma**2 + t**2
    a = 1 - t * ((2 - t) * (t - (1 - t) * sigma**2) / s2 + 1)
    assert abs(x.mean().item() - mu) < 0.005
    assert abs(x.std().item() - a * math.sqrt(s2)) < 0.003, (x.std().item(), a * math.sqrt(s2))


def test_train_sample_eval(cli, tmp_path, few_probe_images):
    """Grids only at multiples of sample_every; eval at step 40 beats eval at step 6 (FD); the
    `_init` and encoder figures do not depend on the step (probes on 400 / 200 images). Resume:
    test_contract."""
    few_probe_images(400, 200)
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(R, ["train", *TINY, "--steps", 6, "--out", a]) == 0
    assert cli(R, ["train", *TINY, "--steps", 40, "--out", b]) == 0
    assert sorted(p.name for p in b.glob("*.png")) == [
        f"samples_{k:07d}.png" for k in (10, 20, 30, 40)
    ]
    evals = {}
    for run in (a, b):
        assert cli(R, ["eval", "--ckpt", run / "ckpt.pt", "--n", 100, "--sample-steps", 8]) == 0
        evals[run] = json.load(open(run / "eval.json"))
    row = json.loads(open(a / "log.jsonl").readline())
    assert row["loss"] == pytest.approx(row["loss_v"] + 0.5 * row["loss_align"], rel=1e-5)
    one, trained = evals[a], evals[b]
    assert trained["step"] == 40 and trained["fd_model"] == "pixels" and trained["n_samples"] == 100
    assert trained["fd"] < 0.85 * one["fd"], (trained["fd"], one["fd"])  # measured: 43 against 59
    for k in (
        "probe_linear_init",
        "probe_knn_init",
        "detail_pattern_init",
        "detail_amplitude_init",
        "encoder_probe_linear",
        "encoder_probe_knn",
    ):
        assert trained[k] == one[k], k
    assert trained["encoder"] == "random-vit-s@28" and "block 1/2" in trained["probe"]
    assert [f for f, _ in trained["probe_linear_by_signal"]] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert all(0 <= acc <= 1 for _, acc in trained["probe_linear_by_signal"])
    detail_bounded(trained)
    detail_bounded(trained, "_init")
    for sampler in ("ode", "sde"):
        out = tmp_path / f"{sampler}.npz"
        assert (
            cli(
                R, ["sample", "--ckpt", b / "ckpt.pt", "--n", 6, "--sampler", sampler, "--out", out]
            )
            == 0
        )
        arr = np.load(out)["arr_0"]
        assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert (np.load(tmp_path / "ode.npz")["arr_0"] != np.load(tmp_path / "sde.npz")["arr_0"]).any()


def test_frozen_encoder_runs_in_bf16_on_a_gpu(cli, tmp_path, monkeypatch):
    """With bf16 autocast (a GPU; here REPDIFF_CPU_BF16=1) the frozen encoder's forward runs in
    bf16, as under the official train.py's mixed precision; the loss stays finite and close to the
    fp32 run's."""
    dtypes, load = [], common.load_encoder

    def spy(*args):  # records the dtype of the encoder's first matmul
        encoder = load(*args)
        encoder.net.blocks[0].attn.qkv.register_forward_hook(
            lambda m, i, out: dtypes.append(out.dtype)
        )
        return encoder

    monkeypatch.setattr(common, "load_encoder", spy)
    rows = {}
    for bf16 in ("0", "1"):
        monkeypatch.setenv("REPDIFF_CPU_BF16", bf16)
        assert cli(R, ["train", *TINY, "--steps", 1, "--out", tmp_path / bf16]) == 0
        rows[bf16] = json.loads(open(tmp_path / bf16 / "log.jsonl").readline())
    assert dtypes == [torch.float32, torch.bfloat16]
    for k in ("loss", "loss_v", "loss_align"):
        assert math.isfinite(rows["1"][k]) and rows["1"][k] == pytest.approx(
            rows["0"][k], abs=0.02
        ), k


def test_eval_features_in_true_fp32(monkeypatch):
    """Eval reads the SiT (its probes, detail and x_hat) in true fp32: autocast and TF32 off, also
    in a bf16 region."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    model = R.REPA(R.Config(**R.PRESETS["tiny"]), 384).eval()
    seen = []
    qkv = model.net.blocks[0].attn.qkv  # the first matmul: its flag and its output's dtype
    qkv.register_forward_hook(
        lambda m, a, out: seen.append((torch.backends.cuda.matmul.allow_tf32, out.dtype))
    )
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        xs = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
        with common.autocast(torch.device("cpu")):
            R.at_t(model, xs, 0.25, torch.device("cpu"))
            R.at_t(model, xs, 0.25, torch.device("cpu"), x_hat=True)
        assert seen == [(False, torch.float32)] * 2
        assert torch.backends.cuda.matmul.allow_tf32  # put back
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_baseline_run_and_bad_inputs(cli, tmp_path, capsys):
    assert cli(R, ["train", *TINY, "--steps", 3, "--proj-coeff", 0, "--out", tmp_path / "sit"]) == 0
    assert "loss_align" not in json.loads(open(tmp_path / "sit" / "log.jsonl").readline())
    assert cli(R, ["train", *TINY, "--encoder", "resnet50", "--out", tmp_path / "x"]) == 2
    assert "unknown --encoder" in capsys.readouterr().err
    assert cli(R, ["train", *TINY, "--image-size", 18, "--out", tmp_path / "y"]) == 2
    assert "not divisible by the patch size" in capsys.readouterr().err
    # the tiny SiT has 2
    assert cli(R, ["train", *TINY, "--set", "align_depth=3", "--out", tmp_path / "z"]) == 2
    assert "align_depth 3" in capsys.readouterr().err
    sample = ["sample", "--ckpt", tmp_path / "sit" / "ckpt.pt", "--out", tmp_path / "s.npz"]
    assert cli(R, [*sample, "--n", 0]) == 2
    assert "--n" in capsys.readouterr().err
    assert cli(R, [*sample, "--cfg-scale", -1]) == 2
    assert "--cfg-scale" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_precomputed_latents(cli, tmp_path, capsys):
    """--latents: the SiT models the float latents of train_latents.npy in a folder (memory-mapped)
    while the encoder reads the same rows' images."""
    images, labels = common._shapes("shapes:300", "train", 16)
    # a stand-in for a VAE: [N,3,16,16] -> 8x8
    pooled = F.avg_pool2d(common.to_float(torch.from_numpy(images)), 2)
    # the label as a channel [N,1,8,8]
    code = torch.from_numpy(labels).float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    latents = torch.cat([pooled, code], 1).numpy()  # [N,4,8,8]
    path = tmp_path / "lat"  # no test_*.npy: the test split is split_rows' tenth
    path.mkdir()
    np.save(path / "train_images.npy", images.transpose(0, 2, 3, 1))
    np.save(path / "train_labels.npy", labels)
    # half precision is read as float32
    np.save(path / "train_latents.npy", latents.astype(np.float16))
    # the batches of latents and of images are the same rows (flips included)
    lat_b, y_l = common.batch(
        torch.from_numpy(latents), torch.from_numpy(labels), 8, 0, 3, 0, flip=True, device="cpu"
    )
    img_b, y_i = common.batch(
        torch.from_numpy(images), torch.from_numpy(labels), 8, 0, 3, 0, flip=True, device="cpu"
    )
    assert torch.equal(y_l, y_i) and torch.allclose(lat_b[:, :3], F.avg_pool2d(img_b, 2), atol=1e-5)
    # so are eval's uniform probe subsets: each latent beside its own image and label (split_rows,
    # then subset)
    cfg = R.Config(**dict(R.PRESETS["tiny"], latents=True))
    s_tr, x_tr, y_tr, s_te, x_te, y_te = R.probe_data(cfg, str(path))
    assert len(s_tr) == len(x_tr) == len(y_tr) == 270 and len(s_te) == len(x_te) == len(y_te) == 30
    for s, x, y in ((s_tr, x_tr, y_tr), (s_te, x_te, y_te)):
        assert torch.equal(s[:, 3, 0, 0].long(), y)
        assert torch.allclose(s[:, :3], F.avg_pool2d(common.to_float(x), 2), atol=1e-3)
    run = tmp_path / "run"
    assert cli(R, ["train", *TINY, "--data", path, "--latents", "--steps", 3, "--out", run]) == 0
    sd = torch.load(run / "ckpt.pt", weights_only=True)
    assert sd["config"]["channels"] == 4 and sd["config"]["image_size"] == 8
    assert sd["model"]["net.x_embedder.proj.weight"].shape[1] == 4
    assert (
        cli(R, ["sample", "--ckpt", run / "ckpt.pt", "--n", 5, "--out", tmp_path / "new" / "s.npz"])
        == 0
    )
    assert np.load(tmp_path / "new" / "s.npz")["latents"].shape == (5, 4, 8, 8)
    assert cli(R, ["eval", "--ckpt", run / "ckpt.pt"]) == 0
    res = json.load(open(run / "eval.json"))
    assert res["fd"] is None and res["n_samples"] is None and res["step"] == 3
    # shapes has no latents
    assert cli(R, ["train", *TINY, "--latents", "--out", tmp_path / "bad"]) == 2
    assert "--latents needs --data DIR with train_latents.npy" in capsys.readouterr().err
    (path / "train_latents.npy").unlink()
    assert cli(R, ["train", *TINY, "--data", path, "--latents", "--out", tmp_path / "bad"]) == 2
    assert "no train_latents.npy" in capsys.readouterr().err


def test_paper_preset_is_the_official_recipe(cli, tmp_path, capsys):
    """`--preset paper` against the official README's SiT-XL/2 run (train.py's flags and defaults,
    models/sit.py's SiT-XL/2) and its evaluation command, value by value; the lr stays fixed at any
    batch; without --data DIR of latents the run stops with the layout to pass."""
    expected = dict(
        data="imagenet",  # sihyun-yu/REPA@67f7145 README.md:36 (ImageNet, --data-dir)
        # sihyun-yu/REPA@67f7145 train.py:296 (the SiT models sample_posterior of the VAE features)
        latents=True,
        # sihyun-yu/REPA@67f7145 train.py:155 (latent_size = resolution // 8), :406 (256): 32
        image_size=32,
        channels=4,  # sihyun-yu/REPA@67f7145 models/sit.py:169 (in_channels=4)
        # sihyun-yu/REPA@67f7145 preprocessing/encoders.py:74 (cat([mean, std]): 2 x 4 channels),
        # train.py:74 (chunk(moments, 2))
        vae_channels=4,
        vae_scale=0.18215,  # sihyun-yu/REPA@67f7145 train.py:179-181 (latents_scale)
        patch=2,  # sihyun-yu/REPA@67f7145 models/sit.py:350 (SiT_XL_2 patch_size=2; README.md:49)
        hidden=1152,  # sihyun-yu/REPA@67f7145 models/sit.py:350 (hidden_size=1152)
        depth=28,  # sihyun-yu/REPA@67f7145 models/sit.py:350 (depth=28)
        heads=16,  # sihyun-yu/REPA@67f7145 models/sit.py:350 (num_heads=16)
        # sihyun-yu/REPA@67f7145 README.md:50 (--enc-type=dinov2-vit-b), utils.py:93 (torch.hub
        # dinov2_vitb14)
        encoder="dinov2_vitb14",
        align_depth=8,  # sihyun-yu/REPA@67f7145 README.md:52 (--encoder-depth=8)
        proj_dim=2048,  # sihyun-yu/REPA@67f7145 models/sit.py:180 (projector_dim=2048)
        proj_coeff=0.5,  # sihyun-yu/REPA@67f7145 README.md:51 (--proj-coeff=0.5)
        # sihyun-yu/REPA@67f7145 train.py:434 (--cfg-prob 0.1), models/sit.py:176
        # (class_dropout_prob=0.1)
        label_drop=0.1,
        num_classes=1000,  # sihyun-yu/REPA@67f7145 train.py:399 (--num-classes 1000)
        # sihyun-yu/REPA@67f7145 README.md:138 (the checkpoint of the final evaluation: 4M
        # iterations; 4e6 x 256 / 1,281,167 = 799.3 epochs, the paper's 800)
        steps=4_000_000,
        batch_size=256,  # sihyun-yu/REPA@67f7145 train.py:407 (--batch-size 256)
        lr=1e-4,  # sihyun-yu/REPA@67f7145 train.py:418 (--learning-rate 1e-4)
        grad_clip=1.0,  # sihyun-yu/REPA@67f7145 train.py:423 (--max-grad-norm 1.0), :317
        # sihyun-yu/REPA@67f7145 train.py:199 (a constant lr), :204-210 (AdamW, no scheduler)
        warmup=0,
        ema=0.9999,  # sihyun-yu/REPA@67f7145 train.py:81 (update_ema decay=0.9999), :322
        sampler="sde",  # sihyun-yu/REPA@67f7145 README.md:132 (--mode=sde)
        sample_steps=250,  # sihyun-yu/REPA@67f7145 README.md:133 (--num-steps=250)
        cfg_scale=1.8,  # sihyun-yu/REPA@67f7145 README.md:134 (--cfg-scale=1.8)
        # sihyun-yu/REPA@67f7145 generate.py:206 (--guidance-low 0), README.md:135
        # (--guidance-high=0.7)
        cfg_interval=[0.0, 0.7],
        ckpt_every=50_000,  # sihyun-yu/REPA@67f7145 train.py:416 (--checkpointing-steps 50000)
        seed=0,  # sihyun-yu/REPA@67f7145 README.md:45 (--seed=0)
    )
    cfg = R.Config(**R.PRESETS["paper"])
    assert {key: getattr(cfg, key) for key in expected} == expected
    # everything else is the run's bookkeeping, as the default's
    default = R.Config()
    rest = {f for f in vars(cfg) if f not in expected}
    assert {f: getattr(cfg, f) for f in rest} == {f: getattr(default, f) for f in rest}
    # the lr is fixed at any batch (sihyun-yu/REPA@67f7145 train.py:204-210 uses
    # --learning-rate as it is)
    parser = common.make_parser(R.__doc__, R.PRESETS)[0]
    for batch in ("256", "1024"):
        argv = ["train", "--preset", "paper", "--batch-size", batch, "--out", str(tmp_path)]
        cfg = R.make_config(parser.parse_args(argv))
        assert (cfg.batch_size, cfg.lr) == (int(batch), 1e-4)
    # ImageNet's latents are the user's: a usage error before any work, no run folder
    assert cli(R, ["train", "--preset", "paper", "--device", "cpu", "--out", tmp_path / "p"]) == 2
    assert "--latents needs --data DIR with train_latents.npy" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_paper_b_preset_is_the_official_recipe():
    """`--preset paper-B`: `paper` with SiT-B/2 (align block 4) for train.py's default 400k steps,
    sampled without CFG (the paper's SiT-B/2 + REPA at 400k: FID 24.4)."""
    expected = dict(
        R.PRESETS["paper"],
        hidden=768,  # sihyun-yu/REPA@67f7145 models/sit.py:368 (SiT_B_2 hidden_size=768)
        depth=12,  # sihyun-yu/REPA@67f7145 models/sit.py:368 (depth=12)
        heads=12,  # sihyun-yu/REPA@67f7145 models/sit.py:368 (num_heads=12)
        # the authors, github.com/sihyun-yu/REPA/issues/5: layer 4 for SiT-B/2 (README.md:52's 8
        # is SiT-XL/2's)
        align_depth=4,
        steps=400_000,  # sihyun-yu/REPA@67f7145 train.py:415 (--max-train-steps 400000)
        # the paper's comparison at 400k is without CFG: generate.py --cfg-scale=1.0
        # (sihyun-yu/REPA@67f7145 generate.py:90, using_cfg = cfg_scale > 1.0)
        cfg_scale=1.0,
    )
    assert R.PRESETS["paper-B"] == expected
    cfg = R.Config(**R.PRESETS["paper-B"])
    assert (cfg.patch, cfg.sampler, cfg.sample_steps) == (2, "sde", 250)


def test_posterior_sampled_by_hand():
    """sample_posterior: [mean, std] on channels -> z = (mean + std e) x 0.18215 (official
    train.py:71-77, the scale of :179-181), e the recorded noise; step_generator's e is a function
    of (seed, step, rank) alone (a resumed step draws it again), apart from the global RNG."""
    mean = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    std = torch.tensor([0.5, 3.0]).view(1, 2, 1, 1)
    e = torch.tensor([0.2, -1.0]).view(1, 2, 1, 1)
    with Draws.feed([e]):
        z = R.sample_posterior(torch.cat([mean, std], 1), 0.18215)
    # (1 + 0.5 x 0.2) x 0.18215 and (-2 + 3 x -1) x 0.18215
    assert z.shape == (1, 2, 1, 1)
    assert torch.allclose(z.view(2), torch.tensor([1.1 * 0.18215, -5 * 0.18215]))
    moments = torch.cat([torch.randn(4, 4, 2, 2), torch.rand(4, 4, 2, 2)], 1)
    state = torch.get_rng_state()
    a = R.sample_posterior(moments, 0.18215, R.step_generator(0, 7, 1))
    assert torch.equal(a, R.sample_posterior(moments, 0.18215, R.step_generator(0, 7, 1)))
    assert torch.equal(state, torch.get_rng_state())
    # another step, rank or seed: another e
    for other in ((0, 8, 1), (0, 7, 0), (1, 7, 1)):
        assert not torch.equal(a, R.sample_posterior(moments, 0.18215, R.step_generator(*other)))


def test_posterior_file_is_sampled_every_step(cli, tmp_path, monkeypatch):
    """A train_latents.npy of 2C = 8 channels (the official preprocessing's [mean, std]): the SiT
    models C = 4, and step s trains on sample_posterior of its rows with step_generator(seed, s,
    rank); eval's probes read the mean x vae_scale."""
    images, labels = common._shapes("shapes:100", "train", 16)
    # a stand-in for the VAE's mean [N,4,8,8] and std [N,4,8,8]
    pooled = F.avg_pool2d(common.to_float(torch.from_numpy(images)), 2)  # [N,3,8,8]
    mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)
    std = 0.1 + 0.05 * torch.rand(mean.shape, generator=torch.Generator().manual_seed(0))
    moments = torch.cat([mean, std], 1)
    path = tmp_path / "lat"
    path.mkdir()
    np.save(path / "train_images.npy", images.transpose(0, 2, 3, 1))
    np.save(path / "train_labels.npy", labels)
    np.save(path / "train_latents.npy", moments.numpy())
    seen, forward = [], R.REPA.forward

    def recording(self, x, y, z_enc=None):
        seen.append(x.clone())
        return forward(self, x, y, z_enc)

    monkeypatch.setattr(R.REPA, "forward", recording)
    run = tmp_path / "run"
    argv = ["train", *TINY, "--data", path, "--latents", "--set", "grid=0", "--steps"]
    assert cli(R, [*argv, 2, "--out", run]) == 0
    assert R.Config(**torch.load(run / "ckpt.pt", weights_only=True)["config"]).channels == 4
    # the training split's rows (split_rows: no test_*.npy)
    rows = torch.from_numpy(common.split_rows(len(moments), "train"))
    train_moments, train_labels = moments[rows], torch.from_numpy(labels)[rows]
    assert len(seen) == 2
    for step, x in enumerate(seen):
        batch = common.batch(train_moments, train_labels, 16, 0, step, 0, flip=False, device="cpu")
        z = R.sample_posterior(batch[0], 0.18215, R.step_generator(0, step, 0))
        assert z.shape == (16, 4, 8, 8) and torch.equal(x, z), step
    # exact resume: 2 steps then 1 more is 3 steps (no --preset: tiny's image_size is not the
    # latents' 8, which the run filled in)
    resume = ["train", "--device", "cpu", "--data", path, "--steps", 3, "--resume"]
    assert cli(R, [*resume, "--out", run]) == 0
    assert cli(R, [*argv, 3, "--out", tmp_path / "straight"]) == 0
    resumed = torch.load(run / "ckpt.pt", weights_only=True)["model"]
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert torch.equal(seen[2], seen[5])
    cfg = R.Config(**dict(R.PRESETS["tiny"], latents=True))
    s_tr, x_tr, *_ = R.probe_data(cfg, str(path))
    first = rows[common.subset(len(rows), len(x_tr))[0]]
    assert s_tr.shape[1] == 4 and torch.allclose(s_tr[0], mean[first] * 0.18215)
    # any other channel count is read as the latents themselves
    cfg = R.Config(**dict(R.PRESETS["tiny"], latents=True, vae_channels=8, data=str(path)))
    assert R.load_data(cfg, "train")[0].shape[1] == 8 and cfg.channels == 8


# ------------------------------------------------------ against the official code (tests/reference)
# Fixtures made by tests/reference/make_repa.py from sihyun-yu/REPA's models/sit.py, loss.py and
# samplers.py, run in float64 there. Every draw the official code made is stored in its order and
# fed to ours with Draws.feed: no test relies on a seed reproducing them. The network runs in
# float64 here too (conftest's assert_close64). The loss and the samplers are compared in fp32
# (assert_close32), as ours computes them: repa.py takes L_v from v_pred.float() and normalises the
# alignment in fp32 (for bf16 autocast), and its samplers call the SiT on x.float() (velocity(), as
# the official samplers do with generate.py's fp32 latents), their state float64 as officially.
def _official(reference, name, float64=False):
    """The fixture and this file's REPA with its state dict loaded unchanged (strict: the official
    names); float64: ours in float64."""
    ref = reference("repa", name)
    cfg = dict(ref["config"])
    model = R.REPA(R.Config(**{k: v for k, v in cfg.items() if k != "z_dim"}), enc_dim=cfg["z_dim"])
    sd = (
        ref["state_dict"]
        if "state_dict" in ref
        else reference("repa", ref["weights"])["state_dict"]
    )
    model.net.load_state_dict(sd, strict=True)
    if float64:
        # repa.py's TimestepEmbedder hands its fp32 sinusoid to its Linear as it is; the official
        # one first casts it to t's dtype (models/sit.py:64), which this hook does
        mlp = model.net.t_embedder.mlp
        mlp.register_forward_pre_hook(lambda m, args: (args[0].to(m[0].weight.dtype),))
        model.double()
    return ref, model.eval()


def test_official_network(reference):
    """(a) models/sit.py's SiT in float64: velocity and projector tokens for classes, the null
    class and t in [0, 1]; our own sin-cos table (columns first, then rows) is the official
    pos_embed; the released SiT-XL/2's keys and shapes are ours (it loads with strict=True)."""
    ref, model = _official(reference, "net", float64=True)
    with torch.no_grad():
        v, h = model.net(ref["x"], ref["t"], ref["y"])
        zs = model.net.projectors[0](h)
    assert_close64(v, ref["v"], "v")
    assert_close64(zs, ref["zs"], "zs")
    fresh = R.SiT(R.Config(**{k: v for k, v in ref["config"].items() if k != "z_dim"}), enc_dim=16)
    # the table is fp32 on both sides (models/sit.py:233; sincos_2d: float64, then .float())
    assert_close32(fresh.pos_embed, ref["pos_embed"], "pos_embed")
    cfg = R.Config(**dict(R.PRESETS["XL"], latents=True, channels=4, num_classes=1000))
    with torch.device("meta"):
        xl = R.REPA(cfg, enc_dim=768).net
    assert {k: list(v.shape) for k, v in xl.state_dict().items()} == ref["xl_shapes"]


def test_official_loss(reference):
    """(b) loss.py's SILoss + 0.5 x projection loss in train mode, on the official draws (t,
    noise, then the label drop inside the SiT): the same SiT inputs, denoising loss, projection
    loss and total."""
    ref, model = _official(reference, "loss")
    B = len(ref["labels"])
    assert ref["draw_names"] == ["rand", "randn_like", "rand"]
    t, noise, drop = ref["draws"]
    seen = {}
    model.net.register_forward_pre_hook(lambda m, a: seen.update(x_t=a[0], t=a[1], y=a[2]))
    images, z_enc = ref["images"].float(), ref["z_enc"].float()
    # ours draws t as [B], the official as [B, 1, 1, 1] (loss.py:57): the same B numbers
    with Draws.feed([t.view(B), noise, drop]):
        loss, terms = model.train()(images, ref["labels"], z_enc)
    assert_close32(seen["x_t"], ref["model_input"], "x_t")
    # fp32 draws on both sides
    assert torch.equal(seen["t"].double(), ref["time_input"])
    assert torch.equal(seen["y"], ref["model_labels"]) and (ref["model_labels"] == 10).any()
    assert_close32(terms["loss_v"], ref["loss_v"], "loss_v")
    assert_close32(terms["loss_align"], ref["loss_proj"], "loss_align")
    assert_close32(loss.detach(), ref["loss"], "loss")


@pytest.mark.parametrize("sampler", ["ode", "heun", "sde"])
def test_official_samplers(reference, sampler):
    """(c) samplers.py: euler_sampler (heun off and on) and euler_maruyama_sampler (grid to 0.04,
    then the mean step to 0) with CFG 1.8 on t <= 0.7, on the official draws: the initial noise,
    then the SDE's per-step noise."""
    ref, model = _official(reference, "sampler")
    run = ref["runs"][sampler]
    with Draws.feed(run["draws"]):
        x = model.sample(
            ref["y"],
            sampler=sampler,
            steps=run["steps"],
            scale=ref["cfg_scale"],
            interval=ref["interval"],
        )
    assert_close32(x, run["out"], sampler)


def _same_draws(ours, official, msg=""):
    assert [name for name, _ in ours] == [name for name, _ in official], msg
    for (name, a), (_, b) in zip(ours, official):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (msg, name)


def test_official_draw_order(reference):
    """Ours draws what the official code draws, in its order, on this machine's RNG: the same
    functions, shapes and values (the loss in train mode, then each sampler)."""
    _, model = _official(reference, "loss")
    cfg = model.cfg
    B = 4
    x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size)
    y = torch.tensor([1, 2, 7, 4])
    z_enc = torch.randn(B, model.net.grid**2, 16)
    torch.manual_seed(0)
    with Draws.record() as official:
        # loss.py:57, t
        torch.rand((B, 1, 1, 1))
        # loss.py:69, the noise
        torch.randn_like(x)
        # models/sit.py:88, LabelEmbedder.token_drop in train mode
        torch.rand(B)
    torch.manual_seed(0)
    with Draws.record() as ours:
        model.train()(x, y, z_enc)
    # ours draws t as [B] (then views it [B, 1, 1, 1]): the same B numbers
    official[0] = ("rand", official[0][1].view(B))
    _same_draws(ours, official, "loss")
    model.eval()
    for sampler, steps in (("ode", 4), ("heun", 4), ("sde", 5)):
        torch.manual_seed(1)
        with Draws.record() as official:
            # generate.py:121; generate.py:122 then draws the labels, which ours is given
            # (class-balanced labels, a kept deviation)
            z = torch.randn(3, cfg.channels, cfg.image_size, cfg.image_size)
            if sampler == "sde":
                for _ in range(steps - 1):
                    # samplers.py:140, float64 like the state; none on the last step (the mean)
                    torch.randn_like(z.double())
        torch.manual_seed(1)
        with Draws.record() as ours:
            model.sample(y[:3], sampler=sampler, steps=steps, scale=1.8, interval=[0.0, 0.7])
        # ours draws the SDE's noise with torch.randn(x.shape, dtype=x.dtype): the same draw as
        # the official torch.randn_like(x)
        official = [("randn" if name == "randn_like" else name, t) for name, t in official]
        _same_draws(ours, official, sampler)


def _stand_ins():
    """Modules standing in for the official models.sit, loss and samplers, built from repa.py,
    with exactly the API that make_repa.py uses: its make() and bench() run without the checkout
    (their half that calls ours is what rots when repa.py's API changes)."""

    class SiT(R.SiT):
        def __init__(
            self,
            input_size,
            patch_size,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            encoder_depth,
            class_dropout_prob,
            num_classes,
            z_dims,
            projector_dim=2048,
            **unused,
        ):
            cfg = R.Config(
                image_size=input_size,
                channels=in_channels,
                patch=patch_size,
                hidden=hidden_size,
                depth=depth,
                heads=num_heads,
                align_depth=encoder_depth,
                proj_dim=projector_dim,
                num_classes=num_classes,
                label_drop=class_dropout_prob,
                latents=True,
            )
            super().__init__(cfg, z_dims[0])
            # the official cast of the sinusoid to t's dtype (models/sit.py:64): runs in float64
            mlp = self.t_embedder.mlp
            mlp.register_forward_pre_hook(lambda m, args: (args[0].to(m[0].weight.dtype),))

        def forward(self, x, t, y):
            if self.training:
                drop = torch.rand(len(y)) < self.cfg.label_drop
                y = torch.where(drop, self.cfg.num_classes, y)
            v, h = super().forward(x, t, y)
            return v, [self.projectors[0](h)]

    def xl(**kw):
        return SiT(
            patch_size=2,
            in_channels=4,
            hidden_size=1152,
            depth=28,
            num_heads=16,
            class_dropout_prob=0.1,
            **kw,
        )

    class SILoss:
        def __init__(self, **kw):
            pass

        def __call__(self, model, images, model_kwargs, zs):
            t = torch.rand((len(images), 1, 1, 1)).to(images.dtype)
            noise = torch.randn_like(images)
            v, zs_tilde = model((1 - t) * images + t * noise, t.flatten(), **model_kwargs)
            loss_v = ((v - (noise - images)) ** 2).mean((1, 2, 3))
            return loss_v, R.align_loss(zs_tilde[0], zs[0])

    def velocity(model, y, cfg_scale, guidance_low, guidance_high):
        def v(x, t, t_cfg=None):
            t_cfg = t if t_cfg is None else t_cfg
            tt = torch.full((len(x),), t, dtype=x.dtype)
            if cfg_scale > 1 and guidance_low <= t_cfg <= guidance_high:
                y_null = torch.cat([y, torch.full_like(y, 1000)])
                v_c, v_u = model(torch.cat([x, x]), torch.cat([tt, tt]), y_null)[0].chunk(2)
                return v_u + cfg_scale * (v_c - v_u)
            return model(x, tt, y)[0]

        return v

    def euler_sampler(model, latents, y, num_steps, heun, path_type, **cfg):
        return R.sample_ode(velocity(model, y, **cfg), latents, num_steps, heun).double()

    def euler_maruyama_sampler(model, latents, y, num_steps, heun, path_type, **cfg):
        return R.sample_sde(velocity(model, y, **cfg), latents, num_steps).double()

    names = ("models", "models.sit", "loss", "samplers")
    modules = {name: types.ModuleType(name) for name in names}
    modules["models"].sit = modules["models.sit"]
    modules["models.sit"].SiT = SiT
    modules["models.sit"].SiT_models = {"SiT-XL/2": xl}
    modules["loss"].SILoss = SILoss
    modules["samplers"].euler_sampler = euler_sampler
    modules["samplers"].euler_maruyama_sampler = euler_maruyama_sampler
    return modules


def test_reference_maker_runs(tmp_path, monkeypatch, capsys):
    """tests/reference/make_repa.py's make() and bench() run against stand-ins of the official
    modules (built from repa.py): the maker's half that calls ours keeps up with repa.py's API
    (REPA.forward -> (loss, terms) once broke `make_references.py --bench repa`)."""
    monkeypatch.syspath_prepend(REFERENCE)
    import make_references
    import make_repa

    for name, module in _stand_ins().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(make_repa, "official", lambda method, repos, *sub: repos)
    monkeypatch.setattr(make_references, "OUT", str(tmp_path))
    make_repa.make(str(tmp_path))
    for name in ("net", "loss", "sampler"):
        meta = torch.load(tmp_path / f"repa_{name}.pt", weights_only=True)["meta"]
        assert meta["repository"] == "sihyun-yu/REPA"
    res = make_repa.bench(str(tmp_path), batch=2, repeats=1, hidden=48, depth=2)
    assert res["ours"] > 0 and res["official"] > 0
    assert "ours/official" in capsys.readouterr().out


def test_import_official_state_dict(cli, reference, tmp_path, capsys):
    """`import` turns an official state dict into a run of this file (sizes read from the weights);
    sample writes its latents. A file that is not one is a usage error."""
    ref = reference("repa", "net")
    torch.save({"ema": ref["state_dict"]}, tmp_path / "official.pt")
    run = tmp_path / "run"
    assert (
        cli(
            R,
            [
                "import",
                "--official",
                tmp_path / "official.pt",
                "--out",
                run,
                "--heads",
                2,
                "--align-depth",
                2,
            ],
        )
        == 0
    )
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert (
        ckpt["config"]["hidden"] == 32
        and ckpt["config"]["depth"] == 3
        and ckpt["config"]["num_classes"] == 10
    )
    for k, v in ref["state_dict"].items():
        assert torch.equal(ckpt["ema"]["net." + k], v), k
    out = tmp_path / "s.npz"
    assert (
        cli(
            R,
            [
                "sample",
                "--ckpt",
                run / "ckpt.pt",
                "--n",
                3,
                "--sampler",
                "sde",
                "--sample-steps",
                4,
                "--out",
                out,
            ],
        )
        == 0
    )
    assert np.load(out)["latents"].shape == (3, 4, 8, 8)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    assert cli(R, ["import", "--official", tmp_path / "other.pt", "--out", tmp_path / "bad"]) == 2
    assert "not an official REPA SiT state dict" in capsys.readouterr().err
    assert (
        cli(
            R,
            [
                "import",
                "--official",
                tmp_path / "official.pt",
                "--out",
                tmp_path / "bad",
                "--heads",
                5,
            ],
        )
        == 2
    )
    assert "--heads must divide the width 32" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
