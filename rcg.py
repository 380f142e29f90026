"""RCG: generate a representation first, then the pixels conditioned on it.

T. Li, D. Katabi, K. He, "Return of Unconditional Generation: A Self-supervised Representation
Generation Method", NeurIPS 2024.

Claim: unconditional generation lags class-conditional generation because it lacks the semantic
signal labels give. A frozen self-supervised encoder supplies that signal without labels: a small
diffusion model (the RDM) learns the distribution of its global representations, and a pixel
generator conditioned on a representation turns a generated one into an image. Unconditional FID at
ImageNet 256: DiT-XL 27.32 -> 4.89 with RCG (MAGE-L 7.04 -> 3.44).

The representation (frozen, no labels): r = E(x), the encoder's global token (optionally a fixed
orthonormal projection to rep_dim), standardised per vector: r <- (r - mean_d r) / std_d r.

The RDM (`train-rdm`): a DDPM on r with the x0-parameterisation, a residual MLP f, true fp32.

    r_t = sqrt(abar_t) r + sqrt(1 - abar_t) e,   t in {0..T-1},   L = |f(r_t, t) - r|^2     (1)
    beta_t = (linspace(sqrt(0.0015), sqrt(0.0195), T))^2,   abar_t = prod (1 - beta)
    DDIM: r_prev = sqrt(abar_prev) r^ + sqrt(1 - abar_prev - s^2) e^ + s n,
          s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev),
          e^ = (r_t - sqrt(abar_t) r^) / sqrt(1 - abar_t)                                  (2)

The pixel generator (`train`): a DiT with c = t_emb + rep_embedder(r), r replaced by a learned
fake_latent with p = 0.1, and representation guidance v = v_null + s (v_r - v_null). `--no-rep`
trains the same DiT without r (c = t_emb + y_emb, one class): the unconditional baseline RCG beats.

Commands (python rcg.py {train-rdm,train,sample,eval} -h lists every flag):

    python rcg.py train-rdm --preset cpu --out runs/rdm      # CPU, < 10 min, random-vit-s
    python rcg.py eval --ckpt runs/rdm/ckpt.pt               # rep_fd against rep_fd_init
    python rcg.py train --preset cpu --out runs/rcg          # and --no-rep --out runs/uncond
    python rcg.py eval --ckpt runs/rcg/ckpt.pt --rdm runs/rdm/ckpt.pt --n 1000
    python rcg.py train-rdm --data cifar10 --out runs/rdm --compile                 # one GPU
    python rcg.py train --data cifar10 --out runs/rcg --compile
    python rcg.py sample --ckpt runs/rcg/ckpt.pt --rdm runs/rdm/ckpt.pt --n 50000 --out s.npz
    torchrun --nproc_per_node 8 rcg.py train-rdm --preset paper --data /path/to/imagenet --out rdm
    torchrun --nproc_per_node 8 rcg.py train --preset paper --data /path/to/imagenet --out dit
    torchrun --nproc_per_node 8 rcg.py eval --ckpt dit/ckpt.pt --rdm rdm/ckpt.pt --n 50000 \
        --fd-model inception --fd-ref VIRTUAL_imagenet256_labeled.npz    # official: FID 4.89

Expected on a CPU (`shapes`, random-vit-s@28's 384-d token, 2 cores): train-rdm 2.7 min, then
rep_fd 9.3 against 376 at initialisation and 2.8 between held-out real representations and the
training ones (the floor); the pixel generators (1,500 steps, 3.4 min): FD 3.08 with RCG against
3.82 with --no-rep (pixel features, 1,000 samples). eval's detail_pattern and detail_amplitude:
the stripes in the pixels made from each test image's own r (how much detail the representation
lets the generator put back).

`--preset paper` is the official DiT-XL row (ImageNet 256, unconditional) as near as this file can
train it: the official RDM recipe, then a DiT-XL on 16-px pixel patches at the official schedule
(PRESETS["paper"] lists what differs). The official 4.89 (27.32 without RCG) is its latent
DiT-XL/2, FID as ADM's suite computes it (fd_ref here); this one is not measured, and v-prediction
on pixel patches that large is expected to land far above it.

Encoders (--encoder, common.load_encoder): dinov2_vitb14, a soda.py or decoupled_latent.py export,
or random-vit-s (offline). The paper's MoCo v3 ViT-B with its 256-d head has no loader here.

Deliberate differences from the official code (LTH14/rcg), so that it runs offline at CIFAR scale:
- the DiT denoises pixels, where the official denoises SD-VAE latents (no VAE needed at 32 px);
- repa.py's linear interpolant and v-loss with Heun sampling, where the official is an
  eps-prediction DDPM with learned sigma sampled in 250 ancestral steps;
- bf16 autocast when the DiT trains on a GPU (official: fp32 with TF32; `paper`: as the official,
  bf16=False); every sampler runs in true fp32;
- the images are centre-cropped squares, decoded once (common.load_images), and each one's r (and
  its mirror image's) is computed once, where the official resizes the shorter side to 256 and
  crops 256 at random along the longer one at every step, then encodes that crop: that needs the
  uncropped images decoded at every step and the encoder run in every step, another data path than
  common's. On square images (CIFAR-10, shapes) the two are the same; on ImageNet the official sees
  more views of each image (the effect is not measured here). Flips are the official's (flip_aug).

The released class-unconditional RDMs (MoCo v3 ViT-B / ViT-L, linked from LTH14/rcg's README) load
with their EMA weights; no generator here reads MoCo v3 representations:

    python -c "import rcg; print(rcg.load_official_rdm('rdm.pth').sample(16))"   # 16 r of 256-d
"""

import argparse
import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import common
from common import UsageError, print0


# ------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    data: str = "cifar10"  # dataset (common.load_images)
    image_size: int = 32  # images are resized to image_size^2
    # frozen encoder (paper: MoCo v3 ViT-B + projection head, no loader here)
    encoder: str = "dinov2_vitb14"
    rep_dim: int = 0  # > 0: a fixed orthonormal projection of the global token (paper: 256-d head)
    # train on the images and their mirror images (the representations of both, once)
    flip_aug: bool = True
    # the RDM
    rdm_width: int = 1536  # paper: 1536
    rdm_depth: int = 12  # residual blocks (paper: 12)
    T: int = 1000  # diffusion steps (paper: 1000)
    beta_start: float = 0.0015  # linear-in-sqrt beta schedule (paper)
    beta_end: float = 0.0195
    rdm_sample_steps: int = 250  # DDIM steps (paper: 250)
    eta: float = 1.0  # DDIM eta (paper: 1)
    # the pixel generator: DiT-S/2 conditioned on r
    no_rep: bool = False  # the unconditional baseline: the same DiT without r
    patch: int = 2
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    rep_drop: float = 0.1  # r replaced by the learned null r, fake_latent (paper: 0.1)
    rep_cfg: float = 1.0  # representation guidance scale (1: none)
    sample_steps: int = 50  # Heun steps
    # the schedule of the command that runs (train-rdm: RDM_SCHEDULE below)
    steps: int = 100_000  # optimiser steps
    batch_size: int = 256  # global batch size
    # AdamW, constant after the warm-up. train: fixed at any batch, as the official code (DiT: 1e-4
    # at batch 2048); train-rdm: the batch scales it (common.scale_lr), as the official blr x batch
    lr: float = 1e-4
    weight_decay: float = 0.0  # DiT: 0
    # official DiT: AdamW betas (0.9, 0.95); the RDM: (0.9, 0.999) (RDM_SCHEDULE)
    adam_beta2: float = 0.95
    warmup: int = 0  # linear warm-up steps (official: none; no gradient clipping either)
    # train: the DiT under bf16 autocast on a GPU; false: fp32 with TF32 matmuls, as the official
    # DiT (the RDM and every sampler run in true fp32 either way)
    bf16: bool = True
    ema: float = 0.9999  # paper: 0.9999 (with warm-up here)
    log_every: int = 50  # steps between log.jsonl rows
    sample_every: int = 5_000  # steps between sample grids
    grid: int = 64  # images in the sample grids (0: none): real ones, then those made from their r
    ckpt_every: int = 2_500  # steps between checkpoints
    num_classes: int = 10  # filled in from the data (only the probe uses labels)
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(
        data="shapes:200",
        image_size=16,
        encoder="random-vit-s@28",
        rdm_width=64,
        rdm_depth=2,
        T=100,
        rdm_sample_steps=10,
        patch=4,
        hidden=64,
        depth=2,
        heads=2,
        sample_steps=4,
        steps=20,
        batch_size=16,
        lr=1e-3,
        ema=0.9,
        log_every=1,
        sample_every=10,
        ckpt_every=10,
    ),
    # 2-core CPU: the RDM on the random ViT's 384-d global tokens of `shapes` (the representations,
    # encoded once)
    "cpu": dict(
        data="shapes:10000",
        image_size=16,
        encoder="random-vit-s@28",
        rdm_width=256,
        rdm_depth=4,
        rdm_sample_steps=50,
        patch=4,
        hidden=128,
        depth=4,
        heads=4,
        sample_steps=20,
        steps=1500,
        batch_size=64,
        lr=5e-4,
        warmup=100,
        ema=0.999,
        sample_every=500,
        ckpt_every=500,
    ),
    # one GPU: CIFAR-10 32 px, DINOv2-B/14 global token at 224 (768-d), the paper's RDM, DiT-S/2
    "default": dict(),
    # RCG with a DiT-XL pixel generator, unconditional ImageNet 256: the paper's comparison of pixel
    # generators with and without RCG (DiT-XL/2: FID 27.32 -> 4.89); LTH14/rcg's README, "Pixel
    # Generator: DiT", releases that DiT-XL/2 (400 epochs, FID 4.89, IS 143.2: 250 steps, no
    # guidance). Its command: main_dit.py --rep_cond --rep_dim 256 (MoCo v3 ViT-B), 128 GPUs x
    # batch 16 = 2048, 400 epochs (400 x 1,281,167 / 2048 = 250,227.9 -> 250,228 steps), --lr 1e-4
    # (fixed at any batch), weight decay 0, AdamW (0.9, 0.95), constant lr, no warm-up, no
    # clipping, EMA 0.9999, r dropped with p = 0.1, fp32 with TF32, Resize(256) + RandomCrop(256)
    # + flips; the RDM it samples r from (250 DDIM steps, eta 1) is train-rdm's `paper`
    # (RDM_SCHEDULE). What differs, and what it costs:
    # - pixels on 16-px patches for SD-VAE latents (32x32x4) on 2-px ones: the same 256 tokens and
    #   DiT-XL widths (28 blocks of 1152, 16 heads; 675.7M parameters, DiT-XL/2's 675M), so the
    #   same transformer FLOPs a step and no VAE, but each token predicts 768 values (official:
    #   16), a size at which eps- and v-prediction fail on pixels (jit_xpred.py's paper): expect
    #   an FID far above 4.89 (not measured here);
    # - the v-loss and 125 Heun steps (249 evaluations of the DiT) for the eps-prediction DDPM
    #   with learned sigma and its 250 ancestral steps;
    # - DINOv2-B/14's global token through a fixed orthonormal 256-d projection for MoCo v3 ViT-B
    #   and its trained 256-d head (no MoCo v3 loader here);
    # - centre crops, each image's r computed once (the module's deliberate differences);
    # - the EMA warms up, (1 + step) / (10 + step) (the official DiT's starts at 0.9999): by step
    #   250,228 the warm-up's weights weigh 0.9999^250,000 ~ 1e-11 in it.
    "paper": dict(
        data="imagenet",
        image_size=256,
        encoder="dinov2_vitb14",
        rep_dim=256,
        flip_aug=True,
        rdm_width=1536,
        rdm_depth=12,
        T=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        rdm_sample_steps=250,
        eta=1.0,
        patch=16,
        hidden=1152,
        depth=28,
        heads=16,
        rep_drop=0.1,
        rep_cfg=1.0,
        sample_steps=125,
        steps=250_228,
        batch_size=2048,
        # fixed at any batch, as the official code
        lr=1e-4,
        weight_decay=0.0,
        adam_beta2=0.95,
        warmup=0,
        ema=0.9999,
        bf16=False,
    ),
}
# over the preset, for train-rdm (official: batch 512, lr 5.12e-4, AdamW weight decay 0.01)
RDM_SCHEDULE = {
    "tiny": dict(batch_size=32, adam_beta2=0.999),
    "cpu": dict(steps=4000, batch_size=256, lr=1e-3, weight_decay=0.01, adam_beta2=0.999),
    "default": dict(steps=100_000, batch_size=512, lr=5.12e-4, weight_decay=0.01, adam_beta2=0.999),
    # LTH14/rcg's README, "RDM": main_rdm.py on 4 GPUs x batch 128 = 512, 200 epochs (200 x
    # 1,281,167 / 512 = 500,455.9 -> 500,456 steps), --blr 1e-6: lr = blr x batch = 5.12e-4
    # (common.scale_lr keeps the rule at another batch), constant, no warm-up, AdamW (0.9, 0.999)
    # with weight decay 0.01, fp32, EMA 0.9999 warmed up (LitEma, as here); the same crops and
    # flips as the DiT's
    "paper": dict(steps=500_456, batch_size=512, lr=5.12e-4, weight_decay=0.01, adam_beta2=0.999),
}
# train-rdm's presets (--resume compares them)
RDM_PRESETS = {k: PRESETS[k] | v for k, v in RDM_SCHEDULE.items()}


# ------------------------------------------------------------------------------- the representation
def fixed_projection(dim_in, dim_out, seed=0):
    """A seeded orthonormal [dim_in, dim_out]: the same matrix for every run with the same sizes."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim_in, dim_out, generator=g))[0]


def standardise(r):
    """(r - mean over dims) / std over dims, per vector (the official code's normalisation)."""
    return (r - r.mean(-1, keepdim=True)) / r.std(-1, keepdim=True).clamp_min(1e-6)


class Representation:
    """images in [-1, 1] -> r [B, D]: the frozen encoder's global token, projected when rep_dim > 0,
    standardised."""

    def __init__(self, cfg, device):
        self.encoder = common.load_encoder(cfg.encoder, device)
        D = self.encoder.dim
        if cfg.rep_dim > D:
            raise UsageError(f"rep_dim {cfg.rep_dim} is larger than the encoder's {D}-d token")
        self.proj = fixed_projection(D, cfg.rep_dim).to(device) if cfg.rep_dim else None
        self.dim = cfg.rep_dim or D

    def __call__(self, x):
        r = self.encoder(x)[0].float()  # the global token [B, D_encoder]
        return standardise(r @ self.proj if self.proj is not None else r)


# ------------------------------------------------------------------------------------------ the RDM
def betas_linear_sqrt(T, start, end):
    return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2


class RDM(nn.Module):
    """forward(r [B, D]) -> the x0-parameterised DDPM loss (1); sample(n) -> generated
    representations [n, D] (2). Both in true fp32 (the caller's autocast(device, False) in training;
    sample sets it itself)."""

    def __init__(self, cfg, dim, t_dim=256):
        super().__init__()
        self.cfg, self.dim, self.net = cfg, dim, SimpleMLP(dim, cfg.rdm_width, cfg.rdm_depth, t_dim)
        abar = torch.cumprod(1 - betas_linear_sqrt(cfg.T, cfg.beta_start, cfg.beta_end), 0)
        # [T], float64: sqrt rounded once, as official
        self.register_buffer("abar", abar, persistent=False)

    def forward(self, r, t=None, e=None):
        """t [B] (integer steps) and e [B, D] (the noise) are drawn when not given."""
        t = torch.randint(0, self.cfg.T, (len(r),), device=r.device) if t is None else t
        e = torch.randn_like(r) if e is None else e
        a = self.abar[t][:, None]  # [B, 1]
        r_t = a.sqrt().float() * r + (1 - a).sqrt().float() * e  # [B, D] (1)
        return ((self.net(r_t, t).float() - r) ** 2).mean()

    @torch.no_grad()
    def sample(self, n, *, steps=None, eta=None, generator=None):
        """DDIM (2) from pure noise on LDM's uniform grid t = T - c + 1, ..., 1 + c, 1 (c = T //
        steps); the last step goes to abar_0, as the official sampler does. On the model's device,
        in true fp32."""
        cfg, device = self.cfg, self.abar.device
        eta = cfg.eta if eta is None else eta
        c = cfg.T // (steps or cfg.rdm_sample_steps)
        ts = [min(k + 1, cfg.T - 1) for k in range(0, cfg.T, c)][::-1]  # descending
        abar = self.abar.float()  # the official sampler's float32 table
        x = torch.randn((n, self.dim), device=device, generator=generator)
        with common.autocast(device, False):
            for i, t in enumerate(ts):
                a, a_prev = abar[t], abar[ts[i + 1] if i + 1 < len(ts) else 0]
                r_hat = self.net(x, torch.full((n,), t, device=device)).float()  # [n, D]
                e_hat = (x - a.sqrt() * r_hat) / (1 - a).sqrt()
                s = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
                noise = torch.randn(x.shape, device=device, generator=generator)
                # (2)
                x = (
                    a_prev.sqrt() * r_hat
                    + (1 - a_prev - s**2).clamp_min(0).sqrt() * e_hat
                    + s * noise
                )
        return x


# ------------------------------------------------------------------------------ the pixel generator
class RCG(nn.Module):
    """forward(x, r) -> the v-loss of the pixel generator; sample(r) -> images. r: standardised
    representations [B, D] (None with --no-rep)."""

    def __init__(self, cfg, rep_dim):
        super().__init__()
        self.cfg, self.rep_dim = cfg, 0 if cfg.no_rep else rep_dim
        self.net = DiT(cfg, self.rep_dim)

    def forward(self, x, r=None):
        t = torch.rand(x.shape[0], device=x.device)  # [B]
        e = torch.randn_like(x)
        x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * e  # [B, 3, H, W]
        # v = e - x; r dropped inside the net
        return ((self.net(x_t, t, r).float() - (e - x)) ** 2).mean()

    def velocity(self, x, t, r, scale):
        """v(x, t | r) with representation guidance: v_null + scale (v_r - v_null); t is a float for
        the batch."""
        B = x.shape[0]
        tt = torch.full((B,), t, device=x.device)
        if not self.rep_dim or scale == 1:
            return self.net(x, tt, r).float()
        v = self.net(
            torch.cat([x, x]),
            torch.cat([tt, tt]),
            torch.cat([r, self.net.fake_latent.expand(B, -1)]),
        )
        v_r, v_null = v.float().chunk(2)  # 2 x [B, 3, H, W]
        return v_null + scale * (v_r - v_null)

    @torch.no_grad()
    def sample(self, r=None, *, n=None, steps=None, scale=None, generator=None):
        """Representations r [B, D] (or n with --no-rep) -> images [B, 3, H, W] in [-1, 1], from
        noise at t = 1; on the model's device, in true fp32 (as the official sampler)."""
        cfg, device = self.cfg, self.net.pos_embed.device
        n = len(r) if r is not None else n
        x = torch.randn((n, 3, cfg.image_size, cfg.image_size), device=device, generator=generator)
        scale = cfg.rep_cfg if scale is None else scale
        with common.autocast(device, False):
            x = sample_ode(lambda x, t: self.velocity(x, t, r, scale), x, steps or cfg.sample_steps)
        return x.clamp(-1, 1)


def sample_ode(v, x, steps):
    """Heun on dx/dt = v(x, t) from t = 1 (noise) to 0; the last step is Euler (no evaluation at t =
    0)."""
    ts = torch.linspace(1, 0, steps + 1).tolist()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        d = v(x, t)
        if i == steps - 1:
            x = x + (t_next - t) * d
        else:
            x = x + (t_next - t) * 0.5 * (d + v(x + (t_next - t) * d, t_next))
    return x


# -------------------------------------------------------------------- the RDM's backbone: SimpleMLP
def timestep_embedding(t, dim):
    """t [B] (integer steps, or floats) -> [B, dim]: [cos, sin] of t * 10000^(-i / (dim/2)) (ADM's,
    the official)."""
    f = torch.exp(
        -math.log(10000) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2)
    )
    a = t[:, None].float() * f[None]  # [B, dim/2]
    return torch.cat([a.cos(), a.sin()], 1)


class ResBlock(nn.Module):
    """h + out(in(h) + emb(t)): in = LayerNorm, SiLU, Linear; out = LayerNorm, SiLU,
    zero-initialised Linear."""

    def __init__(self, w, t_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.LayerNorm(w), nn.SiLU(), nn.Linear(w, w))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, w))
        # official: p 0
        self.out_layers = nn.Sequential(
            nn.LayerNorm(w), nn.SiLU(), nn.Dropout(0.0), nn.Linear(w, w)
        )
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)

    def forward(self, h, emb):  # h [B, W], emb [B, t_dim] -> [B, W]
        return h + self.out_layers(self.in_layers(h) + self.emb_layers(emb))


class SimpleMLP(nn.Module):
    """The RDM's network f(r_t, t) -> r^ [B, D], with the official module's names (its state dict
    loads as it is). The time embedding: a width-wide sinusoid of the integer step, an MLP to t_dim
    (the official time_embed_dim)."""

    def __init__(self, dim, width, depth, t_dim=256):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(width, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.input_proj = nn.Linear(dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width, t_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width, eps=1e-6), nn.SiLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, r, t):
        h = self.input_proj(r)  # [B, D] -> [B, W]
        # [B] -> [B, W] -> [B, t_dim]
        emb = self.time_embed(timestep_embedding(t, self.input_proj.out_features))
        for block in self.res_blocks:
            h = block(h, emb)  # [B, W]
        return self.out(h)  # [B, W] -> [B, D]


# -------------------------------------------------------------- the pixel generator's backbone: DiT
def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding -> [grid*grid, dim]: [sin, cos] of the column, then of
    the row (MAE's get_2d_sincos_pos_embed, in float64 as there)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    out = [torch.outer(p.flatten().double(), omega) for p in (xx, yy)]  # 2 x [N, dim/4]
    return torch.cat(
        [torch.sin(out[0]), torch.cos(out[0]), torch.sin(out[1]), torch.cos(out[1])], 1
    ).float()


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        # 3 x [B, h, N, hd]
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # [B, h, N, hd] -> [B, N, D]
        return self.proj(common.attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """DiT block: LayerNorm, attention, GELU MLP (exact GELU, as RCG's DiT), adaLN-zero modulation
    from c."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # timm's Mlp
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):  # x [B, N, D], c [B, D] -> [B, N, D]
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, -1)  # 6 x [B, 1, D]
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2 * self.mlp.fc2(
            nn.functional.gelu(self.mlp.fc1(modulate(self.norm2(x), sh2, sc2)))
        )


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # [B] -> [B, dim]
        return self.mlp(timestep_embedding(t, self.freq_dim))


class DiT(nn.Module):
    """forward(x_t [B, 3, H, W], t [B] in [0, 1], r [B, D] or None) -> v [B, 3, H, W]. The official
    DiT's names: c = t_emb(1000 t) + rep_embedder(r), r replaced by fake_latent with p = rep_drop in
    training; without r, c = t_emb + y_emb(0) (the official unconditional DiT's one-class table:
    frozen, unused, when r conditions)."""

    def __init__(self, cfg, rep_dim):
        super().__init__()
        p, D = cfg.patch, cfg.hidden
        self.grid, self.p, self.rep_dropout_prob = cfg.image_size // p, p, cfg.rep_drop
        self.x_embedder = nn.ModuleDict(dict(proj=nn.Conv2d(3, D, p, p)))
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.ModuleDict(dict(embedding_table=nn.Embedding(1, D))).requires_grad_(
            not rep_dim
        )
        self.rep_embedder = nn.Linear(rep_dim, D) if rep_dim else None
        # the null r
        self.fake_latent = nn.Parameter(0.02 * torch.randn(1, rep_dim)) if rep_dim else None
        # [1, N, D] (official: a frozen parameter)
        self.register_buffer("pos_embed", sincos_2d(self.grid, D)[None])
        self.blocks = nn.ModuleList(Block(D, cfg.heads) for _ in range(cfg.depth))
        self.final_layer = nn.ModuleDict(
            dict(
                norm_final=nn.LayerNorm(D, elementwise_affine=False, eps=1e-6),
                linear=nn.Linear(D, p * p * 3),
                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D)),
            )
        )
        for m in self.modules():  # the official init
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(D, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        f = self.final_layer
        # adaLN-zero
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [f.adaLN_modulation[-1], f.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, r=None):
        B, p, g = x.shape[0], self.p, self.grid
        # [B, D, g, g] -> [B, N, D]
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(1000 * t)  # [B, D]: the official DDPM's step scale
        if r is None:
            c = c + self.y_embedder.embedding_table.weight[0]
        else:
            if self.training and self.rep_dropout_prob > 0:
                drop = torch.rand(B, device=x.device) < self.rep_dropout_prob
                r = torch.where(drop[:, None], self.fake_latent.to(r.dtype), r)
            c = c + self.rep_embedder(r)  # [B, rep_dim] -> [B, D]
        for block in self.blocks:
            h = block(h, c)  # [B, N, D]
        f = self.final_layer
        sh, sc = f.adaLN_modulation(c)[:, None].chunk(2, -1)  # 2 x [B, 1, D]
        out = f.linear(modulate(f.norm_final(h), sh, sc))  # [B, N, p*p*3]
        out = out.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # [B, 3, g, p, g, p]
        return out.reshape(B, 3, g * p, g * p)


# ------------------------------------------------------------------------------------- train / main
class Data:
    """The training images with their representations, computed once (with flip_aug, also of the
    mirror images)."""

    def __init__(self, cfg, rep, d):
        self.cfg, self.d, self.reps = cfg, d, None
        self.images, self.labels, cfg.num_classes = common.load_images(
            cfg.data, "train", cfg.image_size
        )
        if rep is not None:  # (none for the --no-rep baseline)

            def flipped(x, first_row):
                return rep(x.flip(3))

            def unflipped(x, first_row):
                return rep(x)

            views = (unflipped, flipped) if cfg.flip_aug else (unflipped,)
            # r of each image, and of its mirror image when flips augment [N, D] each
            self.reps = [
                common.extract(fn, self.images, d.device, desc="representations").cpu()
                for fn in views
            ]

    def batch(self, step, bs):
        """-> (x [B, 3, H, W] in [-1, 1], r [B, D] or None): rows drawn with replacement, each
        mirrored at random (flip_aug) together with its representation."""
        cfg, d = self.cfg, self.d
        x, _ = common.batch(
            self.images, self.labels, bs, cfg.seed, step, d.rank, flip=cfg.flip_aug, device=d.device
        )
        if self.reps is None:
            return x, None
        # common.batch's draws
        rows, mirrored = common.batch_rows(len(self.images), bs, cfg.seed, step, d.rank)
        # [B, D]
        return x, torch.where(mirrored[:, None], self.reps[-1][rows], self.reps[0][rows]).to(
            d.device
        )


def make_config(args, presets=PRESETS):
    cfg = common.configure(Config, presets, args)
    if args.cmd == "train-rdm":
        # the official RDM's lr = blr x batch; the DiT's is fixed at any batch (Config.lr)
        cfg = common.scale_lr(cfg, args, Config, presets)
    if cfg.image_size % cfg.patch:
        raise UsageError(
            f"image size {cfg.image_size} is not divisible by the patch size {cfg.patch}"
        )
    betas_ok = 0 < cfg.beta_start < cfg.beta_end < 1
    if not betas_ok or cfg.rdm_sample_steps > cfg.T or min(cfg.T, cfg.rep_dim + 1) < 1:
        raise UsageError(
            "need 0 < beta_start < beta_end < 1, 1 <= rdm_sample_steps <= T and rep_dim >= 0"
        )
    fractions_ok = 0 <= cfg.rep_drop < 1 and 0 <= cfg.eta <= 1 and 0 <= cfg.adam_beta2 < 1
    if not fractions_ok or cfg.grid < 0:
        raise UsageError("rep_drop and adam_beta2 must be in [0, 1), eta in [0, 1] and grid >= 0")
    return cfg


def precision(cfg, device, rdm):
    """The training forward's precision: the RDM in true fp32 (it is small); the DiT under bf16
    autocast (cfg.bf16), else in fp32 with setup_dist's TF32 matmuls, as the official DiT."""
    if rdm:
        return common.autocast(device, False)
    return common.autocast(device) if cfg.bf16 else contextlib.nullcontext()


def train(args):
    """train-rdm: the RDM on the frozen encoder's standardised representations of the training
    images; train: the pixel generator conditioned on them (or, with --no-rep, on nothing). One loop
    for both."""
    rdm = args.cmd == "train-rdm"
    presets = RDM_PRESETS if rdm else PRESETS
    d, cfg, ckpt = common.start_run(args, Config, presets, lambda a: make_config(a, presets))
    # the images first (cached for Data): a missing folder is one line before the encoder loads
    common.load_images(cfg.data, "train", cfg.image_size)
    rep = Representation(cfg, d.device) if rdm or not cfg.no_rep else None
    data = Data(cfg, rep, d)
    # the same initial weights on every rank (and in eval's "at initialisation")
    torch.manual_seed(cfg.seed)
    model = (RDM(cfg, rep.dim) if rdm else RCG(cfg, rep.dim if rep else 0)).to(d.device)
    ema = common.Ema(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    start = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(
        f"{type(model).__name__} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
        f"{f'{cfg.encoder} r ({rep.dim}-d)' if rep else 'no r'}, "
        f"{len(data.images)} images of {cfg.data}, "
        f"step {start} -> {cfg.steps}, {d.world} x {d.device}"
    )
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world
    log = common.Log(args.out, d, cfg, start)
    for step in log.steps(start, cfg.steps):
        # learning rate: linear warm-up, then constant
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        # forward (the RDM: the loss (1) of r in true fp32, it is small; the DiT: the v-loss of x
        # given r, bf16 autocast on a GPU unless bf16=False: precision()), backward, update, EMA
        # this rank's rows, drawn with replacement, mirrored at random with their r
        x, r = data.batch(step, bs)
        with precision(cfg, d.device, rdm):
            loss = step_model(r) if rdm else step_model(x, r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, min(cfg.ema, (1 + step) / (10 + step)))  # EMA, its decay warmed up
        # log (averaged over the processes; a NaN stops the run), sample grid (the DiT), checkpoint
        done = step + 1
        log(done, loss, lr=lr)
        # real images, then made from their r
        if d.master and cfg.grid and not rdm and done % cfg.sample_every == 0:
            real, r_real = data.batch(0, math.ceil(cfg.grid / 2))
            # own generator: the training RNG stream is untouched
            g = torch.Generator(d.device).manual_seed(cfg.seed)
            made = ema.model.sample(r_real, n=len(real), generator=g)  # the run's own Heun steps
            common.save_grid(
                torch.cat([real, made])[: cfg.grid],
                os.path.join(args.out, f"samples_{done:07d}.png"),
            )
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(
                args.out,
                d,
                done,
                cfg,
                model,
                ema,
                opt,
                kind="rdm" if rdm else "generator",
                rep_dim=rep.dim if rep else 0,
            )


def load_official_rdm(path, ema=True):
    """A released RDM (LTH14/rcg's main_rdm.py checkpoint, {"model": state dict, "args":
    argparse.Namespace, ...}, or that state dict, or a path to either) -> our RDM with its EMA
    weights (those the official sampler uses; ema=False: the raw ones), on the CPU. Sizes are read
    from the weights; T and the betas are the released configs' (the defaults here)."""
    sd = path
    if not isinstance(path, dict):
        try:
            # main_rdm.py saves its args beside
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(
                f"cannot read {path} as a main_rdm.py checkpoint ({type(e).__name__}: {e})"
            ) from None
    sd, pre = sd.get("model", sd), "model.diffusion_model."
    net = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
    if ema:  # LitEma's buffers: the parameter's name without dots
        net = {k: sd["model_ema.diffusion_model" + k.replace(".", "")] for k in net}
    width, dim = net["input_proj.weight"].shape
    depth = len({k.split(".")[1] for k in net if k.startswith("res_blocks.")})
    rdm = RDM(Config(rdm_width=width, rdm_depth=depth), dim, t_dim=len(net["time_embed.0.weight"]))
    rdm.net.load_state_dict(net)
    return rdm.eval()


def load(path, device, kind=None, compile_net=False):
    """An rcg.py checkpoint -> (ckpt, cfg, the EMA model: RDM or RCG, in eval mode; compile_net: its
    .net compiled)."""
    ckpt = common.load_checkpoint(path)
    if ckpt.get("kind") not in ("rdm", "generator") or (kind and ckpt["kind"] != kind):
        want = {"rdm": "a train-rdm", "generator": "a train"}.get(kind, "an rcg.py")
        raise UsageError(f"{path} is not {want} checkpoint")
    cfg = common.config_of(Config, ckpt, path)
    model = (RDM if ckpt["kind"] == "rdm" else RCG)(cfg, ckpt["rep_dim"])
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError as e:
        raise UsageError(
            f"{path}: the weights do not match its config ({type(e).__name__})"
        ) from None
    model = model.to(device).eval()
    if compile_net:
        model.net = torch.compile(model.net)
    return ckpt, cfg, model


def load_pair(args, d):
    """The checkpoint of --ckpt and the RDM (--ckpt itself, or --rdm) -> (ckpt, gen or None, rdm or
    None), checked to use the same representation; both compiled with --compile."""
    ckpt, cfg, model = load(args.ckpt, d.device, compile_net=args.compile)
    gen, rdm = (None, model) if ckpt["kind"] == "rdm" else (model, None)
    if gen is not None and gen.rep_dim and args.rdm:
        _, rcfg, rdm = load(args.rdm, d.device, "rdm", args.compile)
        same = ("encoder", "rep_dim", "image_size")
        if any(getattr(rcfg, k) != getattr(cfg, k) for k in same):
            raise UsageError(
                f"--rdm {args.rdm} models {rcfg.encoder} (rep_dim {rcfg.rep_dim}) representations; "
                f"the generator was trained on {cfg.encoder} (rep_dim {cfg.rep_dim})"
            )
    return ckpt, gen, rdm


def generate(gen, rdm, n, args, d):
    """n images: a representation from the RDM, then the pixels from it (or unconditional with
    --no-rep)."""
    if gen.rep_dim and rdm is None:
        raise UsageError(
            "this generator is conditioned on representations: pass --rdm DIR/ckpt.pt (train-rdm)"
        )
    per = math.ceil(n / d.world)
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = []
    for i in tqdm(range(0, per, args.batch), desc="sample", disable=not d.master):
        b = min(args.batch, per - i)
        r = rdm.sample(b, steps=args.rdm_steps, generator=g) if gen.rep_dim else None  # [b, D]
        xs.append(gen.sample(r, n=b, steps=args.sample_steps, scale=args.rep_cfg, generator=g))
    return common.gather(torch.cat(xs), n, d)


def sample_cmd(args):
    d = common.setup_dist(args.device)
    ckpt, gen, rdm = load_pair(args, d)
    if gen is None:
        raise UsageError(
            f"{args.ckpt} is an RDM: sample takes the generator's checkpoint and --rdm"
        )
    x = generate(gen, rdm, args.n, args, d)
    if d.master:
        common.write_samples(args.out, x)


def rep_fd(rdm, real, n, args):
    """FD between n representations the RDM generates (or, for rdm a tensor, those) and the real
    ones [M, D]."""
    g = torch.Generator(real.device).manual_seed(args.seed)
    if torch.is_tensor(rdm):
        fake = rdm
    else:
        chunks = tqdm(range(0, n, 1000), desc="RDM", leave=False)
        fake = [rdm.sample(min(1000, n - i), steps=args.rdm_steps, generator=g) for i in chunks]
        fake = torch.cat(fake)
    fake, real = fake.double().cpu().numpy(), real.double().cpu().numpy()
    return round(
        common.frechet_distance(
            fake.mean(0), np.cov(fake, rowvar=False), real.mean(0), np.cov(real, rowvar=False)
        ),
        4,
    )


def eval_cmd(args):
    d = common.setup_dist(args.device)
    ckpt, gen, rdm = load_pair(args, d)
    cfg = (gen or rdm).cfg
    data = args.data or cfg.data
    res = dict(
        step=ckpt["step"],
        data=data,
        encoder=cfg.encoder,
        fd=None,
        fd_model=args.fd_model,
        n_samples=0,
    )
    if gen is not None:
        fd_net = common.FDFeatures(args.fd_model, d.device)
        x = generate(gen, rdm, args.n, args, d)
    if not d.master:
        return
    if gen is not None:
        res.update(
            no_rep=cfg.no_rep,
            fd=common.fd_to_train(fd_net, x, data, cfg.image_size),
            fd_ref=common.fd_to_ref(fd_net, x, args.fd_ref),
            n_samples=args.n,
            rep_cfg=cfg.rep_cfg if args.rep_cfg is None else args.rep_cfg,
        )
    rep = Representation(cfg, d.device)
    x_tr, y_tr, x_te, y_te = common.probe_data(data, cfg.image_size)
    # [N, D], standardised
    r_tr = common.extract(lambda x, i: rep(x), x_tr, d.device, desc="representations")
    r_te = common.extract(lambda x, i: rep(x), x_te, d.device)
    res.update(
        probe=f"{cfg.encoder}'s global token{f', projected to {rep.dim}' if cfg.rep_dim else ''}, "
        f"standardised",
        **common.probes(r_tr, y_tr, r_te, y_te),
    )
    res.update(common.pixel_probes(x_tr, y_tr, x_te, y_te, data))  # the floors: pixels
    # the pixels the DiT makes from each test image's own r (Heun, the eval's guidance)
    made = None
    if gen is not None and gen.rep_dim and data.startswith("shapes"):
        g = torch.Generator(d.device).manual_seed(args.seed)
        r = r_te[: min(1000, len(r_te))]
        made = torch.cat(
            [
                gen.sample(
                    r[i : i + args.batch], steps=args.sample_steps, scale=args.rep_cfg, generator=g
                )
                for i in tqdm(range(0, len(r), args.batch), desc="detail", leave=False)
            ]
        )
    res.update(common.detail(made, data))
    if rdm is not None:
        torch.manual_seed(rdm.cfg.seed)
        init = RDM(rdm.cfg, rdm.dim).to(d.device).eval()  # train-rdm's initial weights: the floor
        n = min(args.n_rep, len(r_tr), len(r_te))
        res.update(
            rep_fd=rep_fd(rdm, r_tr[:n], n, args),
            n_rep=n,
            rep_fd_init=rep_fd(init, r_tr[:n], n, args),
            rep_fd_test=rep_fd(r_te[:n], r_tr[:n], n, args),
        )  # held-out real: the floor
    common.write_eval(args.ckpt, res)


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    tr, sa, ev = sub.choices["train"], sub.choices["sample"], sub.choices["eval"]
    tr.add_argument(
        "--no-rep", action="store_true", default=None, help="the unconditional baseline (no r)"
    )
    rd = common.train_flags(
        sub.add_parser("train-rdm", help="the representation diffusion model"), RDM_PRESETS
    )
    for s in (tr, rd):
        s.add_argument(
            "--encoder", help="frozen encoder spec (default: the preset's; see common.load_encoder)"
        )
    for s in (sa, ev):
        s.add_argument(
            "--rdm", help="the RDM checkpoint (train-rdm) that draws the representations"
        )
        s.add_argument(
            "--rdm-steps",
            type=common.number(int),
            help="DDIM steps of the RDM (default: its run's)",
        )
        s.add_argument(
            "--sample-steps", type=common.number(int), help="Heun steps (default: the run's)"
        )
        s.add_argument(
            "--rep-cfg",
            type=common.number(float, 0, strict=False),
            help="representation guidance scale (default: the run's, 1)",
        )
    ev.add_argument(
        "--n-rep",
        type=common.number(int),
        default=5000,
        help="representations for rep_fd (at most the test split's size)",
    )
    ev.set_defaults(n=1000)
    args = p.parse_args(argv)
    {"train-rdm": train, "train": train, "sample": sample_cmd, "eval": eval_cmd}[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
