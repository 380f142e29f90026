"""RCG: the official RDM (latentmlp.py, ddpm.py, ddim.py) and RCG's DiT
(pixel_generator/dit/models.py) against rcg.py (fixtures rcg_rdm, rcg_loss, rcg_ddim, rcg_dit; a
bench).

The official code targets torch 1.7 / lightning 1.4 and a GPU: pytorch_lightning (one decorator)
and the encoder zoo (pretrained_enc, not run: a stub encoder returns fixed representations) are
stubbed with sys.modules entries, Tensor.cuda / Module.cuda are no-ops and the DDIM sampler's
buffers stay where they are, so that it runs on a CPU. The DiT is built as the pixel generator here
uses it: 3 input channels and no learned-sigma half (the official one runs on 4-channel SD-VAE
latents with 8 output channels; its first channels are the eps these correspond to).

Precision. The RDM network, its loss and the DiT run in float64 (`.double()`, float64 inputs), from
weights that are float32 numbers (stored as float32, as released). Two official pieces are float32
on purpose and stay so:
- the sinusoid of the step (timestep_embedding's `.float()`, in both networks): the fixtures carry
  it per step (sin_t, sin_emb), and it reaches the float64 networks as float64 (Sinusoid's forward
  pre-hooks); the tests feed ours the same rows;
- the DDIM sampler's tables: rcg_ddim is float32.
The DiT's attention casts q and k to float32 (to keep them out of autocast's bf16): for the float64
fixture that cast leaves float64 tensors as they are (float64_casts), the only change made to what
the official code computes.

Every random draw of the official code (the loss's t and noise, the sampler's noise, the DiT's
dropped r) is recorded in its order (conftest's Draws.record) and stored: the tests feed them to
ours.
"""

import contextlib
import os
import sys
import time
import types

import torch
import torch.nn as nn
from make_references import official, save

# conftest (tests/) has Draws
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import Draws  # noqa: E402

# the RDM: 16-d representations, width 64, 2 blocks, time_embed_dim 32; the released configs' T and
# betas
RDM_CONFIG = dict(
    dim=16, rdm_width=64, rdm_depth=2, t_dim=32, T=1000, beta_start=0.0015, beta_end=0.0195
)
# MoCo v3 ViT-B's RDM (the paper's)
RDM_YAML = "config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml"
# the DiT: 8x8 images, 2x2 patches (16 tokens), width 32, 2 blocks of 2 heads, 8-d r, half dropped
DIT_CONFIG = dict(image_size=8, patch=2, hidden=32, depth=2, heads=2, rep_dim=8, rep_drop=0.5)
# the global RNG's seeds of the recorded draws (the tests feed the draws: none relies on a seed)
LOSS_SEED, DDIM_SEED, DROP_SEED = 3, 10, 5
# (steps, eta): 1000 // 7 = 142 gives 8 steps (1, 143, ..., 995)
DDIM_RUNS = ((10, 1.0), (7, 1.0), (10, 0.0))
# the bench: the DiT at 32 px (patch 2, width 192, 6 blocks), the paper's RDM network (256-d, width
# 1536, 12 blocks)
BENCH_DIT = dict(image_size=32, patch=2, hidden=192, depth=6, heads=3, rep_dim=256, rep_drop=0.1)
BENCH_RDM = dict(RDM_CONFIG, dim=256, rdm_width=1536, rdm_depth=12, t_dim=256)


@contextlib.contextmanager
def cpu_only():
    """Tensor.cuda / Module.cuda -> no-ops; the stubbed modules the official imports need (taken out
    of sys.modules again at the end)."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    stubs = [
        "pytorch_lightning",
        "pytorch_lightning.utilities",
        "pytorch_lightning.utilities.distributed",
        "pretrained_enc.models_pretrained_enc",
    ]
    added = [name for name in stubs if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["pytorch_lightning.utilities.distributed"].rank_zero_only = lambda f: f
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved
        for name in added:
            del sys.modules[name]


@contextlib.contextmanager
def float64_casts():
    """Tensor.float() leaves float64 tensors as they are (other dtypes convert as usual): the
    official DiT's attention takes q k^T of q.float() and k.float() (models.py:47), which would
    stop a float64 module."""
    real = torch.Tensor.float

    def cast(self, *args, **kwargs):
        if self.dtype == torch.float64:
            return self
        return real(self, *args, **kwargs)

    torch.Tensor.float = cast
    try:
        yield
    finally:
        torch.Tensor.float = real


class Sinusoid:
    """The official float32 sinusoid of the step into a float64 network, kept per step. A forward
    pre-hook on step_module (the step: its positional argument `index`) keeps the step and passes it
    on in float32 (what the official .float() makes of it); one on embed_module (the layer that
    takes the sinusoid) keeps the sinusoid and passes it on as float64.
    table() -> (steps [n] float64, sinusoids [n, dim] float32), one row per step seen."""

    def __init__(self, step_module, index, embed_module):
        self.rows, self.index, self.step = {}, index, None
        self.hooks = [
            step_module.register_forward_pre_hook(self.take_step),
            embed_module.register_forward_pre_hook(self.take_sinusoid),
        ]

    def take_step(self, module, args):
        self.step = args[self.index]
        args = list(args)
        if self.step.is_floating_point():
            args[self.index] = self.step.to(torch.float32)
        return tuple(args)

    def take_sinusoid(self, module, args):
        emb = args[0]
        assert emb.dtype == torch.float32 and len(emb) == len(self.step)
        for t, row in zip(self.step.tolist(), emb):
            self.rows[float(t)] = row.clone()
        return (emb.double(),)

    def table(self):
        for h in self.hooks:
            h.remove()
        steps = sorted(self.rows)
        return torch.tensor(steps, dtype=torch.float64), torch.stack([self.rows[t] for t in steps])


def released_config():
    """The model section of the released RDM config (plain dicts)."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(os.path.join(CHECKOUT, RDM_YAML))
    return OmegaConf.to_container(conf)["model"]


def official_rdm(c):
    """The official RDM of the released config at the sizes of c, without its encoder (float32)."""
    from rdm.util import instantiate_from_config

    conf = released_config()
    p = conf["params"]
    assert (p["timesteps"], p["linear_start"], p["linear_end"]) == (
        c["T"],
        c["beta_start"],
        c["beta_end"],
    )
    assert p["parameterization"] == "x0"
    p["channels"] = c["dim"]
    p["unet_config"]["params"].update(
        in_channels=c["dim"],
        out_channels=c["dim"],
        model_channels=c["rdm_width"],
        bottleneck_channels=c["rdm_width"],
        num_res_blocks=c["rdm_depth"],
        time_embed_dim=c["t_dim"],
    )
    del p["pretrained_enc_config"]
    return instantiate_from_config(conf)


def official_dit(c):
    from pixel_generator.dit.models import DiT

    return DiT(
        input_size=c["image_size"],
        patch_size=c["patch"],
        in_channels=3,
        hidden_size=c["hidden"],
        depth=c["depth"],
        num_heads=c["heads"],
        class_dropout_prob=0,
        rep_dropout_prob=c["rep_drop"],
        num_classes=1,
        learn_sigma=False,
        rep_dim=c["rep_dim"],
    )


def randomise(named, seed=0):
    """Every parameter (or buffer) away from its init, to float32 numbers: LayerNorm gains around
    1, zero-initialised layers non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            if p.dim() == 0 or name == "pos_embed":
                continue
            r = torch.randn(p.shape, generator=g)
            # LayerNorm gains
            if p.dim() == 1 and name.replace(".", "").endswith(("layers0weight", "out0weight")):
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)


CHECKOUT = None  # the official checkout's folder, set by make / bench


def make(repos):
    global CHECKOUT
    CHECKOUT = official("rcg", repos)
    with cpu_only():
        sd = make_rdm_and_loss()
        make_ddim(sd)
        make_dit()


def make_rdm_and_loss():
    """rcg_rdm: the official RDM network with raw and (different) EMA weights; rcg_loss: the
    schedule, the standardisation of the representations, the loss at fixed t and noise (with the
    network's input and output) and with the official code's own draws (t, then the noise). Both
    float64. -> the state dict (float32)."""
    from rdm.modules.diffusionmodules.util import make_beta_schedule

    c = RDM_CONFIG
    torch.manual_seed(0)
    m = official_rdm(c).eval()
    randomise(m.model.named_parameters(), 0)
    randomise(m.model_ema.named_buffers(), 1)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    m.double()
    net = m.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    B, D = 5, c["dim"]
    r_t = torch.randn(B, D, 1, 1, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 998, 999])
    ctx = m.get_learned_conditioning({"class_label": torch.zeros(B).long()})
    sinusoid = Sinusoid(net, 1, net.time_embed)
    with torch.no_grad():
        out = m.apply_model(r_t, t, ctx)
        with m.ema_scope():
            out_ema = m.apply_model(r_t, t, ctx)
    sin_t, sin_emb = sinusoid.table()
    save(
        "rcg",
        "rdm",
        config=c,
        state_dict=sd,
        r_t=r_t.flatten(1),
        t=t,
        out=out.flatten(1),
        out_ema=out_ema.flatten(1),
        sin_t=sin_t,
        sin_emb=sin_emb,
    )

    class Encoder(nn.Module):  # stands for MoCo v3 + its head: returns fixed raw representations
        def forward_features(self, x):
            return raw

        head = nn.Identity()

    raw = torch.randn(4, D, generator=g, dtype=torch.float64) * 3
    raw = raw + torch.arange(4.0, dtype=torch.float64)[:, None]
    m.pretrained_encoder, m.pretrained_enc_withproj = Encoder(), True
    batch = {"image": torch.rand(4, 16, 16, 3, generator=g), "class_label": torch.zeros(4).long()}
    # the standardised representations, [4, D, 1, 1]
    x0 = m.get_input(batch, "image")[0]
    t = torch.tensor([0, 17, 500, 999])
    e = torch.randn(4, D, 1, 1, generator=g, dtype=torch.float64)
    cond = m.get_learned_conditioning({"class_label": torch.zeros(4).long()})
    m.train()
    seen = []
    hook = net.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    sinusoid = Sinusoid(net, 1, net.time_embed)
    loss = m.p_losses(x0, cond, t, noise=e)[0]
    hook.remove()
    torch.manual_seed(LOSS_SEED)
    with Draws.record() as drawn:
        loss_drawn = m(x0, {"class_label": torch.zeros(4).long()})[0]
    sin_t, sin_emb = sinusoid.table()
    betas = make_beta_schedule(
        "linear", c["T"], linear_start=c["beta_start"], linear_end=c["beta_end"]
    )
    save(
        "rcg",
        "loss",
        raw=raw,
        rep=x0.flatten(1),
        t=t,
        e=e.flatten(1),
        r_t=seen[0][0].flatten(1),
        out=seen[0][1].flatten(1),
        loss=loss.detach(),
        drawn=drawn,
        loss_drawn=loss_drawn.detach(),
        betas=torch.from_numpy(betas),
        alphas_cumprod=m.alphas_cumprod.float(),
        sin_t=sin_t,
        sin_emb=sin_emb,
    )
    return sd


def make_ddim(sd):
    """rcg_ddim: the DDIM sampler under ema_scope, as the pixel generators call it, with rcg_rdm's
    weights (sd), in float32 (its tables are float32); its draws (the initial noise, then one a
    step) from the global RNG, recorded."""
    from rdm.models.diffusion.ddim import DDIMSampler

    c, D = RDM_CONFIG, RDM_CONFIG["dim"]
    m = official_rdm(c).eval()
    m.load_state_dict(sd)
    sampler = DDIMSampler(m)
    # the official register_buffer moves the tables to "cuda": here they stay on the CPU
    sampler.register_buffer = lambda name, attr: setattr(sampler, name, attr)
    runs = []
    for i, (steps, eta) in enumerate(DDIM_RUNS):
        with m.ema_scope(), torch.no_grad():
            cond = m.get_learned_conditioning({"class_label": torch.zeros(3).long()})
            torch.manual_seed(DDIM_SEED + i)
            with Draws.record() as drawn:
                x, _ = sampler.sample(
                    steps, conditioning=cond, batch_size=3, shape=[D, 1, 1], eta=eta, verbose=False
                )
        timesteps = torch.from_numpy(sampler.ddim_timesteps)
        runs.append(dict(steps=steps, eta=eta, timesteps=timesteps, drawn=drawn, out=x.flatten(1)))
    save("rcg", "ddim", runs=runs)


def make_dit():
    """rcg_dit, float64: the DiT generator with r, with the null r (fake_latent), without r
    (c = t + y), guided, and in training (r dropped by the recorded draw)."""
    c = DIT_CONFIG
    torch.manual_seed(0)
    dit = official_dit(c).eval()
    randomise(dit.named_parameters(), 2)
    sd = {k: v.clone() for k, v in dit.state_dict().items()}
    dit.double()
    g = torch.Generator().manual_seed(2)
    B, S = 4, c["image_size"]
    x = torch.randn(B, 3, S, S, generator=g, dtype=torch.float64)
    # ours: t in [0, 1]; the official net sees 1000 t (binary fractions: 1000 t is then the same
    # number in float32 and float64)
    t = torch.tensor([0.0, 2.0**-10, 0.375, 1.0], dtype=torch.float64)
    rep = torch.randn(B, c["rep_dim"], generator=g, dtype=torch.float64)
    y = torch.zeros(B).long()
    null = dit.fake_latent.repeat(B, 1)
    sinusoid = Sinusoid(dit.t_embedder, 0, dit.t_embedder.mlp)
    with torch.no_grad(), float64_casts():
        out_rep = dit(x, 1000 * t, y, rep)
        out_null = dit(x, 1000 * t, y, null)
        out_uncond = dit(x, 1000 * t, y, None)
        out_cfg = dit.forward_with_cfg(
            torch.cat([x, x]),
            torch.cat([1000 * t] * 2),
            torch.cat([y, y]),
            3.0,
            torch.cat([rep, null]),
        )[:B]
        dit.train()
        torch.manual_seed(DROP_SEED)
        with Draws.record() as drawn:
            out_train = dit(x, 1000 * t, y, rep)
    drop = drawn[0][1] < c["rep_drop"]
    assert 0 < drop.sum() < B, "pick another DROP_SEED"
    sin_t, sin_emb = sinusoid.table()
    save(
        "rcg",
        "dit",
        config=c,
        state_dict=sd,
        x=x,
        t=t,
        rep=rep,
        out_rep=out_rep,
        out_null=out_null,
        out_uncond=out_uncond,
        cfg_scale=3.0,
        out_cfg=out_cfg,
        drawn=drawn,
        out_train=out_train,
        sin_t=sin_t,
        sin_emb=sin_emb,
    )


def bench(repos, batch=8, repeats=5, dit=BENCH_DIT, rdm=BENCH_RDM):
    """ms/image of forward + backward, official and ours side by side in fp32 on this machine: the
    DiT and the RDM network of the configs dit and rdm (the test of this maker passes tiny ones)."""
    global CHECKOUT
    CHECKOUT = official("rcg", repos)
    with cpu_only():
        import rcg as R

        c = dit
        torch.manual_seed(0)
        theirs = official_dit(c).train()
        ours = R.DiT(
            R.Config(**{k: v for k, v in c.items() if k != "rep_dim"}), c["rep_dim"]
        ).train()
        ours.load_state_dict(theirs.state_dict())
        S = c["image_size"]
        x, t = torch.randn(batch, 3, S, S), torch.rand(batch)
        rep = torch.randn(batch, c["rep_dim"])
        y = torch.zeros(batch).long()
        dit_runs = dict(official=lambda: theirs(x, 1000 * t, y, rep), ours=lambda: ours(x, t, rep))
        theirs_rdm = official_rdm(rdm).model.diffusion_model.train()
        ours_rdm = R.SimpleMLP(rdm["dim"], rdm["rdm_width"], rdm["rdm_depth"], rdm["t_dim"]).train()
        ours_rdm.load_state_dict(theirs_rdm.state_dict())
        r, tt = torch.randn(batch, rdm["dim"]), torch.randint(0, rdm["T"], (batch,))
        ctx = torch.zeros(batch, 1, 512)
        rdm_runs = dict(
            official=lambda: theirs_rdm(r[..., None, None], tt, ctx), ours=lambda: ours_rdm(r, tt)
        )
        for what, runs in (("DiT", dit_runs), ("RDM net", rdm_runs)):
            ms = {}
            for name, fn in runs.items():
                fn().square().mean().backward()  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn().square().mean().backward()
                    times.append(time.perf_counter() - t0)
                ms[name] = 1000 * min(times) / batch
            print(
                f"{what}: official {ms['official']:.2f} ms/image, ours {ms['ours']:.2f} ms/image, "
                f"ours/official {ms['ours'] / ms['official']:.2f} "
                "(fp32, forward + backward, batch "
                f"{batch}, best of {repeats})"
            )
