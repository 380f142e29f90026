import json, math, os

import numpy as np
import pytest
import torch

import common
import consistency as C

TINY = ["--preset", "tiny", "--device", "cpu"]


def test_scalings_by_hand_and_boundary_condition():
    t = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in = C.scalings(t, sigma_data=0.5, t_min=0.002)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # the boundary: f(x, t_min) = x
    # t = 0.5: c_skip = 0.25 / (0.498^2 + 0.25), c_out = 0.5 * 0.498 / sqrt(0.5), c_in = 1 / sqrt(0.5)
    assert c_skip[1].item() == pytest.approx(0.25 / (0.498 ** 2 + 0.25))
    assert c_out[1].item() == pytest.approx(0.5 * 0.498 / math.sqrt(0.5))
    assert c_in[1].item() == pytest.approx(1 / math.sqrt(0.5))
    assert c_skip[2].item() == pytest.approx(0.25 / (79.998 ** 2 + 0.25))  # at t_max the network does the work
    model = C.Consistency(C.Config(**C.PRESETS["tiny"])).eval()  # eval mode: the boundary scalings (ECMPrecond)
    torch.nn.init.normal_(model.net.conv_out.weight)  # a network that does not output 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.f(x, torch.full((2,), model.cfg.t_min)), x)
    assert not torch.allclose(model.f(x, torch.full((2,), 1.0)), x)
    assert not torch.allclose(model.train().f(x, torch.full((2,), model.cfg.t_min)), x)  # training: EDM's scalings


def test_ect_schedule():
    t = torch.tensor([0.01, 0.3, 1.0, 5.0, 40.0])
    assert torch.equal(C.ect_r(t, 0, q=2, k=8, b=1), torch.zeros(5))  # stage 0: plain denoising
    gaps = []
    for s in (1, 2, 3, 4, 6):
        r = C.ect_r(t, s, q=2, k=8, b=1)
        assert (r >= 0).all() and (r < t).all()
        gaps.append(t - r)
    # by hand at t = 40 (sigmoid(-40) ~ 0): stage 1 gives r = 40 (1 - 1/2) = 20
    assert C.ect_r(torch.tensor(40.0), 1, 2, 8, 1).item() == pytest.approx(20.0, abs=1e-6)
    # each stage moves r toward t: t - r never grows, and halves where r is not clamped at 0
    for a, b in zip(gaps, gaps[1:]):
        assert (b <= a).all()
    g4, g6 = gaps[3], gaps[4]
    assert torch.allclose(g6[-2:], g4[-2:] / 4, rtol=1e-5)  # two stages, q^2 = 4, for t = 5 and 40


def test_pseudo_huber_by_hand():
    a, b = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert C.pseudo_huber(a, b, c=12.0).item() == pytest.approx(13 - 12)  # sqrt(25 + 144) - 12
    assert C.pseudo_huber(a, b, c=1e-9).item() == pytest.approx(5.0)  # c -> 0: the L2 distance


def official(ref):
    """The U-Net of a fixture made from locuslab/ect (tests/reference/make_ect.py) in a Consistency: the fixture's
    state dict is ECMPrecond's, whose network (this file's U-Net on both sides) sits under `model.`."""
    model = C.Consistency(C.Config(**ref["config"]))
    model.net.load_state_dict({k.removeprefix("model."): v for k, v in ref["state_dict"].items()}, strict=True)
    return model


def test_f_matches_official_ecmprecond(reference):
    """f against ECMPrecond.forward: eval mode (CM's scalings shifted by sigma_min = 0.003, so f(x, 0.003) = x) and
    training mode (EDM's unshifted scalings, dropout drawn after the same seed), sigma from below sigma_min to 80."""
    ref = reference("ect", "net")
    model = official(ref)
    assert (model.cfg.t_min, model.cfg.sigma_data) == (ref["sigma_min"], ref["sigma_data"])
    with torch.no_grad():
        d_eval = model.eval().f(ref["x"], ref["sigma"])
        torch.manual_seed(ref["drop_seed"])
        d_train = model.train().f(ref["x"], ref["sigma"], model.net.dropout_masks(len(ref["x"]), "cpu"))
    assert torch.equal(d_eval[0], ref["x"][0]) and ref["sigma"][0] == model.cfg.t_min  # the boundary, exactly
    torch.testing.assert_close(d_eval, ref["d_eval"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_train, ref["d_train"], rtol=1e-5, atol=1e-6)


def test_loss_matches_official_ecmloss(reference):
    """The loss against ECMLoss on one batch after one seed, at stages 0-3 (official stage - 1; stage 0 gives r = 0
    everywhere) with c = 0 and with iCT's c: the raw draws (t's normals, then e, as ECMLoss draws them), our t and r
    from them, the loss (unclamped t, mask r > 0, weight 1/(t - r)), and the gradients. The U-Net has dropout 0.3: the
    teacher's mask must be the student's for the numbers to agree."""
    ref = reference("ect", "loss")
    model = official(ref).train()
    cfg, x = model.cfg, ref["x"]
    assert cfg.dropout > 0
    torch.manual_seed(ref["seed"])
    assert torch.equal(torch.randn(len(x)), ref["rnd_normal"]) and torch.equal(torch.randn_like(x), ref["eps"])
    t = (ref["rnd_normal"] * cfg.P_std + cfg.P_mean).exp()  # t ~ lognormal(P_mean, P_std)
    assert ((t < cfg.t_min) | (t > cfg.t_max)).any()  # a t that a clamp would change
    params = dict(model.named_parameters())
    for case in ref["cases"]:
        torch.testing.assert_close(t, case["t"], rtol=1e-6, atol=0)
        r = C.ect_r(t, case["stage"], cfg.q, cfg.k, cfg.b)
        torch.testing.assert_close(r, case["r"], rtol=1e-5, atol=1e-7)
        cfg.huber_c = case["huber_c"]
        model.zero_grad()
        torch.manual_seed(ref["seed"])
        loss, _ = model(x, case["stage"])
        loss.backward()
        torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=1e-6)
        for name, g in case["grads"].items():
            torch.testing.assert_close(params["net." + name.removeprefix("model.")].grad, g, rtol=1e-5, atol=1e-6)
    assert {(c["stage"], c["huber_c"] > 0) for c in ref["cases"]} == {(0, 0), (1, 0), (2, 0), (3, 0), (2, 1)}
    r1 = ref["cases"][1]["r"]
    assert (r1 == 0).any() and (r1 > 0).any()  # stage 1 has both the boundary target x and the teacher's


def test_sampler_matches_official_generator_fn(reference):
    """1, 2 (ECT's 0.821) and 3 steps against ct_eval.py's generator_fn from the same initial noise and the same
    re-noising draws (x + s z, no sqrt(s^2 - t_min^2)), the EMA-like model in eval mode."""
    ref = reference("ect", "sample")
    model = official(ref).eval()
    n = len(ref["latents"])
    g = torch.Generator().manual_seed(ref["seed"])
    assert torch.equal(torch.randn(ref["latents"].shape, generator=g), ref["latents"])  # our draws are its draws
    assert torch.equal(torch.stack([torch.randn(ref["latents"].shape, generator=g) for _ in range(2)]), ref["noise"])
    assert model.cfg.t_max == ref["t_max"] and C.mid_levels(model.cfg, 2) == [0.821]
    for key, mid_t in (("x1", []), ("x2", [0.821]), ("x3", [2.0, 0.821])):
        x = model.sample(n, mid_t=mid_t, generator=torch.Generator().manual_seed(ref["seed"]))
        assert ref[key].abs().max() <= 1  # our clamp to [-1, 1] hides nothing here
        torch.testing.assert_close(x, ref[key].float(), rtol=1e-5, atol=1e-6)


def test_defaults_are_ects_cifar10_run(reference):
    """Config's defaults against ECT's CIFAR-10 run (run_ecm.sh over ct_train.py's defaults; ECMPrecond's, and
    generator_fn's), read from the official files by the fixture maker."""
    d = reference("ect", "loss")["defaults"]
    cfg = C.Config()
    assert (cfg.P_mean, cfg.P_std, cfg.q, cfg.k, cfg.b) == (d["mean"], d["std"], d["q"], d["k"], d["b"])
    assert d["mapping"] == "sigmoid" and cfg.huber_c == d["c"] == 0  # the L2 norm
    assert (cfg.sigma_data, cfg.t_min, cfg.t_max) == (d["sigma_data"], d["sigma_min"], d["t_max"])
    assert cfg.mid_t == d["mid_t"]
    assert cfg.dropout == d["dropout"] and cfg.ema == d["ema_beta"] and d["ema"] is None
    assert not cfg.bf16 and not d["fp16"] and not d["tf32"]  # fp32, TF32 off
    # the same images per stage (--double ticks of --tick kimg) and in all (--duration Mimg); lr scaled with the batch
    assert cfg.stage_steps * cfg.batch_size == pytest.approx(d["double"] * d["tick"] * 1000)
    assert cfg.steps * cfg.batch_size == pytest.approx(d["duration"] * 1e6)
    assert cfg.lr / cfg.batch_size == pytest.approx(d["lr"] / d["batch"])


def opened(dropout=0.5):
    """A tiny Consistency in training mode with dropout and its zero-initialised branches opened, so dropout shows."""
    torch.manual_seed(0)
    model = C.Consistency(C.Config(**dict(C.PRESETS["tiny"], dropout=dropout))).train()
    torch.nn.init.normal_(model.net.conv_out.weight)
    for m in model.net.modules():
        if isinstance(m, C.ResBlock):
            torch.nn.init.normal_(m.conv2.weight, std=0.1)
    return model


def test_teacher_carries_no_gradient_and_shares_dropout():
    model = opened()
    seen, masks = [], []
    model.net.register_forward_hook(lambda mod, inp, out: seen.append(out.requires_grad))
    block = next(m for m in model.net.modules() if isinstance(m, C.ResBlock))
    block.register_forward_pre_hook(lambda mod, args: masks.append(args[2]))
    loss, terms = model(torch.randn(4, 3, 16, 16), stage=2)
    loss.backward()
    assert seen == [True, False]  # the student first (ECMLoss's order); then the teacher, without a graph
    assert masks[0] is masks[1] and (masks[0] == 0).any() and (masks[0] == 2).any()  # one mask, p = 0.5
    assert set(terms) == {"distance", "boundary"} and not any(v.requires_grad for v in terms.values())
    assert C.Consistency(C.Config(**C.PRESETS["tiny"])).net.dropout_masks(4, "cpu") is None  # p = 0: nothing drawn


def test_teacher_shares_the_students_dropout_when_compiled(monkeypatch):
    """Under torch.compile the teacher must still apply the student's dropout masks, or ECT's target is silently
    another function. With r = t the teacher's input is the student's, so its output must equal the student's."""
    model = opened()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():  # the control: dropout is on, two draws of the masks give two different outputs
        t = torch.full((4,), 1.0)
        a, b = (model.f(x, t, model.net.dropout_masks(4, "cpu")) for _ in range(2))
        assert (a - b).abs().max() > 1e-2
    monkeypatch.setattr(C, "ect_r", lambda t, stage, q, k, b: t)  # r = t: x_r = x_t
    torch._dynamo.reset()
    loss, terms = torch.compile(model, backend="aot_eager")(x, 2)
    assert terms["boundary"] == 0 and terms["distance"] == 0  # f(x_r, r) == f(x_t, t), to the bit
    torch._dynamo.reset()


def test_training_and_sampling_run_in_true_fp32(cli, tmp_path, monkeypatch):
    """ECT trains in fp32 without TF32 (setup_dist turns TF32 on for a GPU run): every call of the U-Net (the
    student, the teacher, the sample grid, sample) and the backward run with TF32 off."""
    flags, forward = [], C.UNet.forward

    def recording(self, *a, **k):
        flags.append(("forward", torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32))
        out = forward(self, *a, **k)
        if out.requires_grad:
            out.register_hook(lambda g: flags.append(("backward", torch.backends.cuda.matmul.allow_tf32
                                                      or torch.backends.cudnn.allow_tf32)))
        return out

    monkeypatch.setattr(C.UNet, "forward", recording)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        argv = ["train", *TINY, "--steps", 2, "--set", "stage_steps=1", "--set", "sample_every=2", "--set", "grid=4"]
        assert cli(C, [*argv, "--out", tmp_path]) == 0
        assert cli(C, ["sample", "--ckpt", tmp_path / "ckpt.pt", "--n", 2, "--sample-steps", 2,
                       "--out", tmp_path / "s.npz"]) == 0
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert os.path.isfile(tmp_path / "samples_0000002.png")
    # 2 steps: student, backward, student, teacher, backward; the grid: 1 + 2 calls; sample: 2 calls
    assert [kind for kind, _ in flags].count("forward") == 3 + 3 + 2
    assert [kind for kind, _ in flags].count("backward") == 2
    assert not any(on for _, on in flags), flags


def test_attention_gets_the_head_dim_last_and_contiguous(monkeypatch):
    """The fused attention kernels need q, k, v with a unit stride in the head dim (else the math path runs)."""
    seen, attention = [], common.attention
    monkeypatch.setattr(common, "attention", lambda q, k, v, **kw: seen.append((q, k, v)) or attention(q, k, v, **kw))
    cfg = C.Config(**C.PRESETS["tiny"])
    C.UNet(cfg)(torch.randn(2, 3, 16, 16), torch.zeros(2))
    assert len(seen) == 4  # at 8x8: one down block, the middle, two up blocks
    for q, k, v in seen:
        assert q.shape[-1] == cfg.channels * 2 and q.shape[-2] == 64  # [B, heads, HW, C/heads]
        assert all(a.stride(-1) == 1 and a.is_contiguous() for a in (q, k, v))


def test_consistency_residual_is_signal_in_fp32_and_noise_in_bf16():
    """f(x_t, t) - f(x_r, r) is what the loss measures. Computed as training computes it by default (fp32), it is
    first order in the gap: halving t - r halves it. Under bf16 autocast the same residual at this gap is mostly
    rounding: the ratio is far from 2 and the bf16 error is as large as the residual itself (and ~9x iCT's pseudo-Huber
    c at this image size). On this tiny U-Net: fp32 ratio 1.98-2.00, bf16 ratio 1.19-1.32, error/residual 1.2."""
    assert not C.Config().bf16 and not any(p.get("bf16") for p in C.PRESETS.values())  # fp32 unless asked
    cfg = C.Config(**C.PRESETS["tiny"])
    torch.manual_seed(0)
    model = C.Consistency(cfg).eval()
    torch.nn.init.normal_(model.net.conv_out.weight, std=0.1)  # open the output and the residual branches
    for m in model.net.modules():
        if isinstance(m, C.ResBlock):
            torch.nn.init.normal_(m.conv2.weight, std=0.05)
    g = torch.Generator().manual_seed(0)
    x, e = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.randn(4, 3, 16, 16, generator=g)
    t = torch.full((4,), 5.0)

    @torch.no_grad()
    def residual(delta, bf16=False):  # f(x + t e, t) - f(x + r e, r), r = t - delta, one shared e
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model.f(x + t.view(-1, 1, 1, 1) * e, t) - model.f(x + (t - delta).view(-1, 1, 1, 1) * e, t - delta)

    norm = lambda r: r.flatten(1).norm(dim=1)  # [B]
    delta = 0.005  # (t - r) / t = 0.1%
    r1, r2 = residual(delta), residual(delta / 2)
    ratio = norm(r1) / norm(r2)
    assert ((ratio - 2).abs() < 0.3).all(), ratio  # first order: within 15% of 2 for every sample
    b1, b2 = residual(delta, bf16=True), residual(delta / 2, bf16=True)
    assert (norm(b1) / norm(b2)).mean() < 1.6, norm(b1) / norm(b2)  # bf16: far from first order
    assert (norm(b1 - r1) > 0.5 * norm(r1)).all()  # the bf16 rounding is as large as the signal
    c = 0.00054 * math.sqrt(x[0].numel())  # iCT's pseudo-Huber c (ECT's CIFAR-10 run has c = 0: the L2 norm)
    assert (norm(b1 - r1) > 3 * c).all()  # and well above the c that would set the loss's scale


def test_toy_one_step_lands_on_data(cli, tmp_path):
    """1,000 steps (6 stages of 166): 1-step W1 0.074-0.121 and 2-step 0.063-0.075 over seeds 0-3, init 0.381."""
    assert cli(C, ["toy", "--toy-steps", 1000, "--out", tmp_path]) == 0
    rows = {(r["model"], r["steps"]): r["distance"] for r in json.load(open(tmp_path / "toy.json"))["results"]}
    assert rows[("trained", 1)] < rows[("init", 1)] / 3, rows
    assert rows[("trained", 2)] < rows[("init", 1)] / 3, rows
    assert os.path.isfile(tmp_path / "toy.png")


def test_resume_continues_exactly_and_checks_the_command_line(cli, logged_losses, tmp_path, capsys):
    """The same command plus --resume continues bit for bit (here across the stage 0 -> 1 boundary, with dropout:
    the masks' draws continue the saved stream); a resumable field (lr) changes and says so; another (the batch
    size) is refused with one line."""
    run = ["train", *TINY, "--set", "dropout=0.1"]
    argv = [*run, "--steps", 4, "--out", tmp_path / "b"]
    assert cli(C, [*run, "--steps", 6, "--out", tmp_path / "a"]) == 0
    assert cli(C, argv) == 0
    assert cli(C, [*argv, "--resume", "--steps", 6]) == 0
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    assert [json.loads(l)["stage"] for l in open(tmp_path / "a" / "log.jsonl")] == [0] * 5 + [1]
    capsys.readouterr()
    assert cli(C, [*argv, "--resume", "--steps", 7, "--lr", 5e-4]) == 0
    assert "lr 0.001 -> 0.0005" in capsys.readouterr().out
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["config"]["lr"] == 5e-4
    assert cli(C, [*argv, "--resume", "--steps", 8, "--batch-size", 7]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch_size" in err, err


def test_sample_eval(cli, tmp_path):
    b, one = tmp_path / "b", tmp_path / "one"
    assert cli(C, ["train", *TINY, "--steps", 40, "--out", b]) == 0
    assert cli(C, ["train", *TINY, "--steps", 1, "--out", one]) == 0
    grids = sorted(f for f in os.listdir(b) if f.startswith("samples_"))
    assert grids == [f"samples_{s:07d}.png" for s in (10, 20, 30, 40)] and not any(
        f.startswith("samples_") for f in os.listdir(one))  # a grid only at multiples of sample_every
    for steps in (1, 2):
        out = tmp_path / f"s{steps}.npz"
        assert cli(C, ["sample", "--ckpt", b / "ckpt.pt", "--n", 6, "--sample-steps", steps, "--out", out]) == 0
        arr = np.load(out)["arr_0"]
        assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8 and arr.std() > 0
    # eval of the run trained 40 steps beats eval of the same preset trained 1 step (same seed, same samples' noise)
    for run in (b, one):
        assert cli(C, ["eval", "--ckpt", run / "ckpt.pt", "--n", 64]) == 0
    res, res1 = json.load(open(b / "eval.json")), json.load(open(one / "eval.json"))
    assert res["step"] == 40 and res1["step"] == 1 and res["fd_model"] == "pixels" and res["n_samples"] == 64
    assert res["fd"] < 0.85 * res1["fd"], (res["fd"], res1["fd"])  # measured: 41.3 vs 59.6 (2 steps: 40.1 vs 55.0)
    assert res["fd_2step"] < 0.85 * res1["fd_2step"], (res["fd_2step"], res1["fd_2step"])
    # the floors are the same seeded U-Net at initialisation, whatever the run
    init = ("probe_linear_init", "probe_knn_init", "detail_r2_init")
    assert {k: res[k] for k in init} == {k: res1[k] for k in init}
    assert "bottleneck" in res["probe"] and {"probe_linear", "probe_knn", "detail_r2_pixels"} <= set(res)
    assert -1 < res["detail_r2"] <= 1 and res["detail_r2"] != res["detail_r2_init"]
    assert [t for t, _ in res["probe_linear_by_t"]] == [0.1, 0.3, 0.5, 1.0, 2.0]
    assert all(0 <= a <= 1 for _, a in res["probe_linear_by_t"])


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(C, ["train", *TINY, "--image-size", 15, "--out", tmp_path / "x"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert cli(C, ["sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s.npz"]) == 2
    assert cli(C, ["sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s.png"]) == 2
    assert ".npz" in capsys.readouterr().err
    for argv, words in ((["train", *TINY, "--steps", 0, "--out", tmp_path / "y"], "--steps"),
                        (["train", *TINY, "--set", "nope=1", "--out", tmp_path / "y"], "nope"),
                        (["train", *TINY, "--set", "bf16=maybe", "--out", tmp_path / "y"], "bf16"),
                        (["sample", "--ckpt", tmp_path / "nope.pt", "--n", 0, "--out", tmp_path / "s.npz"], "--n"),
                        (["toy", "--toy-steps", -1, "--out", tmp_path / "t"], "--toy-steps")):
        assert cli(C, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)  # one line on stderr
    assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "t")  # nothing written


def test_torchrun_two_cpu_processes(torchrun, tmp_path, monkeypatch):
    """The DDP path (gloo on CPU): the logged step-1 loss is the mean of the two ranks' losses, each recomputed here in
    one process from its own batch and RNG stream; rank 0 alone writes one row per step, and in eval alone
    eval.json and the FD statistics (one .npz, no .tmp left, in a fresh TORCH_HOME)."""
    r = torchrun("consistency.py", ["train", *TINY, "--steps", 4, "--out", tmp_path], 29532)
    assert r.returncode == 0, r.stderr[-2000:]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    r = torchrun("consistency.py", ["eval", "--ckpt", tmp_path / "ckpt.pt", "--n", 8, "--batch", 4,
                                    "--sample-steps", 2], 29533)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.listdir(tmp_path / "torch_home" / "hub" / "repdiff_fd")[0].endswith(".npz")
    assert len(os.listdir(tmp_path / "torch_home" / "hub" / "repdiff_fd")) == 1
    res = json.load(open(tmp_path / "eval.json"))
    assert res["n_samples"] == 8 and res["step"] == 4 and r.stdout.count('"fd"') == 1
    assert res["sample_steps"] == 2 and res["fd"] == res["fd_2step"]  # eval at --sample-steps 2: one FD, twice
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    cfg = C.Config(**torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"])
    images, labels, _ = common.load_images(cfg.data, "train", cfg.image_size)
    losses = []
    for rank in (0, 1):
        torch.manual_seed(cfg.seed)
        model = C.Consistency(cfg)
        torch.manual_seed(cfg.seed * 1_000_003 + rank)  # each rank's stream (common.restore)
        x, _ = common.batch(images, labels, cfg.batch_size // 2, cfg.seed, 0, rank, flip=True, device="cpu")
        losses.append(model(x, 0)[0].item())  # step 0: curriculum stage 0
    assert losses[0] != losses[1]  # the ranks see different batches and noise
    assert rows[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
