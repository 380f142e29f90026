import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from conftest import Draws, assert_close32, assert_close64, detail_bounded

import common
import consistency as C

TINY = ["--preset", "tiny", "--device", "cpu"]


def test_scalings_by_hand_and_boundary_condition():
    t = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in = C.scalings(t, sigma_data=0.5, t_min=0.002)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # the boundary: f(x, t_min) = x
    # t = 0.5: c_skip = 0.25 / (0.498^2 + 0.25), c_out = 0.5 * 0.498 / sqrt(0.5), c_in = 1 /
    # sqrt(0.5)
    assert c_skip[1].item() == pytest.approx(0.25 / (0.498**2 + 0.25))
    assert c_out[1].item() == pytest.approx(0.5 * 0.498 / math.sqrt(0.5))
    assert c_in[1].item() == pytest.approx(1 / math.sqrt(0.5))
    # at t_max the network does the work
    assert c_skip[2].item() == pytest.approx(0.25 / (79.998**2 + 0.25))
    # eval mode: the boundary scalings (ECMPrecond)
    model = C.Consistency(C.Config(**C.PRESETS["tiny"])).eval()
    torch.nn.init.normal_(model.net.conv_out.weight)  # a network that does not output 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.f(x, torch.full((2,), model.cfg.t_min)), x)
    assert not torch.allclose(model.f(x, torch.full((2,), 1.0)), x)
    # training: EDM's scalings
    assert not torch.allclose(model.train().f(x, torch.full((2,), model.cfg.t_min)), x)


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


# Fixtures made by tests/reference/make_ect.py from locuslab/ect's training/networks.py
# (ECMPrecond), training/loss.py (ECMLoss) and generator_fn, in fp32 on a CPU (neither side runs in
# float64: make_ect.py says where each casts). The official draws are stored in its order and fed
# to ours with Draws.feed: no test relies on a seed reproducing them; the same inputs give the same
# numbers within conftest's assert_close32 (the t -> r mapping alone in float64, assert_close64).
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")


def official(ref):
    """The U-Net of a fixture made from locuslab/ect (tests/reference/make_ect.py) in a Consistency:
    the fixture's state dict is ECMPrecond's, whose network (this file's U-Net on both sides) sits
    under `model.`."""
    model = C.Consistency(C.Config(**ref["config"]))
    model.net.load_state_dict(
        {k.removeprefix("model."): v for k, v in ref["state_dict"].items()}, strict=True
    )
    return model


def test_f_matches_official_ecmprecond(reference):
    """f against ECMPrecond.forward: eval mode (CM's scalings shifted by sigma_min = 0.003, so
    f(x, 0.003) = x) and training mode (EDM's unshifted scalings, with the dropout masks the
    official call drew), sigma from below sigma_min to 80. Put back CM's t_min = 0.002, or the
    shifted scalings in training mode, and this fails."""
    ref = reference("ect", "net")
    model = official(ref)
    x, sigma = ref["x"], ref["sigma"]
    assert (model.cfg.t_min, model.cfg.sigma_data) == (ref["sigma_min"], ref["sigma_data"])
    assert ref["draw_names"] == ["bernoulli_"] * len(model.net.mask_shapes)
    with torch.no_grad():
        d_eval = model.eval().f(x, sigma)
        # Both sides run this repo's U-Net, which draws its masks by Tensor.bernoulli_: these are
        # the masks it drew inside ECMPrecond's call; ours takes its masks as an argument of f
        with Draws.feed(ref["draws"]):
            masks = model.train().net.dropout_masks(len(x), "cpu")
        d_train = model.f(x, sigma, masks)
    assert torch.equal(d_eval[0], x[0]) and sigma[0] == model.cfg.t_min  # the boundary, exactly
    for i, s in enumerate(sigma.tolist()):
        assert_close32(d_eval[i], ref["d_eval"][i], f"eval mode, sigma {s}")
        assert_close32(d_train[i], ref["d_train"][i], f"training mode, sigma {s}")


def test_loss_matches_official_ecmloss(reference, monkeypatch):
    """The loss against ECMLoss on one batch at stages 0-3 (official stage - 1; stage 0 gives r = 0
    everywhere) with c = 0 and with iCT's c, ours fed ECMLoss's own draws: our t and r (the mapping
    also in float64), the loss (unclamped t, mask r > 0, weight 1/(t - r)) and the gradients. The
    U-Net has dropout 0.3: the teacher's masks must be the student's for the numbers to agree. Put
    back ECT's mapping with sigmoid(+b t), or another pseudo-Huber c, and this fails."""
    ref = reference("ect", "loss")
    model = official(ref).train()
    cfg, x = model.cfg, ref["x"]
    n_masks = len(model.net.mask_shapes)
    assert cfg.dropout > 0
    assert ref["draw_names"] == ["randn", "randn_like"] + ["bernoulli_"] * n_masks
    # The draws: t's normals (loss.py:54 draws them as [B, 1, 1, 1], ours as [B]: the same B
    # numbers), e (loss.py:62), the student's dropout masks (loss.py:68). The masks: ECMPrecond ran
    # this repo's U-Net, which draws them by Tensor.bernoulli_; ECMLoss's teacher restored the
    # generator's state (loss.py:67, 71) and so drew the same masks again (make_ect.py checks it and
    # keeps one set; teacher_draws counts the replay). Ours draws the masks once and hands them to
    # both passes, so it is fed that one set.
    draws = [ref["draws"][0].flatten(), *ref["draws"][1:]]
    seen, ect_r = [], C.ect_r

    def recording(t, *args):
        r = ect_r(t, *args)
        seen.append((t.detach().clone(), r.detach().clone()))
        return r

    monkeypatch.setattr(C, "ect_r", recording)
    t64 = (draws[0].double() * cfg.P_std + cfg.P_mean).exp()  # loss.py:55, in float64
    params = dict(model.named_parameters())
    for case in ref["cases"]:
        msg = f"stage {case['stage']}, c {case['c']:.4f}:"
        assert_close64(ect_r(t64, case["stage"], cfg.q, cfg.k, cfg.b), case["r64"], f"{msg} r64")
        assert case["teacher_draws"] == (n_masks if (case["r"] > 0).any() else 0)
        cfg.huber_c = case["huber_c"]
        model.zero_grad()
        seen.clear()
        with Draws.feed(draws):
            loss, _ = model(x, case["stage"])
        loss.backward()
        [(t, r)] = seen
        assert_close32(t, case["t"], f"{msg} t")
        assert_close32(r, case["r"], f"{msg} r")
        assert_close32(loss, case["loss"], f"{msg} loss")
        for name, g in case["grads"].items():
            grad = params["net." + name.removeprefix("model.")].grad
            assert_close32(grad, g, f"{msg} grad of {name}")
    assert {(c["stage"], c["huber_c"] > 0) for c in ref["cases"]} == {
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 0),
        (2, 1),
    }
    t = ref["cases"][0]["t"]
    assert ((t < cfg.t_min) | (t > cfg.t_max)).any()  # a t that a clamp would change
    r1 = ref["cases"][1]["r"]
    # stage 1 has both the boundary target x and the teacher's
    assert (r1 == 0).any() and (r1 > 0).any()


def test_loss_draws_in_the_official_order():
    """On this machine's RNG: ECMLoss's draws, replayed after a seed, are the draws ours makes after
    the same seed, in the same order, the same values."""
    torch.manual_seed(0)
    model = C.Consistency(C.Config(**dict(C.PRESETS["tiny"], dropout=0.3))).train()
    B, p = 3, model.cfg.dropout
    x = torch.rand(B, 3, 16, 16)
    torch.manual_seed(1)
    theirs = [("randn", torch.randn([B, 1, 1, 1]))]  # training/loss.py:54, t's normals
    theirs.append(("randn_like", torch.randn_like(x)))  # training/loss.py:62, e
    # training/loss.py:68, the student's call: the dropout masks of its U-Net in forward's order
    # (make_ect.py runs this repo's U-Net in ECMPrecond: one Tensor.bernoulli_ a residual block)
    for shape in model.net.mask_shapes:
        theirs.append(("bernoulli_", torch.empty(B, *shape).bernoulli_(1 - p)))
    # training/loss.py:71-73, the teacher's call, draws the same masks again after restoring the
    # generator's state; ours draws them once and hands them to both passes (on purpose: plain
    # tensors stay shared under torch.compile), so it has no counterpart here
    torch.manual_seed(1)
    with Draws.record() as ours:
        model(x, 2)
    assert [name for name, _ in ours] == [name for name, _ in theirs]
    # t's normals: [B] in ours, [B, 1, 1, 1] in theirs, the same B numbers
    assert ours[0][1].shape == (B,) and torch.equal(ours[0][1], theirs[0][1].flatten())
    for (name, a), (_, b) in zip(ours[1:], theirs[1:]):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_sampler_matches_official_generator_fn(reference):
    """1, 2 (ECT's 0.821) and 3 steps against ct_eval.py's generator_fn, ours fed its draws (the
    initial noise, then one re-noising x + s z a mid level, no sqrt(s^2 - t_min^2): the 3 steps
    re-noise at 0.01 too, where the two differ by 5%), the EMA-like model in eval mode."""
    ref = reference("ect", "sample")
    model = official(ref).eval()
    assert ref["draw_names"] == ["randn", "randn_like", "randn_like"]
    assert model.cfg.t_max == ref["t_max"] and C.mid_levels(model.cfg, 2) == [0.821]
    n = len(ref["draws"][0])
    for key, mid_t in (("x1", []), ("x2", [0.821]), ("x3", [0.821, 0.01])):
        # each official run drew the first 1 + len(mid_t) of these (the same seed: make_ect.py
        # checks it); the re-noising draws are float64 there, ours takes them in fp32
        with Draws.feed(ref["draws"][: 1 + len(mid_t)]):
            x = model.sample(n, mid_t=mid_t)
        assert ref[key].abs().max() <= 1  # our clamp to [-1, 1] hides nothing here
        assert_close32(x, ref[key], key)


def test_sampler_draws_in_the_official_order():
    """On this machine's RNG: the initial noise as generator_fn's callers draw it, then one
    re-noising draw a mid level, against ours after the same seed."""
    model = C.Consistency(C.Config(**C.PRESETS["tiny"])).eval()
    n, mid_t = 2, [2.0, 0.821]
    torch.manual_seed(3)
    # training/ct_training_loop.py:212 (grid_z; metrics/metric_utils.py:268 the same)
    theirs = [("randn", torch.randn([n, 3, 16, 16]))]
    x = torch.zeros(n, 3, 16, 16, dtype=torch.float64)  # ct_training_loop.py:92, 94: x is float64
    for _ in mid_t:
        theirs.append(("randn_like", torch.randn_like(x)))  # training/ct_training_loop.py:96
    torch.manual_seed(3)
    with Draws.record() as ours:
        model.sample(n, mid_t=mid_t)
    assert [name for name, _ in ours] == ["randn"] * 3
    assert [a.shape for _, a in ours] == [b.shape for _, b in theirs]
    assert torch.equal(ours[0][1], theirs[0][1])  # the initial noise, value for value
    # The re-noising: theirs draws float64 normals (randn_like of its float64 x), ours fp32 ones
    # (torch.randn in the model's dtype): the same N(0, 1) noise, but a float64 draw uses the
    # generator's stream differently, so the values differ. On purpose: ours samples in fp32; the
    # fixture's test feeds theirs to ours.
    assert all(a.dtype == torch.float32 for _, a in ours)
    assert all(b.dtype == torch.float64 for _, b in theirs[1:])


def test_defaults_are_ects_cifar10_run(reference):
    """Config's defaults against ECT's CIFAR-10 run (run_ecm.sh over ct_train.py's defaults;
    ECMPrecond's, and generator_fn's), read from the official files by the fixture maker."""
    d = reference("ect", "loss")["defaults"]
    cfg = C.Config()
    assert (cfg.P_mean, cfg.P_std, cfg.q, cfg.k, cfg.b) == (
        d["mean"],
        d["std"],
        d["q"],
        d["k"],
        d["b"],
    )
    assert d["mapping"] == "sigmoid" and cfg.huber_c == d["c"] == 0  # the L2 norm
    assert (cfg.sigma_data, cfg.t_min, cfg.t_max) == (d["sigma_data"], d["sigma_min"], d["t_max"])
    assert cfg.mid_t == d["mid_t"]
    assert cfg.dropout == d["dropout"] and cfg.ema == d["ema_beta"] and d["ema"] is None
    assert not cfg.bf16 and not d["fp16"] and not d["tf32"]  # fp32, TF32 off
    # the same images per stage (--double ticks of --tick kimg) and in all (--duration Mimg); lr
    # scaled with the batch
    assert cfg.stage_steps * cfg.batch_size == pytest.approx(d["double"] * d["tick"] * 1000)
    assert cfg.steps * cfg.batch_size == pytest.approx(d["duration"] * 1e6)
    assert cfg.lr / cfg.batch_size == pytest.approx(d["lr"] / d["batch"])


def test_paper_preset_is_the_official_recipe(tmp_path):
    """`--preset paper` against ECT's run_ecm.sh (over ct_train.py's defaults, SongUNet's,
    ECMPrecond's and the training loop's), value by value; the lr stays fixed at any batch."""
    expected = dict(
        data="cifar10",  # locuslab/ect@4311059 run_ecm.sh:3 (--data=datasets/cifar10-32x32.zip)
        image_size=32,  # locuslab/ect@4311059 run_ecm.sh:3 (cifar10-32x32)
        channels=128,  # locuslab/ect@4311059 ct_train.py:136 (model_channels=128; ddpmpp, sh:4)
        ch_mult=[2, 2, 2],  # locuslab/ect@4311059 ct_train.py:136 (channel_mult=[2,2,2])
        num_res=4,  # locuslab/ect@4311059 training/networks.py:241 (SongUNet num_blocks=4)
        attn_res=[16],  # locuslab/ect@4311059 training/networks.py:242 (attn_resolutions=[16])
        dropout=0.2,  # locuslab/ect@4311059 run_ecm.sh:6 (--dropout=0.2)
        sigma_data=0.5,  # locuslab/ect@4311059 training/networks.py:686 (ECMPrecond)
        t_min=0.003,  # locuslab/ect@4311059 training/networks.py:684 (ECMPrecond sigma_min)
        t_max=80.0,  # locuslab/ect@4311059 training/ct_training_loop.py:82 (generator_fn)
        P_mean=-1.1,  # locuslab/ect@4311059 ct_train.py:65 (--mean, unset in run_ecm.sh)
        P_std=2.0,  # locuslab/ect@4311059 ct_train.py:66 (--std)
        q=2.0,  # locuslab/ect@4311059 ct_train.py:71 (-q)
        k=8.0,  # locuslab/ect@4311059 ct_train.py:72 (-k; --mapping sigmoid, :68)
        b=1.0,  # locuslab/ect@4311059 ct_train.py:73 (-b)
        # locuslab/ect@4311059 run_ecm.sh:6: --double=250 ticks of --tick=12.8 kimg at --batch=128:
        # 250 x 12,800 / 128 = 25,000 steps a stage
        stage_steps=25_000,
        huber_c=0.0,  # locuslab/ect@4311059 ct_train.py:75 (-c 0: loss.py:89, the L2 norm)
        mid_t=[0.821],  # locuslab/ect@4311059 ct_train.py:99 (--mid_t)
        bf16=False,  # locuslab/ect@4311059 ct_train.py:78-79 (--fp16 False, --tf32 False)
        flip=False,  # locuslab/ect@4311059 ct_train.py:62 (--xflip False; --augment=0.0, sh:6)
        # locuslab/ect@4311059 run_ecm.sh:6: --duration=25.6 Mimg at --batch=128: 25.6e6 / 128 =
        # 200,000 steps (ECT's stages 0-7), + 25,000 of stage 0 for the EDM checkpoint (sh:5)
        steps=225_000,
        batch_size=128,  # locuslab/ect@4311059 run_ecm.sh:6 (--batch=128)
        optim="radam",  # locuslab/ect@4311059 run_ecm.sh:6 (--optim=RAdam)
        lr=1e-4,  # locuslab/ect@4311059 run_ecm.sh:6 (--lr=0.0001; no scaling, ct_train.py:119)
        # locuslab/ect@4311059 training/ct_training_loop.py:116 (lr_rampup_kimg=0; the ramp is
        # commented out, :258-260)
        warmup=0,
        # locuslab/ect@4311059 ct_train.py:59 (--ema_beta 0.9999; --ema unset, :58, so no
        # half-life, :164; ema_rampup_ratio None under --transfer, :184; per step,
        # training/ct_training_loop.py:269-275)
        ema=0.9999,
    )
    cfg = C.Config(**C.PRESETS["paper"])
    assert {key: getattr(cfg, key) for key in expected} == expected
    # everything else is the run's bookkeeping, as the default's
    default = C.Config()
    rest = {f for f in vars(cfg) if f not in expected}
    assert {f: getattr(cfg, f) for f in rest} == {f: getattr(default, f) for f in rest}
    # Adam's betas and eps: locuslab/ect@4311059 ct_train.py:119 (betas=[0.9,0.999], eps=1e-8)
    opt = C.optimizer(torch.nn.Linear(2, 2), cfg)
    assert type(opt) is torch.optim.RAdam
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert type(C.optimizer(torch.nn.Linear(2, 2), default)) is torch.optim.Adam
    # the lr is fixed at any batch (run_ecm.sh:6 passes --lr; ct_train.py:119 uses it as it is)
    parser = common.make_parser(C.__doc__, C.PRESETS)[0]
    for batch in ("128", "512"):
        argv = ["train", "--preset", "paper", "--batch-size", batch, "--out", str(tmp_path)]
        cfg = C.make_config(parser.parse_args(argv))
        assert (cfg.batch_size, cfg.lr) == (int(batch), 1e-4)


def test_flip_reaches_the_batch(cli, tmp_path, monkeypatch):
    """Config.flip is the flip of every training batch: on in the existing presets, off in
    `paper` (ECT mirrors nothing)."""
    seen, batch = [], common.batch

    def recording(*a, flip, **k):
        seen.append(flip)
        return batch(*a, flip=flip, **k)

    monkeypatch.setattr(common, "batch", recording)
    assert cli(C, ["train", *TINY, "--steps", 1, "--set", "grid=0", "--out", tmp_path / "a"]) == 0
    argv = ["train", *TINY, "--steps", 1, "--set", "grid=0", "--set", "flip=false"]
    assert cli(C, [*argv, "--out", tmp_path / "b"]) == 0
    assert seen == [True, False]
    assert all(C.Config(**p).flip for name, p in C.PRESETS.items() if name != "paper")


def ect_stand_ins():
    """Modules standing in for locuslab/ect's, with the API make_ect.py uses, built from this
    file's functions (scalings, ect_r, pseudo_huber) and the U-Net the maker gives them."""

    def module(name, **attrs):
        out = types.ModuleType(name)
        out.__dict__.update(attrs)
        return out

    networks = module("training.networks")

    class ECMPrecond(torch.nn.Module):  # training/networks.py:678
        def __init__(
            self,
            img_resolution,
            img_channels,
            model_type,
            sigma_min=0.003,
            sigma_data=0.5,
            **model_kwargs,
        ):
            super().__init__()
            self.sigma_min, self.sigma_data = sigma_min, sigma_data
            self.model = getattr(networks, model_type)(
                img_resolution=img_resolution,
                in_channels=img_channels,
                out_channels=img_channels,
                label_dim=0,
                **model_kwargs,
            )

        def forward(self, x, sigma, class_labels=None):
            x, sigma = x.float(), sigma.float().reshape(-1, 1, 1, 1)
            t_min = self.sigma_min if not self.training else 0.0
            c_skip, c_out, c_in = C.scalings(sigma, self.sigma_data, t_min)
            c_noise = sigma.flatten().log() / 4
            return c_skip * x + c_out * self.model(c_in * x, c_noise, class_labels)

    class ECMLoss:  # training/loss.py:12
        def __init__(self, P_mean, P_std, sigma_data, q, c, k, b):
            self.P_mean, self.P_std, self.q, self.c, self.k, self.b = P_mean, P_std, q, c, k, b

        def update_schedule(self, stage):
            self.stage = stage

        def t_to_r(self, t):
            return C.ect_r(t, self.stage + 1, self.q, self.k, self.b)

        def __call__(self, net, images):
            t = (torch.randn([len(images), 1, 1, 1]) * self.P_std + self.P_mean).exp()
            r = self.t_to_r(t)
            e = torch.randn_like(images)
            state = torch.cuda.get_rng_state()
            d_t = net(images + e * t, t)
            d_r = images
            if r.max() > 0:
                torch.cuda.set_rng_state(state)
                with torch.no_grad():
                    d_r = torch.where(r > 0, net(images + e * r, r), images)
            return C.pseudo_huber(d_t, d_r, self.c) / (t - r).flatten()

    def generator_fn(net, latents, class_labels=None, t_max=80, mid_t=None):  # ct_eval.py:275
        levels = [t_max, *(mid_t or [])]
        x = latents.double() * t_max
        for i, s in enumerate(levels):
            x = net(x, torch.tensor(s, dtype=torch.float64)).double()
            if i + 1 < len(levels):
                x = x + levels[i + 1] * torch.randn_like(x)
        return x

    networks.ECMPrecond = ECMPrecond
    loss = module("training.loss", ECMLoss=ECMLoss)
    loop = module("training.ct_training_loop", generator_fn=generator_fn)
    persistence = module("torch_utils.persistence", _check_pickleable=None)
    return {
        "training": module("training", networks=networks, loss=loss, ct_training_loop=loop),
        "training.networks": networks,
        "training.loss": loss,
        "training.ct_training_loop": loop,
        "torch_utils": module("torch_utils", persistence=persistence),
        "torch_utils.persistence": persistence,
    }


def test_official_maker_runs_with_stand_ins(tmp_path, monkeypatch, capsys):
    """make_ect.make() and bench() with stand-ins for the official modules (no checkout needed):
    the maker's "ours" half keeps up with consistency.py's API (a change there breaks the maker
    here)."""
    monkeypatch.syspath_prepend(REFERENCE)
    import make_ect
    import make_references

    for name, stand_in in ect_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(make_references, "OUT", str(tmp_path))
    monkeypatch.setattr(make_ect, "official", lambda method, repos, *sub: repos)
    # official_defaults reads ct_train.py and run_ecm.sh of the checkout, nothing of ours
    monkeypatch.setattr(make_ect, "official_defaults", lambda path: {})
    make_ect.make("no checkout")
    make_ect.bench("no checkout", batch=2, repeats=1, width=8, size=16)
    assert sorted(os.listdir(tmp_path)) == ["ect_loss.pt", "ect_net.pt", "ect_sample.pt"]
    loss = torch.load(tmp_path / "ect_loss.pt", weights_only=True)
    assert [case["stage"] for case in loss["cases"]] == [0, 1, 2, 3, 2]
    assert "ours/official" in capsys.readouterr().out


def opened(dropout=0.5):
    """A tiny Consistency in training mode with dropout and its zero-initialised branches opened, so
    dropout shows."""
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
    # the student first (ECMLoss's order); then the teacher, without a graph
    assert seen == [True, False]
    # one mask, p = 0.5
    assert masks[0] is masks[1] and (masks[0] == 0).any() and (masks[0] == 2).any()
    assert set(terms) == {"distance", "boundary"} and not any(
        v.requires_grad for v in terms.values()
    )
    # p = 0: nothing drawn
    assert C.Consistency(C.Config(**C.PRESETS["tiny"])).net.dropout_masks(4, "cpu") is None


def test_teacher_shares_the_students_dropout_when_compiled(monkeypatch):
    """Under torch.compile the teacher must still apply the student's dropout masks, or ECT's target
    is silently another function. With r = t the teacher's input is the student's, so its output
    must equal the student's."""
    model = opened()
    x = torch.randn(4, 3, 16, 16)
    # the control: dropout is on, two draws of the masks give two different outputs
    with torch.no_grad():
        t = torch.full((4,), 1.0)
        a, b = (model.f(x, t, model.net.dropout_masks(4, "cpu")) for _ in range(2))
        assert (a - b).abs().max() > 1e-2
    monkeypatch.setattr(C, "ect_r", lambda t, stage, q, k, b: t)  # r = t: x_r = x_t
    torch._dynamo.reset()
    loss, terms = torch.compile(model, backend="aot_eager")(x, 2)
    assert terms["boundary"] == 0 and terms["distance"] == 0  # f(x_r, r) == f(x_t, t), to the bit
    torch._dynamo.reset()


def test_training_and_sampling_run_in_true_fp32(cli, tmp_path, monkeypatch):
    """ECT trains in fp32 without TF32 (setup_dist turns TF32 on for a GPU run): every call of the
    U-Net (the student, the teacher, the sample grid, sample) and the backward run with TF32 off."""
    flags, forward = [], C.UNet.forward

    def recording(self, *a, **k):
        flags.append(
            ("forward", torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
        )
        out = forward(self, *a, **k)
        if out.requires_grad:
            out.register_hook(
                lambda g: flags.append(
                    (
                        "backward",
                        torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32,
                    )
                )
            )
        return out

    monkeypatch.setattr(C.UNet, "forward", recording)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        argv = [
            "train",
            *TINY,
            "--steps",
            2,
            "--set",
            "stage_steps=1",
            "--set",
            "sample_every=2",
            "--set",
            "grid=4",
        ]
        assert cli(C, [*argv, "--out", tmp_path]) == 0
        assert (
            cli(
                C,
                [
                    "sample",
                    "--ckpt",
                    tmp_path / "ckpt.pt",
                    "--n",
                    2,
                    "--sample-steps",
                    2,
                    "--out",
                    tmp_path / "s.npz",
                ],
            )
            == 0
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert os.path.isfile(tmp_path / "samples_0000002.png")
    # 2 steps: student, backward, student, teacher, backward; the grid: 1 + 2 calls; sample: 2 calls
    assert [kind for kind, _ in flags].count("forward") == 3 + 3 + 2
    assert [kind for kind, _ in flags].count("backward") == 2
    assert not any(on for _, on in flags), flags


def test_attention_gets_the_head_dim_last_and_contiguous(monkeypatch):
    """The fused attention kernels need q, k, v with a unit stride in the head dim (else the math
    path runs)."""
    seen, attention = [], common.attention
    monkeypatch.setattr(
        common,
        "attention",
        lambda q, k, v, **kw: seen.append((q, k, v)) or attention(q, k, v, **kw),
    )
    cfg = C.Config(**C.PRESETS["tiny"])
    C.UNet(cfg)(torch.randn(2, 3, 16, 16), torch.zeros(2))
    assert len(seen) == 4  # at 8x8: one down block, the middle, two up blocks
    for q, k, v in seen:
        assert q.shape[-1] == cfg.channels * 2 and q.shape[-2] == 64  # [B, heads, HW, C/heads]
        assert all(a.stride(-1) == 1 and a.is_contiguous() for a in (q, k, v))


def test_consistency_residual_is_first_order_in_fp32_and_bf16_rounds_it_away():
    """f(x_t, t) - f(x_r, r) is what the loss measures. Computed as training computes it by default
    (fp32), it is first order in the gap: halving t - r halves it. bf16 keeps 8 significant bits, so
    rounding f's output alone moves each value by up to 2^-9 of it: at this gap that is a seventh of
    the residual, and it does not shrink with the gap as the residual does (ECT's curriculum shrinks
    it 2x per stage); under bf16 autocast the error of the residual is at least of that size (bounds
    from bf16's precision, not from this CPU's kernels). Hence fp32 training. On this tiny U-Net:
    fp32 ratio 1.98-2.00; the bf16 error measured here, 1.2x the residual."""
    # fp32 unless asked
    assert not C.Config().bf16 and not any(p.get("bf16") for p in C.PRESETS.values())
    cfg = C.Config(**C.PRESETS["tiny"])
    torch.manual_seed(0)
    model = C.Consistency(cfg).eval()
    # open the output and the residual branches
    torch.nn.init.normal_(model.net.conv_out.weight, std=0.1)
    for m in model.net.modules():
        if isinstance(m, C.ResBlock):
            torch.nn.init.normal_(m.conv2.weight, std=0.05)
    g = torch.Generator().manual_seed(0)
    x, e = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.randn(4, 3, 16, 16, generator=g)
    t = torch.full((4,), 5.0)

    @torch.no_grad()
    def f_at(s, bf16=False):  # f(x + s e, s), one shared e
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model.f(x + s.view(-1, 1, 1, 1) * e, s).float()

    def norm(r):  # [B, ...] -> [B]
        return r.flatten(1).norm(dim=1)

    delta = 0.005  # (t - r) / t = 0.1%
    f_t = f_at(t)
    r1, r2 = f_t - f_at(t - delta), f_t - f_at(t - delta / 2)
    ratio = norm(r1) / norm(r2)
    assert ((ratio - 2).abs() < 0.3).all(), ratio  # first order: within 15% of 2 for every sample
    one_rounding = 2**-9 * norm(f_t)  # bf16's rounding of f's output, at most
    assert (one_rounding > norm(r1) / 10).all()  # not small beside the residual
    b1 = f_at(t, bf16=True) - f_at(t - delta, bf16=True)
    # two independent roundings of up to 2^-9 |f_i| each: a norm of about 0.47 of one_rounding;
    # asked: a quarter
    assert (norm(b1 - r1) > one_rounding / 4).all()
    # iCT's pseudo-Huber c (ECT's CIFAR-10 run has c = 0: the L2 norm)
    c = 0.00054 * math.sqrt(x[0].numel())
    assert (one_rounding > c).all()  # and above the c that would set the loss's scale


def test_toy_one_step_lands_on_data(cli, tmp_path):
    """1,000 steps (6 stages of 166): 1-step W1 0.074-0.121 and 2-step 0.063-0.075 over seeds 0-3,
    init 0.381."""
    assert cli(C, ["toy", "--toy-steps", 1000, "--out", tmp_path]) == 0
    rows = {
        (r["model"], r["steps"]): r["distance"]
        for r in json.load(open(tmp_path / "toy.json"))["results"]
    }
    assert rows[("trained", 1)] < rows[("init", 1)] / 3, rows
    assert rows[("trained", 2)] < rows[("init", 1)] / 3, rows
    assert os.path.isfile(tmp_path / "toy.png")


def test_resume_continues_exactly_across_a_stage_with_dropout(cli, logged_losses, tmp_path):
    """The same command plus --resume continues bit for bit across the stage 0 -> 1 boundary, with
    dropout (the masks' draws continue the saved stream)."""
    run = ["train", *TINY, "--set", "dropout=0.1"]
    argv = [*run, "--steps", 4, "--out", tmp_path / "b"]
    assert cli(C, [*run, "--steps", 6, "--out", tmp_path / "a"]) == 0
    assert cli(C, argv) == 0
    assert cli(C, [*argv, "--resume", "--steps", 6]) == 0
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    assert [json.loads(line)["stage"] for line in open(tmp_path / "a" / "log.jsonl")] == [0] * 5 + [
        1
    ]


def test_sample_eval(cli, tmp_path, few_probe_images):
    few_probe_images(400, 200)
    b, one = tmp_path / "b", tmp_path / "one"
    assert cli(C, ["train", *TINY, "--steps", 40, "--out", b]) == 0
    assert cli(C, ["train", *TINY, "--steps", 1, "--out", one]) == 0
    grids = sorted(f for f in os.listdir(b) if f.startswith("samples_"))
    assert grids == [f"samples_{s:07d}.png" for s in (10, 20, 30, 40)] and not any(
        # a grid only at multiples of sample_every
        f.startswith("samples_")
        for f in os.listdir(one)
    )
    for steps in (1, 2):
        out = tmp_path / f"s{steps}.npz"
        assert (
            cli(
                C,
                [
                    "sample",
                    "--ckpt",
                    b / "ckpt.pt",
                    "--n",
                    6,
                    "--sample-steps",
                    steps,
                    "--out",
                    out,
                ],
            )
            == 0
        )
        arr = np.load(out)["arr_0"]
        assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
        assert len({image.tobytes() for image in arr}) == 6  # each image from its own noise
    # eval of the run trained 40 steps beats eval of the same preset trained 1 step (same seed, same
    # samples' noise)
    for run in (b, one):
        assert cli(C, ["eval", "--ckpt", run / "ckpt.pt", "--n", 64]) == 0
    res, res1 = json.load(open(b / "eval.json")), json.load(open(one / "eval.json"))
    assert (
        res["step"] == 40
        and res1["step"] == 1
        and res["fd_model"] == "pixels"
        and res["n_samples"] == 64
    )
    # measured: 41.3 vs 59.6 (2 steps: 40.1 vs 55.0)
    assert res["fd"] < 0.85 * res1["fd"], (res["fd"], res1["fd"])
    assert res["fd_2step"] < 0.85 * res1["fd_2step"], (res["fd_2step"], res1["fd_2step"])
    # the floors are the same seeded U-Net at initialisation, whatever the run
    init = ("probe_linear_init", "probe_knn_init", "detail_pattern_init", "detail_amplitude_init")
    assert {k: res[k] for k in init} == {k: res1[k] for k in init}
    assert "bottleneck" in res["probe"] and {
        "probe_linear",
        "probe_knn",
        "detail_pattern_pixels",
    } <= set(res)
    # bounded: 0 for no stripes, the images the ceiling
    detail_bounded(res)
    detail_bounded(res, "_init")
    assert [f for f, _ in res["probe_linear_by_signal"]] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert all(0 <= a <= 1 for _, a in res["probe_linear_by_signal"])


def test_signal_fraction_of_x_plus_t_e():
    # x + t e: a = 1, s = t, so the fraction of signal is 1 / (1 + t)
    assert C.t_at_signal(0.5) == 1.0
    assert C.t_at_signal(0.1) == pytest.approx(9.0)
    assert C.t_at_signal(0.75) == pytest.approx(1 / 3)


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(C, ["train", *TINY, "--image-size", 15, "--out", tmp_path / "x"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert cli(C, ["sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s.npz"]) == 2
    assert cli(C, ["sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s.png"]) == 2
    assert ".npz" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("a file, not a folder")
    for argv, words in (
        (["train", *TINY, "--set", "bf16=maybe", "--out", tmp_path / "y"], "bf16"),
        (["train", *TINY, "--set", "optim=sgd", "--out", tmp_path / "y"], "optim"),
        (["toy", "--toy-steps", -1, "--out", tmp_path / "t"], "--toy-steps"),
        (["toy", "--out", tmp_path / "a_file" / "t"], "--out"),
    ):
        assert cli(C, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)  # one line on stderr
    # nothing written
    assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "t")
