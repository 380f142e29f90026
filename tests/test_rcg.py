import argparse, datetime, json, os
from dataclasses import replace

import numpy as np
import pytest
import torch

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
    assert torch.allclose(R.standardise(2.5 * r - 4), s, atol=1e-5)  # blind to each vector's scale and offset
    assert R.standardise(r[:1]).shape == (1, 32)  # batch size 1 (the official code's squeeze() broke it)


def test_fixed_projection_is_orthonormal_and_seeded():
    p = R.fixed_projection(64, 16)
    assert torch.allclose(p.T @ p, torch.eye(16), atol=1e-5)
    assert torch.equal(p, R.fixed_projection(64, 16))


def test_linear_sqrt_betas_by_hand():
    b = R.betas_linear_sqrt(3, 0.0015, 0.0195)
    assert b[0].item() == pytest.approx(0.0015) and b[-1].item() == pytest.approx(0.0195)
    assert b[1].item() == pytest.approx(((0.0015 ** 0.5 + 0.0195 ** 0.5) / 2) ** 2)
    rdm = R.RDM(tiny_cfg(T=3), 4)
    assert torch.equal(rdm.abar, torch.cumprod(1 - b, 0))  # float64


def test_ddim_steps_by_hand():
    """Two DDIM steps on LDM's grid (T = 10, c = 5: t = 6, then 1, then to abar_0) with a network that always says
    r^ = c, against the formula."""
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
        return ap.sqrt() * c + (1 - ap - s ** 2).sqrt() * e + s * noise

    for eta in (0.0, 1.0):
        calls.clear()
        out = rdm.sample(2, steps=2, eta=eta, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        x, n1, n2 = (torch.randn(2, 3, generator=g) for _ in range(3))
        x1 = step(x, rdm.abar[6], rdm.abar[1], n1, eta)
        assert torch.allclose(calls[0], x) and torch.allclose(calls[1], x1, atol=1e-5)
        assert torch.allclose(out, step(x1, rdm.abar[1], rdm.abar[0], n2, eta), atol=1e-5)


def test_rdm_learns_a_known_mixture():
    """Two modes +-m in 16-D (a low-dimensional distribution the RDM must find): after 600 steps the DDIM (eta 1)
    samples sit on the modes, both of them."""
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
    assert net.fake_latent.grad.abs().sum() > 0 and net.rep_embedder.weight.grad is not None  # r dropped -> null
    assert net.y_embedder.embedding_table.weight.grad is None  # the unconditional table: frozen, unused
    model.zero_grad()
    net.rep_dropout_prob = 0.0
    model(x, r).backward()
    assert net.fake_latent.grad is None or net.fake_latent.grad.abs().sum() == 0  # never dropped: the null is unused
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
    """flip_aug: a mirrored image comes with the representation of the mirror image (computed once, not re-flipped)."""
    d = common.setup_dist("cpu")
    rep = lambda x: x[:, 0].flatten(1)  # the red channel: it turns around when the image is mirrored
    data = R.Data(tiny_cfg(data="shapes:200"), rep, d)
    assert len(data.reps) == 2
    mirrored = 0
    for step in range(3):
        x, r = data.batch(step, 64)
        assert torch.equal(r, x[:, 0].flatten(1))
        mirrored += (~(r[:, None] == data.reps[0][None]).all(-1).any(-1)).sum().item()  # not a row as stored
    assert 40 < mirrored < 150  # about half of 192
    x, r = R.Data(tiny_cfg(data="shapes:200", flip_aug=False), rep, d).batch(0, 64)
    assert torch.equal(r, x[:, 0].flatten(1))


def test_pipeline_sample_eval(cli, tmp_path, monkeypatch):
    a, g = tmp_path / "rdm", tmp_path / "gen"
    assert cli(R, ["train-rdm", *TINY, "--steps", 10, "--out", a]) == 0
    assert cli(R, ["eval", "--ckpt", a / "ckpt.pt", "--device", "cpu", "--n-rep", 500]) == 0
    res = json.load(open(a / "eval.json"))
    assert res["fd"] is None and res["rep_fd_test"] < res["rep_fd"] < res["rep_fd_init"]
    assert res["n_rep"] == 200  # as many as the test split's 200 (the held-out floor, rep_fd_test, needs them)
    assert {"probe_linear", "probe_knn", "probe_linear_pixels", "detail_r2_pixels"} <= set(res)
    assert res["detail_r2"] is None  # no generator
    assert cli(R, ["train", *TINY, "--steps", 10, "--out", g]) == 0
    assert (g / "samples_0000010.png").exists()  # sample_every 10: a grid at step 10
    out = tmp_path / "s.npz"
    assert cli(R, ["sample", "--ckpt", g / "ckpt.pt", "--rdm", a / "ckpt.pt", "--n", 5, "--rep-cfg", 2, "--device",
                   "cpu", "--out", out]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    seen, sample = [], R.RCG.sample
    monkeypatch.setattr(R.RCG, "sample", lambda self, r=None, **k: seen.append(r) or sample(self, r, **k))
    assert cli(R, ["eval", "--ckpt", g / "ckpt.pt", "--rdm", a / "ckpt.pt", "--n", 50, "--n-rep", 500]) == 0
    res_g = json.load(open(g / "eval.json"))
    assert res_g["fd"] > 0 and res_g["no_rep"] is False and res_g["rep_fd"] == res["rep_fd"]
    assert isinstance(res_g["detail_r2"], float) and res_g["detail_r2"] < res_g["detail_r2_pixels"]
    # detail_r2: the pixels made from the own r of the first min(1000, 200) test images of probe_data, standardised
    _, _, x_te, _ = common.probe_data("shapes:1000", 16)
    torch.testing.assert_close(seen[-1], R.Representation(tiny_cfg(), "cpu")(common.to_float(x_te)))
    u = tmp_path / "uncond"
    assert cli(R, ["train", *TINY, "--no-rep", "--steps", 3, "--batch-size", 1, "--out", u]) == 0
    assert not any(f.endswith(".png") for f in os.listdir(u))  # a 3-step run draws no grid
    assert cli(R, ["eval", "--ckpt", u / "ckpt.pt", "--n", 20]) == 0  # no --rdm needed
    res_u = json.load(open(u / "eval.json"))
    assert res_u["no_rep"] is True and "rep_fd" not in res_u and res_u["detail_r2"] is None


@pytest.mark.parametrize("cmd", ["train-rdm", "train"])
def test_resume(cmd, cli, logged_losses, tmp_path, capsys):
    """The same command plus --resume continues exactly where it stopped; a resumable field (lr) changes, printed;
    any other (the batch size) is refused with one line."""
    a, b = tmp_path / "a", tmp_path / "b"
    argv = [cmd, *TINY, "--steps", 4, "--out", b]
    assert cli(R, [cmd, *TINY, "--steps", 6, "--out", a]) == 0
    assert cli(R, argv) == 0
    assert cli(R, [*argv, "--resume", "--steps", 6]) == 0
    assert logged_losses(b) == logged_losses(a)
    capsys.readouterr()
    assert cli(R, [*argv, "--resume", "--steps", 7, "--lr", 3e-4]) == 0
    assert "--resume: lr 0.001 -> 0.0003" in capsys.readouterr().out
    assert torch.load(b / "ckpt.pt", weights_only=True)["config"]["lr"] == 3e-4
    assert cli(R, [*argv, "--resume", "--batch-size", 7]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_rdm_training_and_every_sampler_run_in_true_fp32(cli, tmp_path):
    """On a GPU setup_dist turns TF32 on: the RDM's training step, the DDIM and Heun samplers (grids, sample, eval's
    FD, detail_r2 and rep_fd) turn it off; the DiT's training step keeps it (bf16 autocast there)."""
    seen = []

    def hook(module, args):
        if isinstance(module, (R.SimpleMLP, R.DiT)):
            seen.append((type(module).__name__, module.training, torch.backends.cuda.matmul.allow_tf32))

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert cli(R, ["train-rdm", *TINY, "--steps", 2, "--out", tmp_path / "rdm"]) == 0
        assert cli(R, ["train", *TINY, "--steps", 10, "--out", tmp_path / "gen"]) == 0
        assert cli(R, ["eval", "--ckpt", tmp_path / "gen" / "ckpt.pt", "--rdm", tmp_path / "rdm" / "ckpt.pt", "--n", 4,
                       "--n-rep", 8, "--sample-steps", 2, "--rdm-steps", 2]) == 0
    finally:
        handle.remove()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    fp32 = [tf32 for name, training, tf32 in seen if name == "SimpleMLP" or not training]
    assert fp32 and not any(fp32)
    assert {"SimpleMLP", "DiT"} == {name for name, training, _ in seen if training}  # both training steps were seen
    assert {"SimpleMLP", "DiT"} == {name for name, training, _ in seen if not training}  # and both samplers
    assert all(tf32 for name, training, tf32 in seen if name == "DiT" and training)


def test_compile_in_training_sampling_and_eval(cli, tmp_path, monkeypatch):
    """--compile: train-rdm's step in one graph (train's is pinned in test_gpu_paths); sample and eval compile the
    networks of both checkpoints they load."""
    from torch._dynamo.utils import counters
    compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(type(m).__name__) or compile(
        m, backend="aot_eager", **k))
    torch._dynamo.reset()
    counters.clear()
    assert cli(R, ["train-rdm", *TINY, "--steps", 2, "--compile", "--out", tmp_path / "rdm"]) == 0
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert cli(R, ["train", *TINY, "--steps", 2, "--out", tmp_path / "gen"]) == 0
    rdm, gen = ["--rdm", tmp_path / "rdm" / "ckpt.pt", "--rdm-steps", 2], tmp_path / "gen" / "ckpt.pt"
    compiled.clear()
    assert cli(R, ["sample", "--ckpt", gen, *rdm, "--n", 2, "--sample-steps", 2, "--compile", "--device", "cpu",
                   "--out", tmp_path / "s.npz"]) == 0
    assert cli(R, ["eval", "--ckpt", gen, *rdm, "--n", 2, "--n-rep", 4, "--sample-steps", 2, "--compile"]) == 0
    assert compiled == ["DiT", "SimpleMLP"] * 2


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(R, ["train-rdm", *TINY, "--steps", 2, "--out", tmp_path / "rdm"]) == 0
    assert cli(R, ["train-rdm", *TINY, "--steps", 2, "--set", "rep_dim=32", "--out", tmp_path / "rdm32"]) == 0
    assert cli(R, ["train", *TINY, "--steps", 2, "--out", tmp_path / "gen"]) == 0
    rdm, rdm32, gen = (tmp_path / k / "ckpt.pt" for k in ("rdm", "rdm32", "gen"))
    capsys.readouterr()
    for argv in (["sample", "--ckpt", gen, "--out", tmp_path / "s.npz"],  # no --rdm
                 ["sample", "--ckpt", rdm, "--out", tmp_path / "s.npz"],
                 ["sample", "--ckpt", gen, "--rdm", gen, "--out", tmp_path / "s.npz"],
                 ["sample", "--ckpt", gen, "--rdm", rdm32, "--out", tmp_path / "s.npz"],
                 ["eval", "--ckpt", tmp_path / "none.pt"],
                 ["train", *TINY, "--set", "eta=2", "--out", tmp_path / "x"],
                 ["train-rdm", *TINY, "--set", "rep_dim=1000", "--out", tmp_path / "x"],
                 ["train-rdm", *TINY, "--encoder", "resnet50", "--out", tmp_path / "x"],
                 ["train", *TINY, "--image-size", 15, "--out", tmp_path / "x"]):
        assert cli(R, argv) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1, argv
    assert not (tmp_path / "x" / "ckpt.pt").exists()


def test_torchrun_two_cpu_processes(torchrun, tmp_path, monkeypatch):
    """Both commands train under torchrun (rank 0 writes one row a step); eval there: both ranks sample, rank 0 alone
    writes eval.json and the FD statistics (a fresh cache)."""
    r = torchrun("rcg.py", ["train-rdm", *TINY, "--steps", 3, "--out", tmp_path / "rdm"], 29555)
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun("rcg.py", ["train", *TINY, "--steps", 3, "--out", tmp_path / "gen"], 29556)
    assert r.returncode == 0, r.stderr[-2000:]
    for k in ("rdm", "gen"):
        assert [json.loads(line)["step"] for line in open(tmp_path / k / "log.jsonl")] == [1, 2, 3]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # "--" ends torchrun's own flags: its argparse would read --n as an ambiguous abbreviation of --nnodes, ...
    r = torchrun("--", ["rcg.py", "eval", "--ckpt", tmp_path / "gen" / "ckpt.pt", "--rdm", tmp_path / "rdm" / "ckpt.pt",
                        "--n", 6, "--batch", 2, "--n-rep", 20, "--device", "cpu"], 29557)
    assert r.returncode == 0, r.stderr[-2000:]
    fd_files = os.listdir(tmp_path / "torch_home" / "hub" / "repdiff_fd")  # torch.hub.get_dir() is $TORCH_HOME/hub
    assert [f[-4:] for f in fd_files] == [".npz"]  # one .npz, no .tmp left
    res = json.load(open(tmp_path / "gen" / "eval.json"))
    assert res["n_samples"] == 6 and r.stdout.count('"detail_r2"') == 1  # printed by rank 0 alone


# ------------------------------------------------------- against the official code (tests/reference/make_rcg.py)
def close(ours, ref):
    """Within 1e-5 relative, and 1e-6 of the largest |value| absolute (fp32 rounding where values cross zero)."""
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * max(1.0, ref.abs().max().item()))


def test_official_rdm_network(reference):
    """The official SimpleMLP's state dict loads as it is; load_official_rdm reads the EMA weights of the official
    RDM's state dict (model_ema.*), the ones its sampler uses."""
    ref = reference("rcg", "rdm")
    c, pre = ref["config"], "model.diffusion_model."
    net = R.SimpleMLP(c["dim"], c["rdm_width"], c["rdm_depth"], c["t_dim"])
    net.load_state_dict({k[len(pre):]: v for k, v in ref["state_dict"].items() if k.startswith(pre)})
    close(net(ref["r_t"], ref["t"]), ref["out"])
    rdm = R.load_official_rdm(ref["state_dict"])
    close(rdm.net(ref["r_t"], ref["t"]), ref["out_ema"])
    assert (rdm.cfg.T, rdm.cfg.beta_start, rdm.cfg.beta_end) == (c["T"], c["beta_start"], c["beta_end"])


def test_official_rdm_file_loads_with_weights_only(reference, tmp_path):
    """A main_rdm.py checkpoint as released (weights, optimizer, scaler, epoch and its argparse args) loads with
    torch.load(weights_only=True); a file of another kind is one line of usage error."""
    sd = reference("rcg", "rdm")["state_dict"]
    torch.save(dict(model=sd, model_ema=None, optimizer=dict(state={}, param_groups=[]), epoch=5, scaler={},
                    args=argparse.Namespace(lr=5.12e-4, output_dir="out", blr=1e-6)), tmp_path / "rdm.pth")
    rdm, ref = R.load_official_rdm(str(tmp_path / "rdm.pth")), R.load_official_rdm(sd)
    assert all(torch.equal(a, b) for a, b in zip(rdm.state_dict().values(), ref.state_dict().values()))
    torch.save(dict(model=sd, made=datetime.date(2024, 1, 1)), tmp_path / "other.pth")  # not an allowed type
    with pytest.raises(common.UsageError):
        R.load_official_rdm(str(tmp_path / "other.pth"))


def test_official_rdm_loss(reference):
    """Betas, abar, the standardisation of the representations, the loss at fixed t and noise, and at a seed: the
    same draws (t, then the noise), the same loss."""
    lo = reference("rcg", "loss")
    rdm = R.load_official_rdm(reference("rcg", "rdm")["state_dict"], ema=False).train()
    close(R.betas_linear_sqrt(1000, 0.0015, 0.0195).float(), lo["betas"])
    close(rdm.abar.float(), lo["alphas_cumprod"])
    close(R.standardise(lo["raw"]), lo["rep"])
    close(rdm(lo["rep"], lo["t"], lo["e"]), lo["loss"])
    torch.manual_seed(lo["seed"])
    assert torch.equal(torch.randint(0, 1000, (4,)), lo["t_seed"]) and torch.equal(torch.randn(4, 16), lo["e_seed"])
    torch.manual_seed(lo["seed"])
    close(rdm(lo["rep"]), lo["loss_seed"])


def test_official_ddim(reference):
    """The official DDIM (eta 1 and 0) on its grid from the same initial noise and per-step draws (a generator here,
    the global RNG there: the same stream)."""
    rdm = R.load_official_rdm(reference("rcg", "rdm")["state_dict"])
    for run in reference("rcg", "ddim")["runs"]:
        g = torch.Generator().manual_seed(run["seed"])
        assert torch.equal(torch.stack([torch.randn(3, 16, generator=g) for _ in run["draws"]]), run["draws"])
        seen = []
        hook = rdm.net.register_forward_pre_hook(lambda m, args: seen.append(args[1][0].item()))
        out = rdm.sample(3, steps=run["steps"], eta=run["eta"], generator=torch.Generator().manual_seed(run["seed"]))
        hook.remove()
        assert seen == run["timesteps"].flip(0).tolist(), (run["steps"], seen)
        close(out, run["out"])


def test_official_dit(reference):
    """RCG's DiT (3 channels, no learned-sigma half) loads as it is (x_embedder, t_embedder, y_embedder,
    rep_embedder, fake_latent, pos_embed, blocks, final_layer); the same output with r, with the null r, without r
    (c = t + y), guided, and in training with r dropped by the same draws."""
    ref = reference("rcg", "dit")
    c = ref["config"]
    cfg = R.Config(**{k: v for k, v in c.items() if k != "rep_dim"}, rep_cfg=ref["cfg_scale"])
    model = R.RCG(cfg, c["rep_dim"]).eval()
    net = model.net
    net.load_state_dict(ref["state_dict"])
    close(R.sincos_2d(c["image_size"] // c["patch"], c["hidden"])[None], ref["state_dict"]["pos_embed"])
    x, t, rep = ref["x"], ref["t"], ref["rep"]
    with torch.no_grad():
        close(net(x, t, rep), ref["out_rep"])
        close(net(x, t, net.fake_latent.expand(len(x), -1)), ref["out_null"])
        close(net(x, t), ref["out_uncond"])
        guided = [model.velocity(x[i:i + 1], t[i].item(), rep[i:i + 1], ref["cfg_scale"]) for i in range(len(x))]
        close(torch.cat(guided), ref["out_cfg"])
        net.train()
        torch.manual_seed(ref["drop_seed"])
        assert torch.equal(torch.rand(len(x)) < c["rep_drop"], ref["drop"])
        torch.manual_seed(ref["drop_seed"])
        close(net(x, t, rep), ref["out_train"])
