import json
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


def test_pipeline_resume_sample_eval(cli, logged_losses, tmp_path):
    a, b = tmp_path / "rdm_a", tmp_path / "rdm_b"
    assert cli(R, ["train-rdm", *TINY, "--steps", 10, "--out", a]) == 0
    assert cli(R, ["train-rdm", *TINY, "--steps", 4, "--out", b]) == 0
    assert cli(R, ["train-rdm", *TINY, "--steps", 10, "--out", b, "--resume"]) == 0
    assert logged_losses(b) == logged_losses(a)
    assert cli(R, ["eval", "--ckpt", a / "ckpt.pt", "--device", "cpu", "--n-rep", 500]) == 0
    res = json.load(open(a / "eval.json"))
    assert res["fd"] is None and res["rep_fd_test"] < res["rep_fd"] < res["rep_fd_init"]
    assert res["n_rep"] == 200  # as many as the test split's 200 (the held-out floor, rep_fd_test, needs them)
    assert {"probe_linear", "probe_knn", "probe_linear_pixels"} <= set(res)
    g, h = tmp_path / "gen_a", tmp_path / "gen_b"
    assert cli(R, ["train", *TINY, "--steps", 10, "--out", g]) == 0
    assert cli(R, ["train", *TINY, "--steps", 4, "--out", h]) == 0
    assert cli(R, ["train", *TINY, "--steps", 10, "--out", h, "--resume"]) == 0
    assert logged_losses(h) == logged_losses(g)
    out = tmp_path / "s.npz"
    assert cli(R, ["sample", "--ckpt", g / "ckpt.pt", "--rdm", a / "ckpt.pt", "--n", 5, "--rep-cfg", 2, "--device",
                   "cpu", "--out", out]) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (5, 16, 16, 3) and arr.dtype == np.uint8
    assert cli(R, ["eval", "--ckpt", g / "ckpt.pt", "--rdm", a / "ckpt.pt", "--n", 50, "--n-rep", 500]) == 0
    res_g = json.load(open(g / "eval.json"))
    assert res_g["fd"] > 0 and res_g["no_rep"] is False and res_g["rep_fd"] == res["rep_fd"]
    u = tmp_path / "uncond"
    assert cli(R, ["train", *TINY, "--no-rep", "--steps", 3, "--batch-size", 1, "--out", u]) == 0
    assert cli(R, ["eval", "--ckpt", u / "ckpt.pt", "--n", 20]) == 0  # no --rdm needed
    res_u = json.load(open(u / "eval.json"))
    assert res_u["no_rep"] is True and "rep_fd" not in res_u


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


def test_torchrun_two_cpu_processes(torchrun, tmp_path):
    r = torchrun("rcg.py", ["train-rdm", *TINY, "--steps", 3, "--out", tmp_path / "rdm"], 29555)
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun("rcg.py", ["train", *TINY, "--steps", 3, "--out", tmp_path / "gen"], 29556)
    assert r.returncode == 0, r.stderr[-2000:]
    for k in ("rdm", "gen"):
        assert [json.loads(line)["step"] for line in open(tmp_path / k / "log.jsonl")] == [1, 2, 3]


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
