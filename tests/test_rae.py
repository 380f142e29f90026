import json, os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    assert torch.allclose(seen[0], R.time_shift(torch.sigmoid(n).clamp(max=0.999), 3.0))  # logit-normal, then shift
    seen.clear()
    model.sample(torch.zeros(2, dtype=torch.long), steps=4)
    grid = R.time_shift(1 - torch.linspace(0, 0.999, 4), 3.0)[:-1]  # 4 points, 3 steps
    assert torch.allclose(torch.stack([s[0] for s in seen]), grid, atol=1e-6)


def test_euler_on_the_shifted_grid_by_hand():
    x = torch.zeros(1)
    end = 3 * 0.001 / (1 + 2 * 0.001)  # the grid's last point, shift(1 - 0.999) at a = 3
    assert R.sample_euler(lambda x, t: torch.full_like(x, 2.0), x, 7, 3.0).item() == pytest.approx(2 * (end - 1))
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
    assert torch.allclose(n.std(0, unbiased=False), torch.ones(4, 6), atol=1e-4)  # population variance + 1e-5
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
    loss = lambda: dec(x, z)[0].item()
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
    assert loss.item() == pytest.approx((x_hat - x).abs().mean().item() / 2 + 2 * perc.item(), rel=1e-5)
    assert terms["loss_perc"].item() == pytest.approx(perc.item(), rel=1e-5) and not terms["loss_perc"].requires_grad
    loss.backward()
    assert all(p.grad is not None for p in dec.parameters())
    assert all(p.grad is None for p in enc.parameters())
    dec.zero_grad()
    ((dec.normalize(R.latent(enc, dec.pixels(z), grad=True)) - z) ** 2).mean().backward()  # the perceptual part
    assert dec.net.decoder_pred.weight.grad.abs().sum() > 0  # reaches the decoder through the frozen encoder
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
        net.blocks[0].mlp.w12.weight.add_(0.5)  # change the trunk: the head's condition and v follow
    assert not torch.allclose(net(x, t, y), v)


def test_plain_control_matches_the_parameter_count():
    cfg = replace(R.Config(), num_classes=10)  # DiT^DH-S: trunk 384 x 12, head 2048 x 2
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        wide, plain = R.DiTDH(cfg, 256, 768), R.DiTDH(replace(cfg, head="none"), 256, 768)
    assert len(plain.blocks) == plain.depth > wide.depth and not hasattr(plain, "x_embedder")
    assert abs(count(plain) - count(wide)) < 0.5 * count(plain.blocks[0])


def test_pipeline_resume_sample_eval(cli, logged_losses, tmp_path, capsys, monkeypatch):
    """Both stages: the same command + --resume continues exactly; grids only at multiples of sample_every; eval."""
    every3 = ["--set", "sample_every=3"]
    a, b = tmp_path / "dec_a", tmp_path / "dec_b"
    argv = ["train-decoder", *TINY, *every3, "--out", b]
    assert cli(R, ["train-decoder", *TINY, *every3, "--steps", 6, "--out", a]) == 0
    assert cli(R, [*argv, "--steps", 4]) == 0
    assert (b / "samples_0000003.png").exists() and not (b / "samples_0000004.png").exists()  # none at a run's end
    assert cli(R, [*argv, "--steps", 4, "--resume", "--steps", 6]) == 0
    assert logged_losses(b) == logged_losses(a)  # exact resume, noise augmentation included
    row = json.loads(open(a / "log.jsonl").readline())
    assert row["loss"] == pytest.approx(row["loss_l1"] + row["loss_perc"], rel=1e-5)  # tiny: perc_coeff 1
    capsys.readouterr()
    assert cli(R, [*argv, "--resume", "--steps", 7, "--lr", 5e-4]) == 0
    assert "--resume: lr 0.001 -> 0.0005" in capsys.readouterr().out
    assert torch.load(b / "ckpt.pt", weights_only=True)["config"]["lr"] == 5e-4
    assert cli(R, [*argv, "--resume", "--batch-size", 7]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert cli(R, ["eval", "--ckpt", a / "ckpt.pt", "--device", "cpu"]) == 0
    res = json.load(open(a / "eval.json"))
    assert res["fd"] is None and res["psnr"] > res["psnr_init"] and res["rfd"] < res["rfd_init"]
    assert {"probe_linear", "probe_knn", "probe_linear_pixels", "detail_r2", "detail_r2_init", "detail_r2_pixels"} \
        <= set(res)
    g, h = tmp_path / "gen_a", tmp_path / "gen_b"
    argv = ["train", *TINY, "--decoder", a / "ckpt.pt", "--out", h]
    assert cli(R, ["train", *TINY, "--decoder", a / "ckpt.pt", "--steps", 6, "--out", g]) == 0
    assert cli(R, [*argv, "--steps", 4]) == 0
    assert cli(R, [*argv, "--steps", 4, "--resume", "--steps", 6]) == 0  # the same command, --decoder included
    assert logged_losses(h) == logged_losses(g)
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(type(m).__name__) or m)
    assert cli(R, ["sample", "--ckpt", g / "ckpt.pt", "--n", 6, "--device", "cpu", "--compile", "--out",
                   tmp_path / "s.npz"]) == 0
    assert compiled == ["DiTDH", "ViTDecoder"]  # sample and eval honour --compile
    monkeypatch.setattr(torch, "compile", compile)
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert cli(R, ["eval", "--ckpt", g / "ckpt.pt", "--n", 50, "--device", "cpu"]) == 0
    res_g = json.load(open(g / "eval.json"))
    assert res_g["fd"] > 0 and res_g["head"] == "wide" and res_g["psnr"] == res["psnr"]  # the decoder travels
    assert res_g["detail_r2"] == res["detail_r2"]


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(R, ["train-decoder", *TINY, "--steps", 2, "--out", tmp_path / "dec"]) == 0
    dec = tmp_path / "dec" / "ckpt.pt"
    torch.save({"model": {}, "config": {}}, tmp_path / "other.pt")
    capsys.readouterr()
    for argv in (["train", *TINY, "--out", tmp_path / "x"],
                 ["train", *TINY, "--decoder", tmp_path / "none.pt", "--out", tmp_path / "x"],
                 ["train", *TINY, "--decoder", tmp_path / "other.pt", "--out", tmp_path / "x"],
                 ["train", *TINY, "--decoder", dec, "--set", "head=deep", "--out", tmp_path / "x"],
                 ["train", *TINY, "--decoder", dec, "--data", "shapes:64", "--out", tmp_path / "x"],  # the decoder's
                 ["train-decoder", *TINY, "--encoder", "resnet50", "--out", tmp_path / "x"],
                 ["train-decoder", *TINY, "--image-size", 15, "--out", tmp_path / "x"],
                 ["train-decoder", *TINY, "--set", "noise_tau=-1", "--out", tmp_path / "x"],
                 ["sample", "--ckpt", dec, "--out", tmp_path / "s.npz"],
                 ["eval", "--ckpt", tmp_path / "other.pt"]):
        assert cli(R, argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1, argv
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_torchrun_two_cpu_processes(torchrun, tmp_path, monkeypatch):
    """Both stages and eval under torchrun (2 CPU processes, gloo): rank 0 alone writes eval.json and the FD cache."""
    dec, gen = tmp_path / "dec", tmp_path / "gen"
    r = torchrun("rae.py", ["train-decoder", *TINY, "--encoder", "random-vit-s@28", "--steps", 3, "--out", dec], 29545)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line)["step"] for line in open(dec / "log.jsonl")] == [1, 2, 3]
    decoder = R.load_decoder(str(dec / "ckpt.pt"), "cpu")[1]
    assert decoder.mu.shape == (4, 384) and not any(p.requires_grad for p in decoder.parameters())  # no graph kept
    r = torchrun("rae.py", ["train", *TINY, "--decoder", dec / "ckpt.pt", "--head", "none", "--steps", 2, "--out", gen],
                 29546)  # the plain DiT, the control
    assert r.returncode == 0, r.stderr[-2000:]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # a fresh FD statistics cache (repdiff_fd/)
    # eval's own --n (1000 here) stays: torchrun's parser takes `--n` for an ambiguous abbreviation of its options
    r = torchrun("rae.py", ["eval", "--ckpt", gen / "ckpt.pt", "--batch", 500, "--device", "cpu"], 29547)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(gen / "eval.json"))
    assert res["n_samples"] == 1000 and res["head"] == "none" and r.stdout.count('"detail_r2"') == 1
    fd_files = os.listdir(tmp_path / "torch_home" / "hub" / "repdiff_fd")  # torch.hub.get_dir() is $TORCH_HOME/hub
    assert len(fd_files) == 1 and fd_files[0].endswith(".npz") and ".tmp" not in fd_files[0]  # one .npz, no .tmp


def test_stage1_encodes_the_clean_images_once_a_step():
    """The latent of the batch is also the perceptual target: the encoder runs once on x (no grad), once on x^."""
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
    """cache_latents: one tensor of the training set's latents, in CPU memory, filled chunk by chunk (the default
    size is 39 GB: never concatenated, never on the device); a step's rows go to the device."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    cfg = tiny_cfg(data="shapes:600")
    enc, d = common.load_encoder(cfg.encoder), common.setup_dist("cpu")
    common.load_images(cfg.data, "train", cfg.image_size)
    made = []

    class FullSize(TorchDispatchMode):  # every op whose output holds latents of the whole training set
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend(func for t in tree_leaves(out) if torch.is_tensor(t) and t.dim() and len(t) == 600
                        and t.numel() >= 600 * 4 * 384)
            return out

    with FullSize():
        data = R.Latents(cfg, enc, d)
    assert data.cache.shape == (600, 4, 384) and data.cache.device.type == "cpu"
    assert [str(f) for f in made] == ["aten.empty.memory_format"]  # allocated once, no concatenation
    z, y = data.stage2(0)
    assert torch.equal(z, data.cache[common.batch_rows(600, cfg.batch_size, cfg.seed, 0)[0]])  # a step's rows


def test_sampler_runs_in_true_fp32(monkeypatch):
    """Inside a bf16 region (REPDIFF_CPU_BF16=1: the GPU's path) with TF32 on, the sampler's network sees fp32 and TF32
    off, and the flags come back after."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    model = R.RAE(tiny_cfg(), 4, 8).eval()
    seen = []
    model.net.register_forward_hook(lambda m, a, out: seen.append((torch.backends.cuda.matmul.allow_tf32,
                                                                   torch.backends.cudnn.allow_tf32, out.dtype)))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with common.autocast(torch.device("cpu")):
            model.sample(torch.tensor([0, 1]), steps=3, scale=2.0)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert len(seen) == 2 and all(s == (False, False, torch.float32) for s in seen)


# ------------------------------------------------------------------- against the official code (bytetriper/RAE)
def official_model(reference):
    ref = reference("rae", "net")
    model = R.RAE(R.Config(**ref["config"]), *ref["latent"])
    model.net.load_state_dict(ref["state_dict"], strict=True)  # the official DiTwDDTHead's state dict, unchanged
    return model, ref


def close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_dit_dh_matches_the_official(reference):
    model, ref = official_model(reference)
    model.eval()
    with torch.no_grad():
        close(model.net.t_embedder(ref["t"]), ref["t_emb"])  # Gaussian Fourier features
        close(model.net(ref["x"], ref["t"], ref["y"]), ref["out"])  # t in [0, 1], every class and the null class


def test_stage2_loss_matches_the_official(reference):
    model, _ = official_model(reference)
    ref = reference("rae", "loss")
    n = torch.distributions.Normal(0.0, 1.0).icdf(ref["u"])  # the official truncated logit-normal, on [0, 0.999]
    close(R.time_shift(torch.sigmoid(n).clamp(max=0.999), model.a), ref["t"])
    seen = {}
    model.net.register_forward_pre_hook(lambda m, a: seen.update(x_t=a[0], t=a[1], y=a[2]))
    model.train()
    torch.manual_seed(ref["seed"])  # the same draws in the same order: noise, t, then the label drop
    loss = model(ref["z"], ref["labels"])
    close(seen["t"], ref["t"])
    close(seen["x_t"], ref["x_t"])
    assert torch.equal(seen["y"], torch.where(ref["u_drop"] < model.cfg.label_drop, 5, ref["labels"]))
    close(loss, ref["loss"])
    loss.backward()
    for name, g in ref["grads"].items():
        close(model.net.get_parameter(name).grad, g)


def test_euler_sampler_with_cfg_matches_the_official(reference):
    model, _ = official_model(reference)
    ref = reference("rae", "sample")
    model.eval()
    g = torch.Generator().manual_seed(ref["seed"])
    close(torch.randn(3, 8, 16, generator=g).transpose(1, 2), ref["noise"])  # sample_ddp.py's [B, C, h, w] draw
    for name, run in ref["runs"].items():
        g = torch.Generator().manual_seed(ref["seed"])
        interval = None if name == "default" else run["interval"]  # "default": the Config's interval, [0, 1]
        out = model.sample(ref["y"], steps=ref["steps"], scale=run["scale"], interval=interval, generator=g)
        # atol 1e-5 at |x| ~ 3: the official tokens are a transposed view of [B, C, h, w], so its matmuls round
        # otherwise (bit-equal on a contiguous copy); 5 steps and CFG 2.5 amplify that to ~2e-6
        torch.testing.assert_close(out, run["out"], rtol=1e-5, atol=1e-5)


def test_decoder_and_stage1_loss_match_the_official(reference):
    ref = reference("rae", "decoder")
    cfg = R.Config(**reference("rae", "net")["config"])
    dec = R.RAEDecoder(cfg, 16, 8)
    dec.net.load_state_dict(ref["state_dict"], strict=True)  # the official GeneralDecoder's state dict
    dec.mu.copy_(ref["mean"].flatten(1).T)  # the official statistics [C, h, w] -> [N, C]
    dec.sigma.copy_((ref["var"] + 1e-5).sqrt().flatten(1).T)
    dec.eval()
    with torch.no_grad():
        close((dec.decode(ref["z_norm"]) + 1) / 2, ref["images"])  # ours in [-1, 1], the official's in [0, 1]
        close((dec.pixels(ref["z_noised"]) + 1) / 2, ref["recon"])
    close(ref["z"] + cfg.noise_tau * ref["u"] * ref["n"], ref["z_noised"])  # the draws, transformed
    dec.train()
    torch.manual_seed(ref["seed"])
    close(dec(ref["x01"] * 2 - 1, ref["z"])[0], ref["l1"])  # the L1 on [0, 1] images, noise augmentation included


def test_schedules_match_the_official(reference):
    ref = reference("rae", "loss")["schedules"]
    for name, stage in (("stage1", R.STAGE1["default"]), ("stage2", {})):
        run = ref[name]
        cfg = replace(R.Config(), **{**stage, "steps": run["epochs"] * 10})  # 10 steps an epoch
        assert [R.lr_at(cfg, s) for s in run["steps"]] == pytest.approx(run["lr"], rel=1e-9)
        assert cfg.ema == run["ema"] and cfg.grad_clip == run["clip"]


def test_released_checkpoints_load(reference):
    """The official DiT^DH-XL and ViT-XL decoder (DINOv2-B, 256 px): our modules have their keys and shapes."""
    ref = reference("rae", "keys")
    cfg = replace(R.Config(), **R.OFFICIAL)
    with torch.device("meta"):
        net, dec = R.DiTDH(cfg, 256, 768), R.RAEDecoder(cfg, 256, 768).net
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == ref["ddt_xl"]
    assert {k: list(v.shape) for k, v in dec.state_dict().items()} == ref["decoder_xl"]


def test_from_official_then_sample(reference, cli, tmp_path):
    net, dec = reference("rae", "net"), reference("rae", "decoder")
    files = {"decoders/dinov2/wReg_base/ViTXL_n08/model.pt": dec["state_dict"],
             "stats/dinov2/wReg_base/imagenet1k/stat.pt": dict(mean=dec["mean"], var=dec["var"]),
             "DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt": dict(ema=net["state_dict"])}
    for path, obj in files.items():  # a released layout, at the fixtures' size
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp_path / path)
    R.from_official(str(tmp_path), str(tmp_path / "run"), 16, 8, **net["config"])
    _, decoder = R.load_decoder(str(tmp_path / "run" / "ckpt.pt"), "cpu")
    with torch.no_grad():
        close((decoder.decode(dec["z_norm"]) + 1) / 2, dec["images"])
    assert cli(R, ["sample", "--ckpt", tmp_path / "run" / "ckpt.pt", "--n", 3, "--device", "cpu", "--out",
                   tmp_path / "s.npz"]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 3)
