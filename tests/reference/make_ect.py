"""ECT: the official training/networks.py (ECMPrecond), training/loss.py (ECMLoss) and generator_fn
(ct_eval.py; the same function in training/ct_training_loop.py) against consistency.py (fixtures
ect_net, ect_loss, ect_sample; bench).

The official network is EDM's SongUNet; consistency.py's U-Net differs by design, so both sides run
this repo's U-Net: ECMPrecond builds it as its `model_type` (a subclass registered in
training.networks), and each fixture's state dict is ECMPrecond's (the U-Net's keys under `model.`).
ECMLoss shares the dropout mask by torch.cuda.get/set_rng_state: on a CPU those two calls go to the
CPU generator. ct_training_loop.py imports psutil for its memory log only: a stub. The persistence
decorator's check that a network pickles (for its snapshots) is turned off: the U-Net class is
local.

The fixtures are fp32: neither side runs in float64. ECMPrecond casts x, sigma and the network's
output to fp32 (training/networks.py:701-702, 717); consistency.py's U-Net casts c_noise to fp32
before a Linear (consistency.py:214, "mat1 and mat2 must have the same dtype" once .double()) and
its f casts the network's output to fp32 (consistency.py:161). The tests compare with conftest's
assert_close32. The t -> r mapping alone runs in float64 on both sides: each loss case also holds
the official t_to_r of float64 t (r64), for assert_close64.

Every random draw of the official code is recorded (conftest's Draws.record, in the official
order) and stored, so that the tests feed those draws to ours (Draws.feed) instead of relying on a
seed to reproduce them. The dropout masks: this repo's U-Net draws them with Tensor.bernoulli_
(UNet.dropout_masks) at each call in training mode, here inside ECMPrecond, so Draws sees them
(nn.Dropout's draws, in torch's C++ kernel, it would not). ECMLoss's teacher call replays the
generator's state (training/loss.py:67, 71) and so draws the student's masks again: checked here,
and stored once (as bool). Ours draws the masks once and gives them to both passes: the tests feed
it the student's.
"""

import contextlib
import inspect
import math
import os
import sys
import time
import types

import torch
from make_references import official, save

# tests/, for conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import Draws  # noqa: E402

# a small U-Net (16x16, width 8, one attention level) with dropout 0.3, so that a mask the teacher
# did not share shows
CONFIG = dict(image_size=16, channels=8, ch_mult=[1, 2], num_res=1, attn_res=[8], dropout=0.3)
HUBER_C = 0.00054  # iCT's c / sqrt(dim), for the pseudo-Huber case (ECT's CIFAR-10 run has c = 0)
GRADS = (
    "model.conv_out.weight",
    "model.emb.0.weight",
    "model.mid.0.conv2.weight",
    "model.mid.1.qkv.weight",
    "model.down.0.0.film.bias",
)


def recording(t_to_r, seen):
    """t_to_r that keeps its first t and r in `seen`."""

    def wrapped(t):
        return seen.setdefault("r", t_to_r(seen.setdefault("t", t)))

    return wrapped


@contextlib.contextmanager
def cpu_rng():
    """torch.cuda.get/set_rng_state -> the CPU generator's (ECMLoss replays the dropout mask through
    them)."""
    saved = torch.cuda.get_rng_state, torch.cuda.set_rng_state
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    try:
        yield
    finally:
        torch.cuda.get_rng_state, torch.cuda.set_rng_state = saved


def official_precond(C, cfg):
    """ECMPrecond (its defaults: sigma_min 0.003, sigma_data 0.5) around consistency.UNet(cfg)."""
    from torch_utils import persistence
    from training import networks

    # its check that a snapshot pickles: the U-Net class is local
    persistence._check_pickleable = lambda obj: None

    # ECMPrecond calls model(c_in x, c_noise, class_labels=..., **model_kwargs)
    class RepdiffUNet(C.UNet):
        def __init__(self, img_resolution, in_channels, out_channels, label_dim, cfg):
            super().__init__(cfg)

        def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
            # consistency.UNet takes its dropout as masks: drawn here, at each call in training
            # mode, they are the draws nn.Dropout makes in its layers (nothing else draws in
            # between), so ECMLoss's replay applies
            return super().forward(x, noise_labels, self.dropout_masks(len(x), x.device))

    networks.RepdiffUNet = RepdiffUNet
    return networks.ECMPrecond(
        img_resolution=cfg.image_size, img_channels=3, model_type="RepdiffUNet", cfg=cfg
    )


def official_generator_fn():
    """ct_training_loop.generator_fn, imported with a stub psutil that is removed afterwards."""
    stub = sys.modules.setdefault("psutil", types.ModuleType("psutil"))
    from training.ct_training_loop import generator_fn

    if sys.modules["psutil"] is stub and stub.__spec__ is None:
        del sys.modules["psutil"]
    return generator_fn


def official_defaults(path):
    """ECT's CIFAR-10 settings: ct_train.py's option defaults, overridden by run_ecm.sh's flags,
    plus the defaults of ECMPrecond (sigma_min, sigma_data) and generator_fn (t_max) -> a dict of
    plain values."""
    import ast
    import re

    from training.networks import ECMPrecond

    out = {}
    for dec in next(
        n
        for n in ast.parse(open(os.path.join(path, "ct_train.py")).read()).body
        if isinstance(n, ast.FunctionDef) and n.name == "main"
    ).decorator_list:
        kw = {k.arg: k.value for k in dec.keywords}
        if dec.args and "default" in kw:
            out[dec.args[-1].value.lstrip("-")] = ast.literal_eval(kw["default"])
    # the flags after torchrun's
    script = open(os.path.join(path, "run_ecm.sh")).read().split("ct_train.py")[1]
    for key, value in re.findall(r"--(\w+)=(\S+)", script):
        out[key] = float(value) if re.fullmatch(r"[\d.e-]+", value) else value
    # the class under the persistence decorator
    sig = inspect.signature(ECMPrecond.__bases__[0].__init__).parameters
    out.update(
        sigma_min=sig["sigma_min"].default,
        sigma_data=sig["sigma_data"].default,
        t_max=inspect.signature(official_generator_fn()).parameters["t_max"].default,
    )
    return out


def randomise(pre):
    """Every parameter away from its init: the zero-initialised residual branches, attention and
    output open."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pre.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if ".norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5 * (0.3 if "conv_out" in name else 1.0))


def state(pre):
    return {k: v.detach().clone() for k, v in pre.state_dict().items()}


def stored(drawn):
    """Draws.record's (name, tensor) list -> (the tensors, the names); a bernoulli_ mask (0 or 1)
    as bool, 1 byte a value."""
    tensors = [t.bool() if name == "bernoulli_" else t for name, t in drawn]
    return tensors, [name for name, _ in drawn]


def same_draws(a, b):
    return len(a) == len(b) and all(n == m and torch.equal(s, t) for (n, s), (m, t) in zip(a, b))


def make(repos, batch=4):
    path = official("ect", repos)
    from training.loss import ECMLoss

    import consistency as C

    generator_fn = official_generator_fn()
    torch.manual_seed(0)
    cfg = C.Config(**CONFIG)
    pre = official_precond(C, cfg)
    randomise(pre)
    sd = state(pre)
    g = torch.Generator().manual_seed(1)
    S = cfg.image_size
    # one mask per residual block, all drawn at every call in training mode
    n_masks = len(pre.model.mask_shapes)

    # (a) the preconditioned denoiser D(x, sigma): eval mode (CM's boundary scalings, sigma_min
    # 0.003: D(x, 0.003) = x) and training mode (EDM's scalings; the dropout masks its U-Net drew,
    # recorded)
    sigma = torch.tensor([0.003, 0.002, 0.02, 0.821, 5.0, 80.0])
    x0 = torch.rand(len(sigma), 3, S, S, generator=g) * 2 - 1
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        d_eval = pre.eval()(x, sigma)
        torch.manual_seed(5)
        with Draws.record() as drawn:
            d_train = pre.train()(x, sigma)
    assert torch.equal(d_eval[0], x[0]) and len(drawn) == n_masks
    draws, names = stored(drawn)
    save(
        "ect",
        "net",
        config=CONFIG,
        state_dict=sd,
        x=x,
        sigma=sigma,
        d_eval=d_eval,
        d_train=d_train,
        draws=draws,
        draw_names=names,
        sigma_min=pre.sigma_min,
        sigma_data=pre.sigma_data,
    )

    # (b) the loss: ECMLoss on one batch, at our stage s = official stage s - 1 (s = 0: official
    # stage -1, where the mapping gives r = 0 everywhere), every case from the same draws; the seed
    # is the first whose draws put one t outside [t_min, t_max] (ECT does not clamp) and give at
    # stage 1 both r = 0 and r > 0
    x = torch.rand(batch, 3, S, S, generator=g) * 2 - 1
    c_abs = HUBER_C * math.sqrt(x[0].numel())
    seed = 0
    while True:
        torch.manual_seed(seed)
        t = (torch.randn(batch) * cfg.P_std + cfg.P_mean).exp()
        # official stage 0
        r1 = (t * (1 - (1 + cfg.k * torch.sigmoid(-cfg.b * t)) / cfg.q)).clamp(min=0)
        if ((t < cfg.t_min) | (t > cfg.t_max)).any() and (r1 == 0).any() and (r1 > 0).any():
            break
        seed += 1
    cases, first = [], None
    for stage, c in ((0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (2, c_abs)):
        fn = ECMLoss(
            P_mean=cfg.P_mean,
            P_std=cfg.P_std,
            sigma_data=cfg.sigma_data,
            q=cfg.q,
            c=c,
            k=cfg.k,
            b=cfg.b,
        )
        fn.update_schedule(stage - 1)
        seen = {}
        t_to_r = fn.t_to_r
        fn.t_to_r = recording(t_to_r, seen)
        pre.train().zero_grad()
        torch.manual_seed(seed)
        with cpu_rng(), Draws.record() as drawn:
            per = fn(net=pre, images=x)
        per.mean().backward()
        # loss.py:54 t's normals, :62 e, :68 the student's masks; :71-73 the teacher's: the same
        # masks, drawn again
        student, teacher = drawn[: 2 + n_masks], drawn[2 + n_masks :]
        assert [name for name, _ in student] == ["randn", "randn_like"] + ["bernoulli_"] * n_masks
        assert same_draws(teacher, student[2:]) if (seen["r"] > 0).any() else teacher == []
        assert first is None or same_draws(student, first)
        first = student
        rnd64 = student[0][1].double()
        r64 = t_to_r((rnd64 * cfg.P_std + cfg.P_mean).exp())  # loss.py:55-56 in float64
        grads = {k: p.grad.clone() for k, p in pre.named_parameters() if k in GRADS}
        cases.append(
            dict(
                stage=stage,
                c=c,
                huber_c=HUBER_C if c else 0.0,
                t=seen["t"].flatten(),
                r=seen["r"].flatten(),
                r64=r64.flatten(),
                teacher_draws=len(teacher),
                loss_per_sample=per.detach(),
                loss=per.mean().detach(),
                grads=grads,
            )
        )
        print(
            f"stage {stage} (official {stage - 1}) c {c:.4f}: loss {per.mean().item():.5f}, "
            f"r = 0 for {int((seen['r'] == 0).sum())} of {batch}"
        )
    defaults = official_defaults(path)
    print("official defaults:", defaults)
    draws, names = stored(first)
    save(
        "ect",
        "loss",
        config=CONFIG,
        state_dict=sd,
        x=x,
        draws=draws,
        draw_names=names,
        cases=cases,
        defaults=defaults,
    )

    # (c) the sampler: generator_fn from latents drawn as its callers draw them
    # (ct_training_loop.py:212), its re-noising draws (float64 there, ct_training_loop.py:96)
    # recorded. Each run starts from the same seed, so each run's draws are the first
    # 1 + len(mid_t) of the 3-step run's: those are stored. Its second level, 0.01, is near t_min,
    # where CM's re-noising sqrt(s^2 - t_min^2) (which ECT drops) is 5% below s
    n = 4
    pre.eval()
    outs, runs = {}, {}
    for key, mid_t in (("x1", []), ("x2", [0.821]), ("x3", [0.821, 0.01])):
        torch.manual_seed(7)
        with torch.no_grad(), Draws.record() as drawn:
            latents = torch.randn([n, 3, S, S])
            out = generator_fn(pre, latents, mid_t=mid_t)
        assert out.dtype == torch.float64 and torch.equal(out.float().double(), out)  # fp32 values
        assert out.abs().max() <= 1  # inside [-1, 1]: our sampler's clamp hides nothing
        outs[key], runs[key] = out.float(), drawn
    for drawn in runs.values():
        assert same_draws(drawn, runs["x3"][: len(drawn)])
    draws, names = stored(runs["x3"])
    t_max = inspect.signature(generator_fn).parameters["t_max"].default
    save(
        "ect",
        "sample",
        config=CONFIG,
        state_dict=sd,
        draws=draws,
        draw_names=names,
        t_max=t_max,
        **outs,
    )


def bench(repos, batch=8, repeats=7, width=32, size=32):
    """Forward + backward of the loss at stage 1 (official stage 0), the same U-Net (by default
    width 32, 32x32) on both sides."""
    official("ect", repos)
    from training.loss import ECMLoss

    import consistency as C

    torch.manual_seed(0)
    cfg = C.Config(
        image_size=size,
        channels=width,
        ch_mult=[1, 2, 2],
        num_res=1,
        attn_res=[size // 2],
        dropout=0.2,
    )
    pre = official_precond(C, cfg).train()
    ours = C.Consistency(cfg).train()
    ours.net.load_state_dict({k[len("model.") :]: v for k, v in pre.state_dict().items()})
    fn = ECMLoss(
        P_mean=cfg.P_mean,
        P_std=cfg.P_std,
        sigma_data=cfg.sigma_data,
        q=cfg.q,
        c=0.0,
        k=cfg.k,
        b=cfg.b,
    )
    fn.update_schedule(0)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    runs = {
        "official": lambda: fn(net=pre, images=x).mean().backward(),
        "ours": lambda: ours(x, 1)[0].backward(),
    }
    times = {name: [] for name in runs}
    with cpu_rng():
        for step in runs.values():
            step()  # warm-up
        for _ in range(repeats):  # interleaved, so that a busy moment of a shared CPU hits both
            for name, step in runs.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    ms = {name: sorted(v)[len(v) // 2] / batch * 1e3 for name, v in times.items()}  # the median
    print(
        f"ect loss fwd+bwd, batch {batch}, width {width}, {size}x{size} (median of {repeats}): "
        f"official {ms['official']:.2f} ms/image, ours {ms['ours']:.2f} ms/image, "
        f"ours/official {ms['ours'] / ms['official']:.2f}"
    )
