import json
import math
import os
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, Draws, assert_close32, assert_close64, detail_bounded

import common
import rae as R

TINY = ["--preset", "tiny", "--device", "cpu"]


def tiny_cfg(**kw):
    return replace(R.Config(**R.PRESETS["tiny"]), **kw)


def test_time_shift_by_hand():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(R.time_shift(t, 1.0), t)  # a = 1: the identity
    for a in (0.5, 2.0, 6.93):
        s = R.time_shift(t, a)
        assert s[0] == 0 and s[-1] == 1 and (s.diff() > 0).all()  # endpoints fixed, monotone
    assert R.time_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / (1 + 2 * 0.5)
    m = 16 * 16 * 768  # DINOv2-B at 224: the paper's a = 6.93
    assert R.RAE(tiny_cfg(), 4, 384).a == pytest.approx(0.6124, abs=1e-4)
    assert (m / 4096) ** 0.5 == pytest.approx(6.93, abs=0.01)


def test_the_same_shift_in_training_and_sampling():
    model = R.RAE(tiny_cfg(shift=3.0, label_drop=0.0), 4, 8)
    seen = []

    class Stub(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append(t.clone())
            return torch.zeros_like(x)

    model.net = Stub()
    z = torch.randn(5, 4, 8)
    torch.manual_seed(0)
    model(z, torch.zeros(5, dtype=torch.long))
    torch.manual_seed(0)
    torch.randn(5, 8, 4)  # the noise is drawn first
    n = torch.distributions.Normal(0.0, 1.0).icdf(torch.rand(5))
    # logit-normal, then shift
    assert torch.allclose(seen[0], R.time_shift(torch.sigmoid(n).clamp(max=0.999), 3.0))
    seen.clear()
    model.sample(torch.zeros(2, dtype=torch.long), steps=4)
    grid = R.time_shift(1 - torch.linspace(0, 0.999, 4), 3.0)[:-1]  # 4 points, 3 steps
    assert torch.allclose(torch.stack([s[0] for s in seen]), grid, atol=1e-6)


def test_euler_on_the_shifted_grid_by_hand():
    x = torch.zeros(1)
    end = 3 * 0.001 / (1 + 2 * 0.001)  # the grid's last point, shift(1 - 0.999) at a = 3
    assert R.sample_euler(lambda x, t: torch.full_like(x, 2.0), x, 7, 3.0).item() == pytest.approx(
        2 * (end - 1)
    )
    # dx/dt = t on shift([1, 0.5005, 0.001], a = 3) = [1, m, end]: x = (m - 1) * 1 + (end - m) * m
    m = 3 * 0.5005 / (1 + 2 * 0.5005)
    out = R.sample_euler(lambda x, t: torch.full_like(x, t), x, 3, 3.0)
    assert out.item() == pytest.approx((m - 1) + (end - m) * m, rel=1e-6)


def test_latent_normalisation_round_trip():
    dec = R.RAEDecoder(tiny_cfg(), 4, 6)
    z = torch.randn(500, 4, 6) * (torch.rand(4, 6) * 3 + 0.5) + torch.randn(4, 6)
    dec.set_stats(z)
    n = dec.normalize(z)
    assert torch.allclose(n.mean(0), torch.zeros(4, 6), atol=1e-5)  # per element
    # population variance + 1e-5
    assert torch.allclose(n.std(0, unbiased=False), torch.ones(4, 6), atol=1e-4)
    assert torch.allclose(n * dec.sigma + dec.mu, z, atol=1e-5)
    assert set(dec.state_dict()) >= {"mu", "sigma"}  # the statistics travel with the checkpoint


def test_latent_is_the_layernorm_without_affine():
    enc = common.load_encoder("random-vit-s@28")
    with torch.no_grad():
        enc.net.norm.weight.mul_(3).add_(1)
        enc.net.norm.bias.add_(0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = R.latent(enc, x)
    assert z.shape == (2, 4, 384)  # the class token dropped
    assert torch.allclose(z.mean(-1), torch.zeros(2, 4), atol=1e-4)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3)
    w, b = enc.net.norm.weight, enc.net.norm.bias
    assert torch.allclose(enc(x)[1], z * w + b, atol=1e-4)  # with the affine: the released output


def test_noise_augmentation_only_in_training():
    torch.manual_seed(0)
    dec = R.RAEDecoder(tiny_cfg(perc_coeff=0.0), 4, 6)
    x, z = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 4, 6)
    dec.eval()
    clean = (dec.pixels(z) - x).abs().mean() / 2  # L1 on [0, 1] images

    def loss():
        return dec(x, z)[0].item()

    assert loss() == pytest.approx(clean.item()) and loss() == loss()
    dec.train()
    assert loss() != loss()  # a fresh s n each call
    dec.cfg = replace(dec.cfg, noise_tau=0.0)
    assert loss() == pytest.approx(clean.item())


def test_perceptual_term_reaches_the_decoder_not_the_encoder():
    enc = common.load_encoder("random-vit-s@28")
    torch.manual_seed(0)
    dec = R.RAEDecoder(tiny_cfg(perc_coeff=2.0), 4, 384).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = R.latent(enc, x)  # stage 1 decodes the raw latent
    loss, terms = dec(x, z, enc)
    x_hat = dec.pixels(z)
    perc = ((dec.normalize(R.latent(enc, x_hat)) - dec.normalize(z)) ** 2).mean()
    assert loss.item() == pytest.approx(
        (x_hat - x).abs().mean().item() / 2 + 2 * perc.item(), rel=1e-5
    )
    assert (
        terms["loss_perc"].item() == pytest.approx(perc.item(), rel=1e-5)
        and not terms["loss_perc"].requires_grad
    )
    loss.backward()
    assert all(p.grad is not None for p in dec.parameters())
    assert all(p.grad is None for p in enc.parameters())
    dec.zero_grad()
    # the perceptual part
    ((dec.normalize(R.latent(enc, dec.pixels(z), grad=True)) - z) ** 2).mean().backward()
    # reaches the decoder through the frozen encoder
    assert dec.net.decoder_pred.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def test_head_reads_the_trunks_per_token_condition():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    net = R.DiTDH(cfg, 4, 6)
    for p in net.parameters():  # away from the zero init, so every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    seen = {}
    net.blocks[net.depth - 1].register_forward_hook(lambda m, a, out: seen.update(trunk=out))
    net.blocks[net.depth].register_forward_hook(lambda m, a, out: seen.update(cond=a[1]))
    x, t, y = torch.randn(2, 4, 6), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    v = net(x, t, y)
    assert v.shape == (2, 4, 6) and seen["cond"].shape == (2, 4, cfg.head_dim)
    expected = net.s_projector(F.silu(net.t_embedder(t)[:, None] + seen["trunk"]))
    assert torch.allclose(seen["cond"], expected, atol=1e-6)
    assert (seen["cond"][:, 0] - seen["cond"][:, 1]).abs().max() > 1e-3  # one condition per token
    with torch.no_grad():
        # change the trunk: the head's condition and v follow
        net.blocks[0].mlp.w12.weight.add_(0.5)
    assert not torch.allclose(net(x, t, y), v)


def test_plain_control_matches_the_parameter_count():
    cfg = replace(R.Config(), num_classes=10)  # DiT^DH-S: trunk 384 x 12, head 2048 x 2

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        wide, plain = R.DiTDH(cfg, 256, 768), R.DiTDH(replace(cfg, head="none"), 256, 768)
    assert len(plain.blocks) == plain.depth > wide.depth and not hasattr(plain, "x_embedder")
    assert abs(count(plain) - count(wide)) < 0.5 * count(plain.blocks[0])


def test_pipeline_resume_sample_eval(
    cli, logged_losses, tmp_path, capsys, monkeypatch, few_probe_images
):
    """Stage 1: the same command + --resume continues exactly (noise augmentation included;
    test_contract resumes stage 2, --decoder included); grids only at multiples of sample_every;
    eval of both stages (probes on 400 / 200 images)."""
    few_probe_images(400, 200)
    every3 = ["--set", "sample_every=3"]
    a, b = tmp_path / "dec_a", tmp_path / "dec_b"
    argv = ["train-decoder", *TINY, *every3, "--out", b]
    assert cli(R, ["train-decoder", *TINY, *every3, "--steps", 6, "--out", a]) == 0
    assert cli(R, [*argv, "--steps", 4]) == 0
    # none at a run's end
    assert (b / "samples_0000003.png").exists() and not (b / "samples_0000004.png").exists()
    assert cli(R, [*argv, "--steps", 4, "--resume", "--steps", 6]) == 0
    assert logged_losses(b) == logged_losses(a)  # exact resume, noise augmentation included
    row = json.loads(open(a / "log.jsonl").readline())
    # tiny: perc_coeff 1
    assert row["loss"] == pytest.approx(row["loss_l1"] + row["loss_perc"], rel=1e-5)
    assert cli(R, ["eval", "--ckpt", a / "ckpt.pt", "--device", "cpu"]) == 0
    res = json.load(open(a / "eval.json"))
    assert res["fd"] is None and res["psnr"] > res["psnr_init"] and res["rfd"] < res["rfd_init"]
    assert {
        "probe_linear",
        "probe_knn",
        "probe_linear_pixels",
        "detail_pattern",
        "detail_amplitude_init",
        "detail_amplitude_blurred",
    } <= set(res)
    detail_bounded(res)
    g = tmp_path / "gen"
    assert cli(R, ["train", *TINY, "--decoder", a / "ckpt.pt", "--steps", 6, "--out", g]) == 0
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(type(m).__name__) or m)
    assert (
        cli(
            R,
            [
                "sample",
                "--ckpt",
                g / "ckpt.pt",
                "--n",
                6,
                "--device",
                "cpu",
                "--compile",
                "--out",
                tmp_path / "s.npz",
            ],
        )
        == 0
    )
    assert compiled == ["DiTDH", "ViTDecoder"]  # sample and eval honour --compile
    monkeypatch.setattr(torch, "compile", compile)
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert cli(R, ["eval", "--ckpt", g / "ckpt.pt", "--n", 50, "--device", "cpu"]) == 0
    res_g = json.load(open(g / "eval.json"))
    # the decoder travels
    assert res_g["fd"] > 0 and res_g["head"] == "wide" and res_g["psnr"] == res["psnr"]
    assert res_g["detail_pattern"] == res["detail_pattern"]


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(R, ["train-decoder", *TINY, "--steps", 2, "--out", tmp_path / "dec"]) == 0
    dec = tmp_path / "dec" / "ckpt.pt"
    torch.save({"model": {}, "config": {}}, tmp_path / "other.pt")
    capsys.readouterr()
    for argv in (
        ["train", *TINY, "--out", tmp_path / "x"],
        ["train", *TINY, "--decoder", tmp_path / "none.pt", "--out", tmp_path / "x"],
        ["train", *TINY, "--decoder", tmp_path / "other.pt", "--out", tmp_path / "x"],
        ["train", *TINY, "--decoder", dec, "--set", "head=deep", "--out", tmp_path / "x"],
        # the decoder's
        ["train", *TINY, "--decoder", dec, "--data", "shapes:64", "--out", tmp_path / "x"],
        ["train-decoder", *TINY, "--encoder", "resnet50", "--out", tmp_path / "x"],
        ["train-decoder", *TINY, "--image-size", 15, "--out", tmp_path / "x"],
        ["train-decoder", *TINY, "--set", "noise_tau=-1", "--out", tmp_path / "x"],
        # ImageNet without --data: said before the encoder loads (no download)
        ["train-decoder", "--preset", "paper", "--device", "cpu", "--out", tmp_path / "x"],
        ["sample", "--ckpt", dec, "--out", tmp_path / "s.npz"],
        ["eval", "--ckpt", tmp_path / "other.pt"],
    ):
        assert cli(R, argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1, argv
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_stage1_encodes_the_clean_images_once_a_step():
    """The latent of the batch is also the perceptual target: the encoder runs once on x (no grad),
    once on x^."""
    cfg = tiny_cfg(cache_latents=False, perc_coeff=1.0)
    enc = common.load_encoder(cfg.encoder)
    data = R.Latents(cfg, enc, common.setup_dist("cpu"))
    model = R.RAEDecoder(cfg, *data.shape)
    calls, forward = [], enc.forward
    enc.forward = lambda x, affine=True, grad=False: calls.append(grad) or forward(x, affine, grad)
    x, z = data.stage1(0)
    model(x, z, enc)[0].backward()
    assert calls == [False, True]


def test_cached_latents_are_filled_in_cpu_memory_once():
    """cache_latents: one tensor of the training set's latents, in CPU memory, filled chunk by chunk
    (the default size is 39 GB: never concatenated, never on the device); a step's rows go to the
    device."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    cfg = tiny_cfg(data="shapes:600")
    enc, d = common.load_encoder(cfg.encoder), common.setup_dist("cpu")
    common.load_images(cfg.data, "train", cfg.image_size)
    made = []

    # every op whose output holds latents of the whole training set
    class FullSize(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(
                func
                for t in tree_leaves(out)
                if torch.is_tensor(t) and t.dim() and len(t) == 600 and t.numel() >= 600 * 4 * 384
            )
            return out

    with FullSize():
        data = R.Latents(cfg, enc, d)
    assert data.cache.shape == (600, 4, 384) and data.cache.device.type == "cpu"
    # allocated once, no concatenation
    assert [str(f) for f in made] == ["aten.empty.memory_format"]
    z, y = data.stage2(0)
    # a step's rows
    assert torch.equal(z, data.cache[common.batch_rows(600, cfg.batch_size, cfg.seed, 0)[0]])


def test_latents_are_encoded_once_per_run_folder(tmp_path, monkeypatch):
    """encode(cache=FOLDER) writes the latents once, reads them back bit for bit without running the
    encoder, and keys the file on the images, the encoder's weights and the pooling."""
    enc = common.load_encoder("random-vit-s@28")
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    z = R.encode(enc, x, (4, 384), "cpu", cache=str(tmp_path))
    assert len(list(tmp_path.glob("latents-*.pt"))) == 1
    calls = []
    monkeypatch.setattr(R, "latent", lambda *a: calls.append(1))
    assert torch.equal(R.encode(enc, x, (4, 384), "cpu", cache=str(tmp_path)), z) and not calls
    monkeypatch.undo()
    pooled = R.encode(enc, x, (4, 384), "cpu", pool=True, cache=str(tmp_path))
    torch.testing.assert_close(pooled, z.mean(1))
    R.encode(enc, x[:5], (4, 384), "cpu", cache=str(tmp_path))  # other images
    with torch.no_grad():
        next(enc.parameters()).add_(1.0)
    moved = R.encode(enc, x, (4, 384), "cpu", cache=str(tmp_path))  # another encoder
    assert len(list(tmp_path.glob("latents-*.pt"))) == 4 and not torch.equal(moved, z)
    R.encode(enc, x, (4, 384), "cpu", cache=str(tmp_path / "b"), write=False)
    assert not (tmp_path / "b").exists()


def test_sampler_runs_in_true_fp32(monkeypatch):
    """Inside a bf16 region (REPDIFF_CPU_BF16=1: the GPU's path) with TF32 on, the sampler's network
    sees fp32 and TF32 off, and the flags come back after."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    model = R.RAE(tiny_cfg(), 4, 8).eval()
    seen = []
    model.net.register_forward_hook(
        lambda m, a, out: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, out.dtype)
        )
    )
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with common.autocast(torch.device("cpu")):
            model.sample(torch.tensor([0, 1]), steps=3, scale=2.0)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert len(seen) == 2 and all(s == (False, False, torch.float32) for s in seen)


# ------------------------------------------------------- against the official code (bytetriper/RAE)
# The fixtures (tests/reference/make_rae.py) hold the official outputs in float64 and every random
# draw the official code made, in its order: the tests feed those draws to ours (Draws.feed) and run
# ours in float64 (.double(), and torch's default dtype float64 for what ours makes: its draws, t,
# the sampler's grid). Ours casts t to fp32 in its time embedding and the networks' outputs to fp32
# (rae.py's TimestepEmbedder, RAE.forward, RAE.sample, RAEDecoder.pixels: against bf16 autocast):
# what follows such a cast is compared as fp32 (assert_close32), the rest as float64.
@pytest.fixture
def float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def official_model(reference):
    """-> (ours in float64 with the official DiTwDDTHead's state dict, unchanged; rae_net)."""
    ref = reference("rae", "net")
    model = R.RAE(R.Config(**ref["config"]), *ref["latent"])
    model.net.load_state_dict(ref["state_dict"], strict=True)
    return model.double(), ref


def test_dit_dh_matches_the_official(reference, float64):
    model, ref = official_model(reference)
    model.eval()
    with torch.no_grad():
        # t in {0, 1/16, 5/16, 5/8, 15/16, 1}: exact in fp32, where ours embeds t
        assert_close64(model.net.t_embedder(ref["t"]), ref["t_emb"])  # Gaussian Fourier features
        out = model.net(ref["x"], ref["t"], ref["y"])  # every class and the null class
    assert_close64(out, ref["out"])


def test_stage2_loss_matches_the_official(reference, float64):
    model, _ = official_model(reference)
    ref = reference("rae", "loss")
    seen = {}
    model.net.register_forward_pre_hook(lambda m, a: seen.update(x_t=a[0], t=a[1], y=a[2]))
    model.net.register_forward_hook(lambda m, a, out: seen.update(v=out))
    model.train()
    # the official draws: the noise [B, C, h, w] (transport.py:161), t's uniform (transport.py:76),
    # the label drop's uniform (model_utils.py:427); ours draws the noise as [B, C, N]
    e, u, u_drop = ref["draws"]
    with Draws.feed([e.flatten(2), u, u_drop]):
        loss = model(ref["z"], ref["labels"])
    # the logit-normal cut at 0.999, shifted (a = 2); the official truncates (u scaled by
    # Phi(logit 0.999) = 1 - 2.5e-12, transport.py:77), ours clamps: 2e-12 apart, 0 in fp32
    assert_close64(seen["t"], ref["t"])
    assert_close64(seen["x_t"], ref["x_t"])
    assert torch.equal(seen["y"], ref["y"])  # some labels dropped to the null class, some kept
    assert_close32(seen["v"], ref["pred"])  # ours embeds t in fp32
    assert_close32(loss, ref["loss"])
    loss.backward()
    for name, g in ref["grads"].items():
        assert_close32(model.net.get_parameter(name).grad, g, name)


def test_euler_sampler_with_cfg_matches_the_official(reference, float64):
    model, _ = official_model(reference)
    ref = reference("rae", "sample")
    model.eval()
    for name, run in ref["runs"].items():
        # "default": the Config's interval, [0, 1]
        interval = None if name == "default" else run["interval"]
        # sample_ddp.py:249's one draw, [B, C, h, w]; ours draws it as [B, C, N]
        with Draws.feed([ref["draws"][0].flatten(2)]):
            out = model.sample(ref["y"], steps=ref["steps"], scale=run["scale"], interval=interval)
        assert_close32(out, run["out"], name)  # ours samples in fp32


def test_time_shift_of_the_latent_dimension_matches_the_official(reference, float64):
    """a = sqrt(m / 4096) from the latent's dimension m = N C (the official train.py and
    sample_ddp.py), at a latent where the official code takes it (a >= 1): m = 6400, a = 1.25. A
    stand-in network v = t x_t on both sides: t in training and the sampler's grid show a."""
    ref = reference("rae", "shift")
    # shift 0: a from the latent's dimension
    cfg = replace(R.Config(**reference("rae", "net")["config"]), shift=0.0)
    model = R.RAE(cfg, *ref["latent"])
    seen = []

    class StandIn(torch.nn.Module):
        def forward(self, x, t, y):
            seen.append((t, y))
            return t[:, None, None] * x

    model.net = StandIn()
    e, u, u_drop = ref["draws"]  # transport.py:161, :76, model_utils.py:427 (the label drop)
    with Draws.feed([e.flatten(2), u, u_drop]):
        loss = model(torch.zeros(len(u), *ref["latent"]), ref["labels"])  # z = 0
    assert_close64(seen[0][0], ref["t"])
    assert torch.equal(seen[0][1], ref["y"])
    assert_close32(loss, ref["loss"])  # ours casts the network's output to fp32
    seen.clear()
    with Draws.feed([ref["sample_draws"][0].flatten(2)]):  # sample_ddp.py:249
        model.sample(ref["labels"][:1], steps=ref["steps"], scale=1.0)
    # shift(1 - linspace(0, 0.999, 6)), but its last point
    assert_close64(torch.stack([t[0] for t, _ in seen]), ref["grid"])


def test_decoder_and_stage1_loss_match_the_official(reference, float64):
    ref = reference("rae", "decoder")
    cfg = R.Config(**reference("rae", "net")["config"])
    dec = R.RAEDecoder(cfg, *ref["latent"])
    dec.net.load_state_dict(ref["state_dict"], strict=True)  # the official GeneralDecoder's
    dec.double()
    dec.mu.copy_(ref["mean"].flatten(1).T)  # the official statistics [C, h, w] -> [N, C]
    dec.sigma.copy_((ref["var"].double() + 1e-5).sqrt().flatten(1).T)
    seen = []
    dec.net.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    dec.eval()
    with torch.no_grad():
        images = (dec.decode(ref["z_norm"]) + 1) / 2  # ours in [-1, 1], the official's in [0, 1]
    assert_close64(seen[0][1], ref["pixels"])  # the decoder's ImageNet-normalised pixels
    assert_close32(images, ref["images"])  # ours casts the decoder's output to fp32
    dec.train()
    # stage1/rae.py:74 s's uniform [B, 1, 1], :75 the noise [B, N, C]
    with Draws.feed(ref["draws"]):
        # the L1 on [0, 1] images, the noise augmentation included
        l1 = dec(ref["x01"] * 2 - 1, ref["z"])[0]
    assert_close64(seen[1][0], ref["z_noised"])  # z + tau u n
    assert_close64(seen[1][1], ref["recon_pixels"])
    assert_close32(l1, ref["l1"])


def test_draw_order_matches_the_official():
    """On this machine's random stream: seeded, the official draws replayed in the official order;
    seeded again, ours recorded: the same functions, shapes and values. On purpose, ours draws the
    noise of stage 2 as torch.randn([B, C, N]) where the official draws [B, C, h, w] (randn_like
    in the loss): the same numbers in the same order (ours then transposes), so those are compared
    as torch.randn, flattened."""
    B, C, g = 3, 8, 4
    model = R.RAE(tiny_cfg(label_drop=0.5), g * g, C)
    dec = R.RAEDecoder(tiny_cfg(), g * g, C)

    def same(ours, expected):
        assert [(n, tuple(t.shape)) for n, t in ours] == [(n, tuple(t.shape)) for n, t in expected]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, expected))

    # the stage-2 loss: transport.py:161 randn_like(x1), x1 [B, C, h, w]; transport.py:76
    # rand([B]), t's uniform; model_utils.py:427 rand(B), the label drop (in DiTwDDTHead.forward)
    torch.manual_seed(0)
    e = torch.randn_like(torch.zeros(B, C, g, g))
    u = torch.rand(B)
    u_drop = torch.rand(B)
    torch.manual_seed(0)
    with Draws.record() as ours:
        model(torch.zeros(B, g * g, C), torch.zeros(B, dtype=torch.long))
    same(ours, [("randn", e.flatten(2)), ("rand", u), ("rand", u_drop)])
    # sampling: sample_ddp.py:249 randn(n, C, h, w); the Euler ODE and CFG draw nothing
    torch.manual_seed(0)
    noise = torch.randn(B, C, g, g)
    torch.manual_seed(0)
    with Draws.record() as ours:
        model.sample(torch.zeros(B, dtype=torch.long), steps=3, scale=2.0)
    same(ours, [("randn", noise.flatten(2))])
    # stage 1: stage1/rae.py:74 rand((B, 1, 1)) for tokens [B, N, C]; :75 randn_like(tokens)
    torch.manual_seed(0)
    s = torch.rand(B, 1, 1)
    n = torch.randn_like(torch.zeros(B, g * g, C))
    torch.manual_seed(0)
    with Draws.record() as ours:
        dec(torch.zeros(B, 3, 16, 16), torch.zeros(B, g * g, C))
    same(ours, [("rand", s), ("randn_like", n)])


def test_schedules_match_the_official(reference):
    ref = reference("rae", "loss")["schedules"]
    for name, stage in (("stage1", R.STAGE1["default"]), ("stage2", {})):
        run = ref[name]
        cfg = replace(R.Config(), **{**stage, "steps": run["epochs"] * 10})  # 10 steps an epoch
        assert [R.lr_at(cfg, s) for s in run["steps"]] == pytest.approx(run["lr"], rel=1e-9)
        assert cfg.ema == run["ema"] and cfg.grad_clip == run["clip"]


def test_paper_preset_is_the_official_recipe(tmp_path):
    """`--preset paper` against bytetriper/RAE's two runs (the ViT-XL decoder on DINOv2-B, then
    DiT^DH-XL at ImageNet 256), value by value, through the command line; the lr stays fixed at any
    batch."""
    model = dict(
        # bytetriper/RAE@a4d18c4 README.md:77-78 (ImageNet-1k, its training split as --data-path)
        data="imagenet",
        # bytetriper/RAE@a4d18c4 README.md:169 (--image-size 256; src/train.py:94 its default)
        image_size=256,
        # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:5
        # ('facebook/dinov2-with-registers-base'; encoder_input_size 224, :6: load_encoder's)
        encoder="dinov2_vitb14_reg",
        # bytetriper/RAE@a4d18c4 src/train.py:396-397 (rae.encode of every batch, no cache)
        cache_latents=False,
        dec_dim=1152,  # bytetriper/RAE@a4d18c4 configs/decoder/ViTXL/config.json:7
        dec_depth=28,  # bytetriper/RAE@a4d18c4 configs/decoder/ViTXL/config.json:10
        dec_heads=16,  # bytetriper/RAE@a4d18c4 configs/decoder/ViTXL/config.json:9
        dec_mlp=4096,  # bytetriper/RAE@a4d18c4 configs/decoder/ViTXL/config.json:8
        noise_tau=0.8,  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:11
        # stand-in for bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:70
        # (perceptual_weight 1.0, LPIPS)
        perc_coeff=1.0,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:22
        # (hidden_size [1152, 2048])
        hidden=1152,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:23
        # (depth [28, 2])
        depth=28,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:24
        # (num_heads [16, 16])
        heads=16,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:17
        # (DiTwDDTHead)
        head="wide",
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:22
        head_dim=2048,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:23
        head_depth=2,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:24
        head_heads=16,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:60-61
        # (sqrt(196608 / 4096), src/train.py:139): 0 here is sqrt(m / 4096) of the latent
        shift=0.0,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:26
        label_drop=0.1,
        # bytetriper/RAE@a4d18c4 configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml:42-43
        # (euler, num_steps 50)
        sample_steps=50,
        # bytetriper/RAE@a4d18c4 configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml:50
        # (cfg, scale 1.0: no guidance)
        cfg_scale=1.0,
        # bytetriper/RAE@a4d18c4 configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml:51-52
        cfg_interval=[0.0, 1.0],
        # bytetriper/RAE@a4d18c4 src/train_stage1.py:61 and src/train.py:95 (fp32 by default;
        # recommended, README.md:267)
        bf16=False,
    )
    stage1 = dict(
        # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:17 (epochs: 16) at
        # :19 (global_batch_size: 512): ceil(16 x 1,281,167 / 512) = 40,037
        steps=40_037,
        batch_size=512,  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:19
        lr=2e-4,  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:26
        lr_final=2e-5,  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:34
        # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:31 (warmup_epochs 1 of
        # 16)
        warmup=1 / 16,
        # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:35
        warmup_from_zero=True,
        decay="cosine",  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:30
        # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:32 (epoch 16 of 16)
        decay_end=1.0,
        grad_clip=0.0,  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:21
        ema=0.9978,  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:18
        log_every=100,  # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:22
        # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:24
        sample_every=2_500,
        # bytetriper/RAE@a4d18c4 configs/stage1/training/DINOv2-B_decXL.yaml:23 (every epoch):
        # ceil(1,281,167 / 512) = 2,503
        ckpt_every=2_503,
    )
    stage2 = dict(
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:71
        # (epochs: 1400) at :72 (global_batch_size: 1024): ceil(1400 x 1,281,167 / 1024) =
        # 1,751,596
        steps=1_751_596,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:72
        batch_size=1024,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:83
        lr=2e-4,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:90
        lr_final=2e-5,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:87
        # (warmup_epochs 40 of the 1400)
        warmup=40 / 1400,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:91
        warmup_from_zero=False,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:86
        decay="linear",
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:88
        # (decay_end_epoch 800 of the 1400)
        decay_end=800 / 1400,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:79
        grad_clip=1.0,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:74
        ema=0.9995,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:76
        log_every=100,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:78
        sample_every=10_000,
        # bytetriper/RAE@a4d18c4 configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml:77
        # (checkpoint_interval 10 epochs): ceil(10 x 1,281,167 / 1024) = 12,512
        ckpt_every=12_512,
    )
    assert stage1["steps"] == math.ceil(16 * 1_281_167 / 512)
    assert stage2["steps"] == math.ceil(1400 * 1_281_167 / 1024)
    p, out = R.parser(), str(tmp_path)
    dec = R.make_config(p.parse_args(["train-decoder", "--preset", "paper", "--out", out]))
    argv = ["train", "--preset", "paper", "--decoder", "ae.pt", "--out", out]
    gen = R.make_config(p.parse_args(argv), dec)
    default = R.Config()
    for cfg, expected in ((dec, model | stage1), (gen, model | stage2)):
        assert {key: getattr(cfg, key) for key in expected} == expected
        # everything else is the run's bookkeeping, as the default's
        rest = {f for f in vars(cfg) if f not in expected and f != "decoder"}
        assert {f: getattr(cfg, f) for f in rest} == {f: getattr(default, f) for f in rest}
    # the decoder's patch: 256 px over 16 x 16 tokens, bytetriper/RAE@a4d18c4
    # src/stage1/rae.py:26 (decoder_patch_size 16); a = 6.93 over the 16 x 16 x 768 latent
    with torch.device("meta"):
        assert R.ViTDecoder(dec, 256, 768).q == 16
        assert R.RAE(gen, 256, 768).a == pytest.approx(math.sqrt(196608 / 4096))
    # from_official's network is this run's
    assert all(R.OFFICIAL[k] == model[k] for k in R.OFFICIAL if k != "num_classes")
    # the lr is fixed at any batch: bytetriper/RAE@a4d18c4 src/utils/optim_utils.py:28 (the
    # config's lr as it is)
    for cmd in ("train-decoder", "train"):
        for batch in ("256", "2048"):
            argv = [cmd, "--preset", "paper", "--batch-size", batch, "--out", out]
            cfg = R.make_config(p.parse_args(argv))
            assert (cfg.batch_size, cfg.lr) == (int(batch), 2e-4)


def test_released_checkpoints_load_official_keys(reference):
    """The official DiT^DH-XL and ViT-XL decoder (DINOv2-B, 256 px): our modules have their keys and
    shapes."""
    ref = reference("rae", "keys")
    cfg = replace(R.Config(), **R.OFFICIAL)
    with torch.device("meta"):
        net, dec = R.DiTDH(cfg, 256, 768), R.RAEDecoder(cfg, 256, 768).net
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == ref["ddt_xl"]
    assert {k: list(v.shape) for k, v in dec.state_dict().items()} == ref["decoder_xl"]


def test_from_official_then_sample(reference, cli, tmp_path):
    net, dec = reference("rae", "net"), reference("rae", "decoder")
    files = {
        "decoders/dinov2/wReg_base/ViTXL_n08/model.pt": dec["state_dict"],
        "stats/dinov2/wReg_base/imagenet1k/stat.pt": dict(mean=dec["mean"], var=dec["var"]),
        "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt": dict(ema=net["state_dict"]),
    }
    for path, obj in files.items():  # a released layout, at the fixtures' size
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp_path / path)
    R.from_official(str(tmp_path), str(tmp_path / "run"), *net["latent"], **net["config"])
    _, decoder = R.load_decoder(str(tmp_path / "run" / "ckpt.pt"), "cpu")
    with torch.no_grad():
        images = (decoder.decode(dec["z_norm"].float()) + 1) / 2
    assert_close32(images, dec["images"])  # ours in fp32, as it samples
    assert (
        cli(
            R,
            [
                "sample",
                "--ckpt",
                tmp_path / "run" / "ckpt.pt",
                "--n",
                3,
                "--device",
                "cpu",
                "--out",
                tmp_path / "s.npz",
            ],
        )
        == 0
    )
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 3)


def official_stand_ins():
    """Modules named as the official ones make_rae.py imports, with exactly what it uses from them,
    made of ours (the official [B, C, h, w] at their edges): {module name: module}."""
    cfg = R.Config()

    class DiTwDDTHead(R.DiTDH):  # DDT.py's: [B, C, h, w], the label drop in training, its CFG
        def __init__(
            self,
            input_size,
            patch_size,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            class_dropout_prob=0.1,
            num_classes=1000,
        ):
            c = replace(
                cfg,
                hidden=hidden_size[0],
                head_dim=hidden_size[1],
                depth=depth[0],
                head_depth=depth[1],
                heads=num_heads[0],
                head_heads=num_heads[1],
                num_classes=num_classes,
                label_drop=class_dropout_prob,
            )
            super().__init__(c, input_size * input_size, in_channels)

        def forward(self, x, t, y):
            if self.training:
                drop = torch.rand(len(y)) < self.cfg.label_drop
                y = torch.where(drop, self.cfg.num_classes, y)
            v = super().forward(x.flatten(2).transpose(1, 2), t, y)
            return v.transpose(1, 2).reshape(x.shape)

        def forward_with_cfg(self, x, t, y, cfg_scale, cfg_interval=(0, 1)):
            v_c, v_u = self.forward(x, t, y).chunk(2)
            t = t[: len(t) // 2, None, None, None]
            on = (t >= cfg_interval[0]) & (t <= cfg_interval[1])
            v = torch.where(on, v_u + cfg_scale * (v_c - v_u), v_c)
            return torch.cat([v, v])

    class LabelEmbedder:  # model_utils.py's label drop
        def __init__(self, num_classes, hidden_size, dropout_prob):
            self.num_classes, self.dropout_prob = num_classes, dropout_prob

        def token_drop(self, labels):
            drop = torch.rand(len(labels)) < self.dropout_prob
            return torch.where(drop, self.num_classes, labels)

    class RMSNorm(torch.nn.RMSNorm):  # the maker swaps its forward while in float64
        pass

    class Transport:  # transport.py's: the linear path, v-prediction, t shifted (uniform here)
        def __init__(self, shift):
            self.shift = shift

        def training_losses(self, model, x1, model_kwargs):
            x0 = torch.randn_like(x1)
            t = R.time_shift(torch.rand(len(x1)), self.shift).to(x1)
            xt = (1 - t[:, None, None, None]) * x1 + t[:, None, None, None] * x0
            pred = model(xt, t, **model_kwargs)
            return dict(loss=((pred - (x0 - x1)) ** 2).mean((1, 2, 3)), pred=pred)

    def create_transport(path_type, prediction, loss_weight, time_dist_type, time_dist_shift):
        return Transport(time_dist_shift)

    class Sampler:  # transport.py's Euler ODE: rae.py's sample_euler
        def __init__(self, transport):
            self.shift = transport.shift

        def sample_ode(self, sampling_method, num_steps):
            def sample(x, model, **kwargs):
                def v(x, t):
                    return model(x, torch.full((len(x),), t, dtype=x.dtype), **kwargs)

                return [R.sample_euler(v, x, num_steps, self.shift)]

            return sample

    class RAE:  # stage1/rae.py's noising and decode, called on the maker's stand-in object
        def noising(self, x):
            return x + self.noise_tau * torch.rand(len(x), 1, 1) * torch.randn_like(x)

        def decode(self, z):
            if self.do_normalization:
                z = z * torch.sqrt(self.latent_var + self.eps) + self.latent_mean
            x = self.decoder.unpatchify(self.decoder(z.flatten(2).transpose(1, 2)).logits)
            return x * self.encoder_std + self.encoder_mean

    class GeneralDecoder(R.ViTDecoder):  # decoder.py's: the output's .logits, unpatchify (identity)
        def __init__(self, config, num_patches):
            c = replace(
                cfg,
                image_size=config.image_size,
                dec_dim=config.decoder_hidden_size,
                dec_depth=config.decoder_num_hidden_layers,
                dec_heads=config.decoder_num_attention_heads,
                dec_mlp=config.decoder_intermediate_size,
            )
            super().__init__(c, num_patches, config.hidden_size)

        def forward(self, z):
            return SimpleNamespace(logits=super().forward(z))

        def unpatchify(self, x):
            return x

    training = dict(epochs=2, optimizer=dict(lr=cfg.lr), ema_decay=cfg.ema, clip_grad=cfg.grad_clip)
    misc = dict(latent_size=[768, 16, 16], time_dist_shift_dim=196608, time_dist_shift_base=4096)
    configs = {
        "DINOv2-B_decXL.yaml": dict(training=training),
        "DiTDH-S_DINOv2-B.yaml": dict(training=training, misc=misc),
    }
    omegaconf = SimpleNamespace(
        load=lambda path: configs[os.path.basename(path)], to_container=lambda config: config
    )

    def build_scheduler(opt, steps_per_epoch, training):  # utils/optim_utils.py's: rae.py's lr_at
        run = replace(cfg, steps=training["epochs"] * steps_per_epoch)
        return SimpleNamespace(lr_lambdas=[lambda step: R.lr_at(run, step) / run.lr]), ""

    auto_config = SimpleNamespace(from_pretrained=lambda path: SimpleNamespace())
    module = SimpleNamespace
    model_utils = module(LabelEmbedder=LabelEmbedder, RMSNorm=RMSNorm)
    return {
        "stage2": module(),
        "stage2.models": module(model_utils=model_utils),
        "stage2.models.DDT": module(DiTwDDTHead=DiTwDDTHead),
        "stage2.models.model_utils": model_utils,
        "stage2.transport": module(Sampler=Sampler, create_transport=create_transport),
        "stage1": module(),
        "stage1.rae": module(RAE=RAE),
        "stage1.decoders": module(GeneralDecoder=GeneralDecoder),
        "transformers": module(__version__="stand-in", AutoConfig=auto_config),
        "omegaconf": module(OmegaConf=omegaconf),
        "utils": module(),
        "utils.optim_utils": module(build_scheduler=build_scheduler),
    }


def test_maker_runs_with_official_stand_ins(monkeypatch, tmp_path, capsys):
    """tests/reference/make_rae.py's make() and bench() run, their "ours" half for real, with
    stand-ins for the official modules (no checkout): our API changing under the maker fails
    here, not at the next regeneration of the fixtures."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests", "reference"))
    import make_rae
    import make_references

    for name, module in official_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(make_references, "official", lambda method, repos, *sub: repos)
    monkeypatch.setattr(make_references, "OUT", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: on a busy CPU, a second thread only waits for the first
    try:
        make_rae.make("no checkout")
        make_rae.bench("no checkout", batch=1, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_default_dtype() == torch.float32  # the maker's float64 region ended
    names = ("decoder", "keys", "loss", "net", "sample", "shift")
    assert sorted(os.listdir(tmp_path)) == [f"rae_{n}.pt" for n in names]
    assert "ours/official" in capsys.readouterr().out
