import json, math, os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
    # normalised in fp32: fp16 tokens whose squared norm overflows fp16 (the official fp16 NaNs), and under autocast
    with torch.autocast("cpu", torch.bfloat16):
        for dtype in (torch.float16, torch.bfloat16):
            loss = R.align_loss((300 * a).to(dtype), (300 * b).to(dtype))
            assert loss.dtype == torch.float32 and loss.item() == pytest.approx(-0.75, abs=1e-2), dtype


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
    base.net.load_state_dict({k: v for k, v in aligned.net.state_dict().items() if not k.startswith("projectors.")})
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
    """The exact v(x, t) = E[e | x_t] - E[x | x_t] for data N(mu, sigma^2) under x_t = (1 - t) x + t e: linear in x."""
    def v(x, t):
        m, s2 = (1 - t) * mu, (1 - t) ** 2 * sigma ** 2 + t ** 2
        return (t - (1 - t) * sigma ** 2) / s2 * (x - m) - mu
    return v


def test_samplers_integrate_a_known_velocity_field():
    mu, sigma = 0.5, 0.2
    z = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v2 = lambda x, t, t_cfg=None: _gaussian_velocity(mu, sigma)(x, t)
    err = {(n, heun): (R.sample_ode(v2, z.clone(), n, heun) - (mu + sigma * z)).abs().max().item()
           for n in (50, 200) for heun in (True, False)}  # the exact flow map of a Gaussian: x_0 = mu + sigma z
    assert err[50, True] < 5e-3 and err[200, True] < err[50, True] / 8, err  # Heun: second order (16x for 4x steps)
    assert err[200, False] < err[50, False] / 3 and err[50, True] < err[50, False] / 4, err  # Euler: first order
    # SDE on REPA's grid: v is evaluated at exactly linspace(1, 0.04, N), once each
    calls, v = [], _gaussian_velocity(mu, sigma)
    R.sample_sde(lambda x, t: calls.append(t) or v(x, t), z[:10].clone(), 7, torch.Generator().manual_seed(1))
    assert calls == pytest.approx(torch.linspace(1, 0.04, 7, dtype=torch.float64).tolist(), abs=1e-12)
    # Euler-Maruyama down to t = 0.04 reaches the marginal N((1 - t) mu, (1 - t)^2 sigma^2 + t^2); the last step to 0 is
    # the mean of an EM step, x - t ((2 - t) v + x), affine in x with slope a: the end is N(mu, (a sd)^2), a bit
    # narrower than the data (0.188 here, not 0.2); a plain Euler ODE step from 0.04 would give 0.196
    x = R.sample_sde(v, z.clone(), 250, torch.Generator().manual_seed(1))
    t = 0.04
    s2 = (1 - t) ** 2 * sigma ** 2 + t ** 2
    a = 1 - t * ((2 - t) * (t - (1 - t) * sigma ** 2) / s2 + 1)
    assert abs(x.mean().item() - mu) < 0.005
    assert abs(x.std().item() - a * math.sqrt(s2)) < 0.003, (x.std().item(), a * math.sqrt(s2))


def test_train_resume_sample_eval(cli, logged_losses, tmp_path, capsys):
    """The same command plus --resume continues a run exactly (steps 5-6 as in an uninterrupted run) and may change
    its lr, not its batch size; grids only at multiples of sample_every. Eval at step 40 beats eval at step 6 (FD);
    the `_init` and encoder figures do not depend on the step."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(R, ["train", *TINY, "--steps", 6, "--out", a]) == 0
    argv = ["train", *TINY, "--steps", 4, "--out", b]
    assert cli(R, argv) == 0
    assert cli(R, [*argv, "--resume", "--steps", 6]) == 0
    assert logged_losses(b) == logged_losses(a)  # bit-identical on CPU
    capsys.readouterr()
    assert cli(R, [*argv, "--resume", "--batch-size", 7]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch_size is the run's own (16)" in err
    assert cli(R, [*argv, "--resume", "--steps", 40]) == 0
    assert sorted(p.name for p in b.glob("*.png")) == [f"samples_{k:07d}.png" for k in (10, 20, 30, 40)]
    evals = {}
    for run in (a, b):
        assert cli(R, ["eval", "--ckpt", run / "ckpt.pt", "--n", 100, "--sample-steps", 8]) == 0
        evals[run] = json.load(open(run / "eval.json"))
    row = json.loads(open(a / "log.jsonl").readline())
    assert row["loss"] == pytest.approx(row["loss_v"] + 0.5 * row["loss_align"], rel=1e-5)
    one, trained = evals[a], evals[b]
    assert trained["step"] == 40 and trained["fd_model"] == "pixels" and trained["n_samples"] == 100
    assert trained["fd"] < 0.85 * one["fd"], (trained["fd"], one["fd"])  # measured: 43 against 59
    for k in ("probe_linear_init", "probe_knn_init", "detail_r2_init", "encoder_probe_linear", "encoder_probe_knn"):
        assert trained[k] == one[k], k
    assert trained["encoder"] == "random-vit-s@28" and "block 1/2" in trained["probe"]
    assert [t for t, _ in trained["probe_linear_by_t"]] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert all(0 <= acc <= 1 for _, acc in trained["probe_linear_by_t"])
    assert -1 < trained["detail_r2_init"] < trained["detail_r2_pixels"] and trained["detail_r2"] < 1
    # a resumed run may change its lr: printed, applied, kept in its config
    assert cli(R, ["train", *TINY, "--steps", 7, "--out", a, "--resume", "--lr", 5e-4]) == 0
    assert "--resume: lr 0.001 -> 0.0005" in capsys.readouterr().out
    assert json.loads(open(a / "log.jsonl").readlines()[-1])["lr"] == 5e-4
    assert torch.load(a / "ckpt.pt", weights_only=True)["config"]["lr"] == 5e-4
    for sampler in ("ode", "sde"):
        out = tmp_path / f"{sampler}.npz"
        assert cli(R, ["sample", "--ckpt", b / "ckpt.pt", "--n", 6, "--sampler", sampler, "--out", out]) == 0
        arr = np.load(out)["arr_0"]
        assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert (np.load(tmp_path / "ode.npz")["arr_0"] != np.load(tmp_path / "sde.npz")["arr_0"]).any()


def test_frozen_encoder_runs_in_bf16_on_a_gpu(cli, tmp_path, monkeypatch):
    """With bf16 autocast (a GPU; here REPDIFF_CPU_BF16=1) the frozen encoder's forward runs in bf16, as under the
    official train.py's mixed precision; the loss stays finite and close to the fp32 run's."""
    dtypes, load = [], common.load_encoder

    def spy(*args):  # records the dtype of the encoder's first matmul
        encoder = load(*args)
        encoder.net.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        return encoder
    monkeypatch.setattr(common, "load_encoder", spy)
    rows = {}
    for bf16 in ("0", "1"):
        monkeypatch.setenv("REPDIFF_CPU_BF16", bf16)
        assert cli(R, ["train", *TINY, "--steps", 1, "--out", tmp_path / bf16]) == 0
        rows[bf16] = json.loads(open(tmp_path / bf16 / "log.jsonl").readline())
    assert dtypes == [torch.float32, torch.bfloat16]
    for k in ("loss", "loss_v", "loss_align"):
        assert math.isfinite(rows["1"][k]) and rows["1"][k] == pytest.approx(rows["0"][k], abs=0.02), k


def test_eval_features_in_true_fp32(monkeypatch):
    """Eval reads the SiT (its probes, detail and x_hat) in true fp32: autocast and TF32 off, also in a bf16 region."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    model = R.REPA(R.Config(**R.PRESETS["tiny"]), 384).eval()
    seen = []
    qkv = model.net.blocks[0].attn.qkv  # the first matmul: its flag and its output's dtype
    qkv.register_forward_hook(lambda m, a, out: seen.append((torch.backends.cuda.matmul.allow_tf32, out.dtype)))
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
    assert cli(R, ["train", *TINY, "--steps", 0, "--out", tmp_path / "z"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert cli(R, ["train", *TINY, "--set", "nope=1", "--out", tmp_path / "z"]) == 2
    assert "nope=1" in capsys.readouterr().err
    assert cli(R, ["train", *TINY, "--set", "align_depth=3", "--out", tmp_path / "z"]) == 2  # the tiny SiT has 2
    assert "align_depth 3" in capsys.readouterr().err
    sample = ["sample", "--ckpt", tmp_path / "sit" / "ckpt.pt", "--out", tmp_path / "s.npz"]
    assert cli(R, [*sample, "--n", 0]) == 2
    assert "--n" in capsys.readouterr().err
    assert cli(R, [*sample, "--cfg-scale", -1]) == 2
    assert "--cfg-scale" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_precomputed_latents(cli, tmp_path, capsys):
    """--latents: the SiT models the float latents of train_latents.npy in a folder (memory-mapped) while the encoder
    reads the same rows' images."""
    images, labels = common._shapes("shapes:300", "train", 16)
    pooled = F.avg_pool2d(common.to_float(torch.from_numpy(images)), 2)  # a stand-in for a VAE: [N,3,16,16] -> 8x8
    code = torch.from_numpy(labels).float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8)  # the label as a channel [N,1,8,8]
    latents = torch.cat([pooled, code], 1).numpy()  # [N,4,8,8]
    path = tmp_path / "lat"  # no test_*.npy: the test split is split_rows' tenth
    path.mkdir()
    np.save(path / "train_images.npy", images.transpose(0, 2, 3, 1))
    np.save(path / "train_labels.npy", labels)
    np.save(path / "train_latents.npy", latents.astype(np.float16))  # half precision is read as float32
    # the batches of latents and of images are the same rows (flips included)
    lat_b, y_l = common.batch(torch.from_numpy(latents), torch.from_numpy(labels), 8, 0, 3, 0, flip=True, device="cpu")
    img_b, y_i = common.batch(torch.from_numpy(images), torch.from_numpy(labels), 8, 0, 3, 0, flip=True, device="cpu")
    assert torch.equal(y_l, y_i) and torch.allclose(lat_b[:, :3], F.avg_pool2d(img_b, 2), atol=1e-5)
    # so are eval's uniform probe subsets: each latent beside its own image and label (split_rows, then subset)
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
    assert cli(R, ["sample", "--ckpt", run / "ckpt.pt", "--n", 5, "--out", tmp_path / "new" / "s.npz"]) == 0
    assert np.load(tmp_path / "new" / "s.npz")["latents"].shape == (5, 4, 8, 8)
    assert cli(R, ["eval", "--ckpt", run / "ckpt.pt"]) == 0
    res = json.load(open(run / "eval.json"))
    assert res["fd"] is None and res["n_samples"] is None and res["step"] == 3
    assert cli(R, ["train", *TINY, "--latents", "--out", tmp_path / "bad"]) == 2  # shapes has no latents
    assert "--latents needs --data DIR with train_latents.npy" in capsys.readouterr().err
    (path / "train_latents.npy").unlink()
    assert cli(R, ["train", *TINY, "--data", path, "--latents", "--out", tmp_path / "bad"]) == 2
    assert "no train_latents.npy" in capsys.readouterr().err


def test_torchrun_two_cpu_processes(torchrun, tmp_path, monkeypatch):
    """The DDP path (gloo on CPU): the logged step-1 loss is the mean of the two ranks' losses (velocity + alignment),
    each recomputed here in one process from its own batch, encoder tokens and RNG stream. Eval under torchrun: rank 0
    alone writes eval.json and the FD statistics."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # a fresh FD statistics cache (repdiff_fd/)
    r = torchrun("repa.py", ["train", *TINY, "--encoder", "random-vit-s@28", "--steps", 3, "--out", tmp_path], 29533)
    assert r.returncode == 0, r.stderr[-2000:]
    # "--": else torchrun's own parser reads eval's --n as an ambiguous abbreviation of its flags (--nnodes, ...)
    r = torchrun("--", ["repa.py", "eval", "--ckpt", tmp_path / "ckpt.pt", "--n", 10, "--sample-steps", 2], 29534)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "eval.json"))["n_samples"] == 10
    fd_files = os.listdir(tmp_path / "torch_home" / "hub" / "repdiff_fd")  # torch.hub.get_dir(): $TORCH_HOME/hub
    assert len(fd_files) == 1 and fd_files[0].endswith(".npz") and ".tmp" not in fd_files[0], fd_files
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3]
    cfg = R.Config(**torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"])
    xs, labels, _ = common.load_images(cfg.data, "train", cfg.image_size)
    encoder = common.load_encoder(cfg.encoder)
    losses = []
    for rank in (0, 1):
        torch.manual_seed(cfg.seed)
        model = R.REPA(cfg, encoder.dim)
        torch.manual_seed(cfg.seed * 1_000_003 + rank)  # each rank's stream (common.restore)
        x, y = common.batch(xs, labels, cfg.batch_size // 2, cfg.seed, 0, rank, flip=True, device="cpu")
        losses.append(model(x, y, encoder(x)[1])[0].item())
    assert losses[0] != losses[1]  # the ranks see different batches
    assert rows[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


# ------------------------------------------------------------------ against the official code (tests/reference)
def _official(reference, name):
    """The fixture and this file's REPA with its state dict loaded unchanged (strict: the official names)."""
    ref = reference("repa", name)
    cfg = dict(ref["config"])
    model = R.REPA(R.Config(**{k: v for k, v in cfg.items() if k != "z_dim"}), enc_dim=cfg["z_dim"])
    sd = ref["state_dict"] if "state_dict" in ref else reference("repa", ref["weights"])["state_dict"]
    model.net.load_state_dict(sd, strict=True)
    return ref, model.eval()


def test_official_network(reference):
    """(a) models/sit.py's SiT: velocity and projector tokens for classes, the null class and t in [0, 1]; our own
    sin-cos table (columns first, then rows) is the official pos_embed; the released SiT-XL/2's keys and shapes are
    ours (its checkpoint loads with strict=True)."""
    ref, model = _official(reference, "net")
    with torch.no_grad():
        v, h = model.net(ref["x"], ref["t"], ref["y"])
        zs = model.net.projectors[0](h)
    torch.testing.assert_close(v, ref["v"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs, ref["zs"], rtol=1e-5, atol=1e-6)
    fresh = R.SiT(model.cfg, enc_dim=16)
    torch.testing.assert_close(fresh.pos_embed, ref["pos_embed"], rtol=1e-6, atol=1e-7)
    cfg = R.Config(**dict(R.PRESETS["XL"], latents=True, channels=4, num_classes=1000))
    with torch.device("meta"):
        xl = R.REPA(cfg, enc_dim=768).net
    assert {k: list(v.shape) for k, v in xl.state_dict().items()} == ref["xl_shapes"]


def test_official_loss(reference):
    """(b) loss.py's SILoss + 0.5 x projection loss in train mode, from one seed: the same raw draws (t, noise, then
    the label drop inside the SiT), so the same SiT inputs, denoising loss, projection loss and total."""
    ref, model = _official(reference, "loss")
    B = len(ref["labels"])
    torch.manual_seed(ref["seed"])
    draws = dict(t=torch.rand(B, 1, 1, 1), noise=torch.randn(ref["images"].shape), drop=torch.rand(B))
    for k, v in draws.items():
        assert torch.equal(v, ref[k]), k
    seen = {}
    model.net.register_forward_pre_hook(lambda m, a: seen.update(x_t=a[0], t=a[1], y=a[2]))
    torch.manual_seed(ref["seed"])
    loss, terms = model.train()(ref["images"], ref["labels"], ref["z_enc"])
    torch.testing.assert_close(seen["x_t"], ref["model_input"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["t"], ref["time_input"], rtol=0, atol=0)
    assert torch.equal(seen["y"], ref["model_labels"]) and (ref["model_labels"] == 10).any()
    torch.testing.assert_close(terms["loss_v"], ref["loss_v"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_align"], ref["loss_proj"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), ref["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ode", "heun", "sde"])
def test_official_samplers(reference, sampler):
    """(c) samplers.py: euler_sampler (heun off and on) and euler_maruyama_sampler (grid to 0.04, then the mean step
    to 0) with CFG 1.8 on t <= 0.7, from one seed: the initial noise, then the SDE's per-step draws."""
    ref, model = _official(reference, "sampler")
    torch.manual_seed(ref["seed"])
    x = model.sample(ref["y"], sampler=sampler, steps=ref[f"{sampler}_steps"], scale=ref["cfg_scale"],
                     interval=ref["interval"].tolist())
    torch.testing.assert_close(x, ref[sampler], rtol=1e-5, atol=1e-6)


def test_import_official_state_dict(cli, reference, tmp_path, capsys):
    """`import` turns an official state dict into a run of this file (sizes read from the weights); sample writes
    its latents. A file that is not one is a usage error."""
    ref = reference("repa", "net")
    torch.save({"ema": ref["state_dict"]}, tmp_path / "official.pt")
    run = tmp_path / "run"
    assert cli(R, ["import", "--official", tmp_path / "official.pt", "--out", run, "--heads", 2,
                   "--align-depth", 2]) == 0
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["hidden"] == 32 and ckpt["config"]["depth"] == 3 and ckpt["config"]["num_classes"] == 10
    for k, v in ref["state_dict"].items():
        assert torch.equal(ckpt["ema"]["net." + k], v), k
    out = tmp_path / "s.npz"
    assert cli(R, ["sample", "--ckpt", run / "ckpt.pt", "--n", 3, "--sampler", "sde", "--sample-steps", 4,
                   "--out", out]) == 0
    assert np.load(out)["latents"].shape == (3, 4, 8, 8)
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    assert cli(R, ["import", "--official", tmp_path / "other.pt", "--out", tmp_path / "bad"]) == 2
    assert "not an official REPA SiT state dict" in capsys.readouterr().err
    assert cli(R, ["import", "--official", tmp_path / "official.pt", "--out", tmp_path / "bad", "--heads", 5]) == 2
    assert "--heads must divide the width 32" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
