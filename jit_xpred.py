"""JiT: a plain Vision Transformer on pixel patches that predicts the clean image x.

T. Li and K. He, "Back to Basics: Let Denoising Generative Models Denoise", arXiv 2511.13720 (2025).

Claim: natural images lie on a low-dimensional manifold, noise does not. A network that outputs x
(on the manifold) works with large patches and a narrow token bottleneck; one that outputs eps or v
(off the manifold) fails there.

    z_t = t x + (1 - t) e,   e ~ N(0, noise_scale^2 I),   t in [0, 1], t = 1 clean    (Eq. 1)
    v = (x - z_t) / (1 - t)                                                           (Eq. 2)
    the net outputs x_pred;   v_pred = (x_pred - z_t) / max(1 - t, t_eps)
    L = ||v - v_pred||^2                                        (Alg. 1: x-pred, v-loss)
    sampling: dz/dt = v_pred(z, t) from t = 0 to 1, Heun, CFG on v for t in (0.1, 1) (Alg. 2)

Commands (python jit_xpred.py {train,sample,eval,toy} -h lists every flag):

    python jit_xpred.py toy --dims 2 8 16 512 --out runs/jit_toy   # the claim: CPU, ~3 min
    python jit_xpred.py train --preset cpu --out runs/jit_cpu      # shapes: CPU, < 10 min
    python jit_xpred.py eval --ckpt runs/jit_cpu/ckpt.pt --n 1000
    python jit_xpred.py train --data cifar10 --out runs/jit --compile   # one GPU; torchrun: same
    python jit_xpred.py sample --ckpt runs/jit/ckpt.pt --n 50000 --out runs/jit/samples.npz
    python jit_xpred.py eval --ckpt runs/jit/ckpt.pt --fd-model inception
    python jit_xpred.py train --preset table2 --pred eps --out runs/t2_eps   # Table 2; x, v too
    torchrun --nproc_per_node 8 jit_xpred.py train --preset paper --data /path/to/imagenet \
        --out runs/jit_b16 --compile   # JiT-B/16, ImageNet 256, 600 epochs: FID-50K 3.66
    torchrun --nproc_per_node 8 jit_xpred.py eval --ckpt runs/jit_b16/ckpt.pt --n 50000 \
        --fd-model inception   # fd: FID-50K to the train split, the official reference

Expected: in the toy, x-prediction lands on the spiral at every D, eps- and v-prediction not at
D = 512 (the README has the figure). eval.json: FD; probes of the mid-block's mean-pooled tokens at
t = 0.75 and from 10% to 90% signal in z_t (probe_linear_by_signal); on `shapes`, the stripes
x_pred keeps from inputs with a third noise (detail_pattern, detail_amplitude). The paper presets
(ImageNet 256, 600 epochs; FID-50K to the train split): paper (JiT-B/16) 3.66, 4.37 at 200 epochs
(--set steps=250228); paper-L (JiT-L/16) 2.36; paper-H (JiT-H/16) 1.86.

Deliberate differences from the official code (LTH14/JiT):
- one EMA, the one the official samples with (official: 0.9999 and 0.9996), its decay warmed up
  as min(ema, (1 + step) / (10 + step)) (official: 0.9999 from the first step);
- batches drawn with replacement from (seed, step, rank), epochs counted as ceil(epochs x N /
  batch) steps (official: a shuffled pass per epoch, floor(N / batch) steps);
- an image folder decoded once into a uint8 cache, centre crop then one bicubic resize (official:
  ADM's center_crop_arr: box halvings, then bicubic);
- qk-norm in the autocast dtype; fused attention unless attn_fp32 (set by the paper presets: true
  fp32, as the official q k^T and softmax; the official's product with v runs in bf16);
- a final clamp to [-1, 1] (the official clips when it writes PNGs).

The released ImageNet checkpoints (JiT-{B,L,H}/16 at 256 px; /32 at 512 px: a preset | dict(
image_size=512, patch=32, noise_scale=2.0), cfg_scale 2.5 for L, 2.3 for H) hold "model_ema1"
beside an argparse.Namespace and load with strict=True into the presets paper, paper-L, paper-H.
sample and eval read this file's own checkpoints; from a released one, sample in Python:

    import argparse, torch, jit_xpred as J
    cfg = J.Config(**J.PRESETS["paper-L"], num_classes=1000)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.serialization.safe_globals([argparse.Namespace]):
        model = J.JiT(cfg).to(device).eval()
        state = torch.load(PATH, map_location=device, weights_only=True)
        model.load_state_dict(state["model_ema1"])
    x = model.sample(torch.arange(8, device=device))  # [8, 3, 256, 256] in [-1, 1]
"""

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UsageError, print0


# ------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    data: str = "cifar10"  # dataset (common.load_images)
    image_size: int = 32  # images are resized to image_size^2
    patch: int = 2  # p: pixel patch side; a token sees p*p*3 values
    # linear patch-embedding bottleneck width (Sec. 4.1; 128 for B/L, 256 for H)
    bottleneck: int = 128
    hidden: int = 384  # transformer width (S 384, B 768, L 1024, H 1280)
    depth: int = 12  # transformer blocks (S/B 12, L 24, H 32)
    heads: int = 6  # attention heads (head_dim 64)
    in_context: int = 32  # in-context class tokens (32 in the paper)
    in_context_start: int = 4  # block where they are prepended (4 for B, 8 for L, 10 for H)
    pred: str = "x"  # what the network outputs: x | eps | v (Table 2 columns)
    loss: str = "v"  # where the loss is taken: x | eps | v (Table 2 rows; the paper's default is v)
    P_mean: float = -0.8  # t = sigmoid(N(P_mean, P_std^2)), logit-normal (Sec. 4.2)
    P_std: float = 0.8  # (Sec. 4.2)
    t_eps: float = 0.05  # clamp of 1 - t (and of t) in divisions, training and sampling
    # RoPE base (official: EVA's VisionRotaryEmbeddingFast, theta 10000)
    rope_base: float = 10_000.0
    # attention in true fp32 (official: q k^T, softmax in fp32; bf16 eps/v spikes)
    attn_fp32: bool = False
    # dropout after attention and in the MLP, middle half of the blocks (0.2 for H)
    proj_dropout: float = 0.0
    # e ~ N(0, noise_scale^2); unless set: the paper's max(1, image_size / 256)
    noise_scale: float = 1.0
    label_drop: float = 0.1  # class dropped to the null class for classifier-free guidance
    num_classes: int = 10  # filled in from the data
    steps: int = 100_000  # optimiser steps
    batch_size: int = 256  # global batch size
    # peak lr, 5e-5 x batch_size / 256 (the official blr rule; --batch-size alone rescales it)
    lr: float = 5e-5
    warmup: int = 2_000  # linear warm-up steps, then constant (paper: 5 epochs)
    weight_decay: float = 0.0  # paper: 0
    # EMA decay: a shorter horizon for runs of 100k steps; the paper presets: the official 0.9999
    ema: float = 0.9995
    sample_steps: int = 50  # Heun steps (49 Heun + 1 Euler)
    # CFG scale (1 = none); the official tunes it per model (3.0 B/16, 2.4 L/16, 2.2 H/16)
    cfg_scale: float = 1.0
    # CFG for lo < t < hi (and t = 0 when lo = 0)
    cfg_interval: list = field(default_factory=lambda: [0.1, 1.0])
    log_every: int = 50  # steps between log.jsonl rows
    sample_every: int = 5_000  # steps between sample grids (drawn when the step is a multiple)
    grid: int = 64  # images in the sample grids (0: none)
    ckpt_every: int = 2_500  # steps between checkpoints
    seed: int = 0  # initial weights, batches and noise


# The paper's ImageNet 256x256 results (its system-level comparison), FID-50K at 600 epochs, 50
# Heun steps, CFG on 0.1 < t < 1: JiT-B/16 3.66 (4.37 at 200 epochs), JiT-L/16 2.36, H/16 1.86.
# They mirror the official README's training command (B/16 and H/16 there; L/16 with the same
# flags and main_jit.py's default dropout 0)
#   torchrun --nproc_per_node=8 main_jit.py --model JiT-B/16 --proj_dropout 0.0 --P_mean -0.8
#     --P_std 0.8 --img_size 256 --noise_scale 1.0 --batch_size 128 --blr 5e-5 --epochs 600
#     --warmup_epochs 5
# and its evaluation of the released checkpoints (--cfg 3.0 B, 2.4 L, 2.2 H; interval 0.1 to 1).
# Global batch 8 x 128 = 1024; lr = blr x batch / 256 = 2e-4, constant after the warm-up; AdamW
# (0.9, 0.95), weight decay 0, no gradient clipping; bf16 autocast, attention in fp32; random
# flips; sampling reads the 0.9999 EMA. Epochs in steps, ceil(epochs x 1,281,167 / 1024): 600 ->
# 750,684, warm-up 5 -> 6,256 (the official's floor per epoch: 1,251 x 600 = 750,600). What
# differs is the docstring's list (batches with replacement, the EMA's warmed-up decay, one
# bicubic resize), each small at 750k steps but untested at this scale; the image folder is
# decoded once into a 235 GiB uint8 cache (--cache DIR). Another --batch-size rescales the lr, not
# the steps: --steps keeps the 600 epochs.
PAPER_RUN = dict(
    data="imagenet",
    image_size=256,
    patch=16,
    noise_scale=1.0,
    P_mean=-0.8,
    P_std=0.8,
    in_context=32,
    attn_fp32=True,
    label_drop=0.1,
    steps=750_684,
    batch_size=1024,
    lr=2e-4,
    warmup=6_256,
    weight_decay=0.0,
    ema=0.9999,
    sample_steps=50,
    cfg_interval=[0.1, 1.0],
)


PRESETS = {
    # seconds, for tests
    "tiny": dict(
        data="shapes:500",
        image_size=16,
        patch=4,
        bottleneck=16,
        hidden=64,
        depth=2,
        heads=2,
        in_context=4,
        in_context_start=1,
        steps=20,
        batch_size=32,
        lr=1e-3,
        warmup=0,
        ema=0.9,
        sample_steps=4,
        log_every=1,
        sample_every=10,
        ckpt_every=10,
    ),
    # a 2-core CPU in under 10 minutes (the claim itself is the `toy` command); a short run needs a
    # higher lr
    "cpu": dict(
        data="shapes:10000",
        image_size=16,
        patch=4,
        bottleneck=32,
        hidden=128,
        depth=4,
        heads=4,
        in_context=4,
        in_context_start=1,
        steps=3000,
        batch_size=64,
        lr=5e-4,
        warmup=200,
        ema=0.999,
        sample_steps=20,
        log_every=50,
        sample_every=500,
        ckpt_every=1000,
    ),
    # one GPU: JiT-S/2 on CIFAR-10 32x32
    "default": dict(),
    # Table 2 at small scale: 64x64 with 16x16 patches (768 values a token, bottleneck 64); lr 3e-4
    # for 2.5k steps
    "table2": dict(
        image_size=64,
        patch=16,
        bottleneck=64,
        hidden=384,
        depth=8,
        heads=6,
        in_context=8,
        in_context_start=2,
        steps=20_000,
        lr=3e-4,
        warmup=1_000,
        sample_every=5_000,
    ),
    # the widths of JiT-B, -L, -H only, at the default's 32 px, patch 2 and schedule: sizes for a
    # fork, not the paper's runs (those are paper, paper-L, paper-H below)
    "B": dict(hidden=768, depth=12, heads=12),
    "L": dict(hidden=1024, depth=24, heads=16, in_context_start=8),
    "H": dict(
        hidden=1280, depth=32, heads=16, bottleneck=256, in_context_start=10, proj_dropout=0.2
    ),
    # the paper's runs: PAPER_RUN with each size's widths (model_jit.py), dropout and CFG scale
    "paper": dict(
        PAPER_RUN,
        hidden=768,
        depth=12,
        heads=12,
        bottleneck=128,
        in_context_start=4,
        proj_dropout=0.0,
        cfg_scale=3.0,
    ),
    "paper-L": dict(
        PAPER_RUN,
        hidden=1024,
        depth=24,
        heads=16,
        bottleneck=128,
        in_context_start=8,
        proj_dropout=0.0,
        cfg_scale=2.4,
    ),
    "paper-H": dict(
        PAPER_RUN,
        hidden=1280,
        depth=32,
        heads=16,
        bottleneck=256,
        in_context_start=10,
        proj_dropout=0.2,
        cfg_scale=2.2,
    ),
}


# ------------------------------------------------------------------------------------------- method
class JiT(nn.Module):
    """The denoiser: forward(x, y) -> loss (Alg. 1); sample(y) -> images (Alg. 2)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.net = cfg, JiTNet(cfg)

    def forward(self, x, y):
        """Alg. 1: images x [B, 3, H, W] in [-1, 1], classes y [B] -> the loss."""
        cfg, B = self.cfg, x.shape[0]
        # the class dropped to the null class, for CFG (drawn first, as in the official code)
        if self.training:
            y = torch.where(torch.rand(B, device=x.device) < cfg.label_drop, cfg.num_classes, y)
        # logit-normal
        t = torch.sigmoid(torch.randn(B, device=x.device) * cfg.P_std + cfg.P_mean).view(B, 1, 1, 1)
        e = torch.randn_like(x) * cfg.noise_scale
        z = t * x + (1 - t) * e  # Eq. 1
        v = (x - z) / (1 - t).clamp_min(cfg.t_eps)  # Eq. 2, the target velocity
        out = self.net(z, t.flatten(), y).float()  # [B, 3, H, W]: x_pred (the default pred = x)
        if cfg.pred == "x" and cfg.loss == "v":  # the paper's choice: x-prediction, v-loss
            x_pred = out
            v_pred = (x_pred - z) / (1 - t).clamp_min(cfg.t_eps)
            return ((v - v_pred) ** 2).mean()
        # Table 2: an eps or v output, or the loss on x or eps, through the (x, eps, v) that output
        # and truth imply
        x_pred, eps_pred, v_pred = to_x_eps_v(cfg.pred, out, z, t, cfg.t_eps)
        _, eps, _ = to_x_eps_v("x", x, z, t, cfg.t_eps)  # the true eps
        pred, truth = {"x": (x_pred, x), "eps": (eps_pred, eps), "v": (v_pred, v)}[cfg.loss]
        return ((pred - truth) ** 2).mean()

    def velocity(self, z, t, y, scale, interval):
        """v_pred(z, t), t a float shared by the batch; with CFG on v inside the interval."""
        use_cfg = scale != 1 and in_interval(t, interval)
        if use_cfg:  # conditional and unconditional in one batch
            z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, self.cfg.num_classes)])
        tt = torch.full((len(z),), t, device=z.device)
        out = self.net(z, tt, y).float()
        _, _, v = to_x_eps_v(self.cfg.pred, out, z, tt.view(-1, 1, 1, 1), self.cfg.t_eps)
        if not use_cfg:
            return v
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    @torch.no_grad()
    def sample(self, y, *, steps=None, scale=None, interval=None, generator=None):
        """Heun from t = 0 (noise) to t = 1 (data): steps - 1 Heun steps, then one Euler step (Alg.
        2); -> [-1, 1]."""
        cfg = self.cfg
        steps, interval = steps or cfg.sample_steps, interval or cfg.cfg_interval
        scale = cfg.cfg_scale if scale is None else scale
        z = torch.randn(
            len(y), 3, cfg.image_size, cfg.image_size, device=y.device, generator=generator
        )
        z = z * cfg.noise_scale  # [B, 3, H, W] at t = 0
        ts = torch.linspace(0, 1, steps + 1).tolist()
        for i in range(steps):
            t, dt = ts[i], ts[i + 1] - ts[i]
            with common.autocast(z.device):
                v = self.velocity(z, t, y, scale, interval)
                # Heun: the mean of the slopes at both ends (the last step: Euler into t = 1)
                if i < steps - 1:
                    v = 0.5 * (v + self.velocity(z + dt * v, ts[i + 1], y, scale, interval))
                z = z + dt * v
        return z.clamp(-1, 1)


def to_x_eps_v(kind, out, z, t, t_eps):
    """Given the network output `out` of kind x | eps | v, return the triple (x, eps, v) it implies
    under z = t x + (1 - t) eps and v = x - eps (Eq. 1-2). Denominators 1 - t and t are clamped at
    t_eps."""
    one_m_t, t_c = (1 - t).clamp_min(t_eps), t.clamp_min(t_eps)
    if kind == "x":
        return out, (z - t * out) / one_m_t, (out - z) / one_m_t
    if kind == "eps":
        return (z - (1 - t) * out) / t_c, out, (z - out) / t_c
    if kind == "v":
        return z + (1 - t) * out, z - t * out, out
    raise ValueError(kind)


# the CFG interval: lo < t < hi, and t = 0 too when lo = 0 (the official code's test)
def in_interval(t, interval):
    lo, hi = interval
    return t < hi and (lo == 0 or t > lo)


# ----------------------------------------------------------------------------------------- backbone
def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding -> [grid*grid, dim]: the first half of the channels
    encode the column, the second half the row, each as [sin, cos] (the official
    get_2d_sincos_pos_embed's order; computed in float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    out = [torch.outer(p.flatten().double(), omega) for p in (xx, yy)]  # 2 x [N, dim/4]
    return torch.cat([out[0].sin(), out[0].cos(), out[1].sin(), out[1].cos()], 1).float()


def rope_2d(grid, head_dim, prefix=0, base=10_000.0):
    """Axial 2-D RoPE (EVA's VisionRotaryEmbeddingFast) -> (cos, sin), each [prefix + grid*grid,
    head_dim]. Channels (2i, 2i+1) form a rotated pair; the pairs of the first half of the channels
    turn with the row index, those of the second half with the column. The `prefix` in-context
    tokens get angle 0 (no rotation)."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))  # [hd/4]
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # [N, hd/4] each
    rows, cols = torch.outer(yy.flatten().float(), freqs), torch.outer(xx.flatten().float(), freqs)
    ang = torch.cat([rows, cols], 1).repeat_interleave(2, 1)  # [N, hd]: one angle per pair, twice
    ang = torch.cat([torch.zeros(prefix, head_dim), ang])
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):  # x [B, heads, N, hd]; rotates the pairs (x_2i, x_2i+1)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # 2 x [B, heads, N, hd/2]
    return x * cos + torch.stack([-x2, x1], -1).flatten(-2) * sin


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim, heads, fp32=False, drop=0.0):
        super().__init__()
        self.heads, self.fp32 = heads, fp32
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)  # qk-norm
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.drop = nn.Dropout(drop)

    def forward(self, x, cos, sin):
        B, N, D = x.shape
        # 3 x [B, h, N, hd]
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # in the autocast dtype (fused kernel)
        q = F.rms_norm(q, q.shape[-1:], self.q_norm.weight.to(q.dtype), 1e-6)
        k = F.rms_norm(k, k.shape[-1:], self.k_norm.weight.to(k.dtype), 1e-6)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # true fp32: autocast and TF32 off (the official: q k^T and its softmax in fp32)
        if self.fp32:
            with common.autocast(x.device, False):
                out = common.attention(q, k, v, fp32=True)  # [B, h, N, hd], float32
        else:
            out = common.attention(q, k, v)  # [B, h, N, hd], fused, in the autocast dtype
        return self.drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))  # -> [B, N, D]


class SwiGLU(nn.Module):
    def __init__(self, dim, drop=0.0):
        super().__init__()
        h = int(4 * dim * 2 / 3)  # keeps the parameter count of a 4x MLP
        self.w12 = nn.Linear(dim, 2 * h)
        self.w3 = nn.Linear(h, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(self.drop(F.silu(a) * b))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero: c gives shift, scale and a zero-initialised gate
    per branch."""

    def __init__(self, dim, heads, attn_fp32=False, drop=0.0):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_fp32, drop)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, -1)  # 6 x [B, 1, D]
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), cos, sin)
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    # t [B] in [0, 1], raw (not x1000: the official code's, whose weights load here) -> [B, dim]
    def forward(self, t):
        f = torch.exp(
            -math.log(10000)
            * torch.arange(self.freq_dim // 2, device=t.device)
            / (self.freq_dim // 2)
        )
        a = t[:, None].float() * f[None]
        return self.mlp(torch.cat([a.cos(), a.sin()], 1))


class JiTNet(nn.Module):
    """Pixel patches -> bottleneck linear embed -> ViT (adaLN-zero, RoPE, qk-norm, SwiGLU) ->
    patches of the output. Parameter names are the official model_jit.py's, so its checkpoints load
    with strict=True."""

    def __init__(self, cfg):
        super().__init__()
        p, D, self.grid = cfg.patch, cfg.hidden, cfg.image_size // cfg.patch
        self.cfg = cfg
        self.x_embedder = nn.ModuleDict(
            dict(
                # p x p x 3 pixels -> the bottleneck
                proj1=nn.Conv2d(3, cfg.bottleneck, p, p, bias=False),
                proj2=nn.Conv2d(cfg.bottleneck, D, 1),  # -> the transformer width
            )
        )
        # [1, N, D], fixed (in the state dict)
        self.register_buffer("pos_embed", sincos_2d(self.grid, D)[None])
        self.t_embedder = TimestepEmbedder(D)
        # last: null
        self.y_embedder = nn.ModuleDict(dict(embedding_table=nn.Embedding(cfg.num_classes + 1, D)))
        # in-context tokens' position
        self.in_context_posemb = nn.Parameter(torch.randn(1, cfg.in_context, D) * 0.02)
        for name, prefix in (("rope", 0), ("rope_ctx", cfg.in_context)):
            cos, sin = rope_2d(self.grid, D // cfg.heads, prefix, cfg.rope_base)
            self.register_buffer(name + "_cos", cos, persistent=False)
            self.register_buffer(name + "_sin", sin, persistent=False)
        # dropout only in the middle half of the blocks (official)
        mid = range(cfg.depth // 4, cfg.depth // 4 * 3)
        self.blocks = nn.ModuleList(
            Block(D, cfg.heads, cfg.attn_fp32, cfg.proj_dropout * (i in mid))
            for i in range(cfg.depth)
        )
        self.final_layer = nn.ModuleDict(
            dict(
                norm_final=nn.RMSNorm(D, eps=1e-6),
                linear=nn.Linear(D, p * p * 3),
                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D)),
            )
        )
        self.initialize()

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in self.x_embedder.values():  # like nn.Linear
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in self.t_embedder.mlp[::2]:
            nn.init.normal_(m.weight, std=0.02)
        # adaLN-zero: every residual branch starts closed; a zero output: x_pred = 0 at init
        f = self.final_layer
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [f.adaLN_modulation[-1], f.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z, t, y, feature_depth=None):
        """z [B,3,H,W], t [B], y [B] -> network output [B,3,H,W]; with feature_depth=k, the image
        tokens after block k mean-pooled [B, D] (for probing)."""
        B, p, g = z.shape[0], self.cfg.patch, self.grid
        # [B, D, g, g] -> [B, N, D]
        x = self.x_embedder.proj2(self.x_embedder.proj1(z)).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        y_emb = self.y_embedder.embedding_table(y)
        c = self.t_embedder(t) + y_emb  # conditioning vector [B, D]
        cos, sin, n_ctx = self.rope_cos, self.rope_sin, 0
        for i, block in enumerate(self.blocks):
            if i == self.cfg.in_context_start and self.cfg.in_context:
                x = torch.cat([y_emb[:, None] + self.in_context_posemb, x], 1)  # [B, n_ctx + N, D]
                cos, sin, n_ctx = self.rope_ctx_cos, self.rope_ctx_sin, self.cfg.in_context
            x = block(x, c, cos, sin)
            if feature_depth == i + 1:
                return x[:, n_ctx:].float().mean(1)
        f = self.final_layer  # adaLN, then a linear map to the patches
        sh, sc = f.adaLN_modulation(c)[:, None].chunk(2, -1)  # 2 x [B, 1, D]
        x = f.linear(modulate(f.norm_final(x[:, n_ctx:]), sh, sc))  # [B, N, p*p*3]
        x = x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # [B, 3, g, p, g, p]
        return x.reshape(B, 3, g * p, g * p)


# ---------------------------------------------------------------------------------------------- toy
def toy_data(n, generator):
    """A 2-D spiral, std ~ 1."""
    th = torch.rand(n, generator=generator) * 3 * math.pi + 0.5 * math.pi
    x = torch.stack([th * th.cos(), th * th.sin()], 1) / 5
    return x + 0.03 * torch.randn(n, 2, generator=generator)


def toy_run(D, pred, steps=2000, n=2000, seed=0, batch=256, t_eps=0.05):
    """Sec. 3.3: x = P x2 in R^D (2-D data, P column-orthogonal), a 5-layer ReLU MLP (256 wide)
    predicting `pred`, the v-loss, 50 Heun steps, samples brought back by P^T -> (distance, samples
    [n, 2]). t is uniform: a logit-normal t rarely draws t near 1, where x-prediction's v = (x -
    z)/(1 - t) amplifies errors, and leaves it under-trained."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # [D, 2], P^T P = I
    P = torch.linalg.qr(torch.randn(D, 2, generator=g))[0] if D > 2 else torch.eye(2)
    widths = [D + 1, 256, 256, 256, 256]  # 4 ReLU layers, then a linear output
    hidden = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    mlp = nn.Sequential(*hidden, nn.Linear(256, D))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    for _ in range(steps):
        x = toy_data(batch, g) @ P.T  # [B, D]
        t = torch.rand(batch, 1, generator=g)  # t ~ U(0, 1), see the docstring
        e = torch.randn(batch, D, generator=g)
        z = t * x + (1 - t) * e
        _, _, v_pred = to_x_eps_v(pred, mlp(torch.cat([z, t], 1)), z, t, t_eps)
        _, _, v = to_x_eps_v("x", x, z, t, t_eps)
        loss = ((v_pred - v) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def velocity(z, t):  # v_pred(z, t), t a float
        out = mlp(torch.cat([z, torch.full((n, 1), t)], 1))
        _, _, v_pred = to_x_eps_v(pred, out, z, torch.tensor(t), t_eps)
        return v_pred

    with torch.no_grad():
        z, ts = torch.randn(n, D, generator=g), torch.linspace(0, 1, 51).tolist()
        for t, t_next in zip(ts[:-2], ts[1:-1]):  # 49 Heun steps
            v = velocity(z, t)
            z_euler = z + (t_next - t) * v
            z = z + (t_next - t) * 0.5 * (v + velocity(z_euler, t_next))
        z = z + (ts[-1] - ts[-2]) * velocity(z, ts[-2])  # the last step: Euler (Alg. 2)
        x2 = z @ P  # back to 2-D, [n, 2]
    return common.sliced_wasserstein(x2, toy_data(n, torch.Generator().manual_seed(123))), x2


def toy_png(panels, path, size=160):
    """Scatter panels without matplotlib: rows = D, columns = data, x, eps, v."""
    from PIL import Image, ImageDraw

    rows, cols = sorted({r for r, _ in panels}), ["data", "x", "eps", "v"]
    img = Image.new("RGB", (size * len(cols), (size + 14) * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    for (D, c), pts in panels.items():
        ox, oy = cols.index(c) * size, rows.index(D) * (size + 14)
        draw.text((ox + 4, oy + 1), f"D={D} {c}" + ("-pred" if c != "data" else ""), fill="black")
        for px, py in ((pts.clamp(-3, 3) + 3) / 6 * (size - 8) + 4).long().tolist():
            draw.point((ox + px, oy + 14 + size - 1 - py), fill=(30, 60, 200))
        draw.rectangle((ox, oy + 14, ox + size - 1, oy + 14 + size - 1), outline="gray")
    img.save(path)


def toy(args):
    os.makedirs(args.out, exist_ok=True)
    rows, panels = [], {}
    for D in tqdm(args.dims, desc="D"):
        panels[(D, "data")] = toy_data(2000, torch.Generator().manual_seed(123))
        for pred in ("x", "eps", "v"):
            dist, pts = toy_run(D, pred, steps=args.toy_steps, seed=args.seed)
            rows.append(dict(D=D, pred=pred, distance=round(dist, 4)))
            panels[(D, pred)] = pts
            print0(f"D={D:4d} {pred:>3}-pred  sliced W1 = {dist:.4f}")
    with open(os.path.join(args.out, "toy.json"), "w") as f:
        metric = "sliced_wasserstein_1 (2-D, 256 directions, n=2000; lower is better)"
        json.dump({"metric": metric, "results": rows}, f, indent=1)
    toy_png(panels, os.path.join(args.out, "toy.png"))


# ------------------------------------------------------------------------------------- train / main
def make_config(args):
    cfg = common.configure(Config, PRESETS, args)
    # the official lr = blr x batch / 256: --batch-size without --lr rescales the preset's lr
    cfg = common.scale_lr(cfg, args, Config, PRESETS)
    if cfg.image_size % cfg.patch:
        raise UsageError(
            f"image size {cfg.image_size} is not divisible by the patch size {cfg.patch}"
        )
    if cfg.pred not in ("x", "eps", "v") or cfg.loss not in ("x", "eps", "v"):
        raise UsageError(f"pred and loss are x, eps or v (got {cfg.pred}, {cfg.loss})")
    # the paper's noise scale: 1 up to 256 px, 2 at 512
    if "noise_scale" not in common.given(args, Config):
        cfg.noise_scale = max(1.0, cfg.image_size / 256)
    return cfg


def train(args):
    d, cfg, ckpt = common.start_run(args, Config, PRESETS, make_config)
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    # the same initial weights on every rank (and in eval's "at initialisation")
    torch.manual_seed(cfg.seed)
    model = JiT(cfg).to(d.device)
    ema = common.Ema(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    start = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(
        f"JiT {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, {cfg.pred}-pred {cfg.loss}-loss, "
        f"{len(images)} images of {cfg.data}, step {start} -> {cfg.steps}, {d.world} x {d.device}"
    )
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world
    log = common.Log(args.out, d, cfg, start)
    for step in log.steps(start, cfg.steps):
        # learning rate: linear warm-up, then constant
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        # forward (Alg. 1 on this rank's batch: rows drawn with replacement, mirrored at random),
        # backward, update, EMA
        x, y = common.batch(images, labels, bs, cfg.seed, step, d.rank, flip=True, device=d.device)
        with common.autocast(d.device):
            loss = step_model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, min(cfg.ema, (1 + step) / (10 + step)))  # EMA, its decay warmed up
        # log (averaged over the processes; a NaN stops the run), sample grid, checkpoint
        done = step + 1
        log(done, loss, lr=lr)
        if d.master and cfg.grid and done % cfg.sample_every == 0:  # the run's own sampler steps
            # own generator: the training RNG stream is untouched
            g = torch.Generator(d.device).manual_seed(cfg.seed)
            y = torch.arange(cfg.grid, device=d.device) % cfg.num_classes
            common.save_grid(
                ema.model.sample(y, generator=g), os.path.join(args.out, f"samples_{done:07d}.png")
            )
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt)


def generate(model, cfg, n, args, d):
    """n class-balanced samples, split over the processes and gathered: [n, 3, H, W] in [-1, 1] (on
    every rank)."""
    per = math.ceil(n / d.world)
    y = (torch.arange(per) + d.rank * per) % cfg.num_classes
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = [
        model.sample(
            yb.to(d.device),
            steps=args.sample_steps,
            scale=args.cfg_scale,
            interval=args.cfg_interval,
            generator=g,
        )
        for yb in tqdm(y.split(args.batch), desc="sample", disable=not d.master)
    ]
    return common.gather(torch.cat(xs), n, d)


def sample_cmd(args):
    d, ckpt, cfg, model = common.load_run(
        args, Config, lambda cfg, ckpt: JiT(cfg), compile_net=args.compile
    )
    x = generate(model, cfg, args.n, args, d)
    if d.master:
        common.write_samples(args.out, x)


def at_t(model, images, t, device, depth=None):
    """The network on z_t = t x + (1 - t) e of images x (e seeded per chunk, t a float, the null
    class). depth k: JiT's representation, the image tokens after block k mean-pooled [N, D]; None:
    its x_pred [N, 3, H, W] in [-1, 1]."""
    cfg = model.cfg

    def fn(x, i):
        B = len(x)
        seeded = torch.Generator(device).manual_seed(i)
        e = torch.randn(x.shape, device=device, generator=seeded) * cfg.noise_scale
        z = t * x + (1 - t) * e  # Eq. 1
        tt = torch.full((B,), t, device=device)
        null = torch.full((B,), cfg.num_classes, device=device)
        with common.autocast(device):
            out = model.net(z, tt, null, feature_depth=depth).float()
        if depth:
            return out
        x_pred, _, _ = to_x_eps_v(cfg.pred, out, z, tt.view(B, 1, 1, 1), cfg.t_eps)
        return x_pred.clamp(-1, 1)

    return common.extract(fn, images, device)


def t_at_signal(signal, noise_scale):
    """The t at which z_t = t x + (1 - t) noise_scale e holds the fraction `signal` = a / (a + s)
    of signal (common.PROBE_SIGNALS): t / (t + (1 - t) noise_scale) = signal."""
    return signal * noise_scale / (1 - signal + signal * noise_scale)


def eval_cmd(args):
    d, ckpt, cfg, model = common.load_run(
        args, Config, lambda cfg, ckpt: JiT(cfg), compile_net=args.compile
    )
    data, dev = args.data or cfg.data, d.device
    fd_net = common.FDFeatures(args.fd_model, dev)
    x = generate(model, cfg, args.n, args, d)
    if not d.master:
        return
    torch.manual_seed(cfg.seed)
    init = JiT(cfg).to(dev).eval()  # the same network at initialisation: the floors
    depth, t = cfg.depth // 2, 0.75
    res = dict(
        step=ckpt["step"],
        data=data,
        fd=common.fd_to_train(fd_net, x, data, cfg.image_size),
        fd_ref=common.fd_to_ref(fd_net, x, args.fd_ref),
        fd_model=args.fd_model,
        n_samples=args.n,
        sample_steps=args.sample_steps or cfg.sample_steps,
        cfg_scale=cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale,
        probe=(
            f"mean-pooled image tokens after block {depth}/{cfg.depth} "
            f"at t={t}, null class (detail: x_pred at signal {common.DETAIL_SIGNAL:.3g})"
        ),
    )
    x_tr, y_tr, x_te, y_te = common.probe_data(data, cfg.image_size)
    for suffix, m in (("", model), ("_init", init)):
        f_tr, f_te = at_t(m, x_tr, t, dev, depth), at_t(m, x_te, t, dev, depth)
        res.update(common.probes(f_tr, y_tr, f_te, y_te, suffix))
        # the clean estimate x_pred from a third noise (common.DETAIL_SIGNAL; init: x_pred = 0)
        x_made = None
        if data.startswith("shapes"):
            t_detail = t_at_signal(common.DETAIL_SIGNAL, cfg.noise_scale)
            x_made = at_t(m, x_te[:1000], t_detail, dev)
        res.update(common.detail(x_made, data, suffix))
    res.update(common.pixel_probes(x_tr, y_tr, x_te, y_te, data))  # the floors: pixels
    x_tr, y_tr, x_te, y_te = common.probe_data(data, cfg.image_size, 5_000, 2_000)

    def probe(signal):
        t = t_at_signal(signal, cfg.noise_scale)
        f_tr, f_te = at_t(model, x_tr, t, dev, depth), at_t(model, x_te, t, dev, depth)
        return common.linear_probe(f_tr, y_tr.to(dev), f_te, y_te.to(dev))

    by_signal = [[f, round(probe(f), 4)] for f in common.PROBE_SIGNALS]
    res["probe_linear_by_signal"] = by_signal
    common.write_eval(args.ckpt, res)


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    tr, sa, ev = sub.choices["train"], sub.choices["sample"], sub.choices["eval"]
    tr.add_argument("--pred", choices=["x", "eps", "v"], help="network output (default x)")
    tr.add_argument("--loss", choices=["x", "eps", "v"], help="loss space (default v)")
    for s in (sa, ev):
        s.add_argument(
            "--sample-steps", type=common.number(int), help="Heun steps (default: the run's)"
        )
        s.add_argument(
            "--cfg-scale",
            type=common.number(float, 0, strict=False),
            help="CFG scale (default: the run's)",
        )
        s.add_argument(
            "--cfg-interval",
            type=float,
            nargs=2,
            help="CFG only for lo < t < hi (default: the run's)",
        )
    to = sub.add_parser("toy", help="the paper's toy experiment (Sec. 3.3) on a CPU")
    to.add_argument("--dims", type=common.number(int), nargs="+", default=[2, 8, 16, 512])
    to.add_argument(
        "--toy-steps", type=common.number(int), default=2000, help="training steps per model"
    )
    to.add_argument("--out", required=True, type=common.out_dir)
    to.add_argument("--seed", type=common.number(int, 0, strict=False), default=0)
    args = p.parse_args(argv)
    {"train": train, "sample": sample_cmd, "eval": eval_cmd, "toy": toy}[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
