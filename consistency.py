"""Consistency training from scratch, sampled in 1 or 2 steps (no teacher model, no LPIPS).

Y. Song, P. Dhariwal, M. Chen, I. Sutskever, "Consistency Models", ICML 2023 (CM);
Y. Song, P. Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024 (iCT);
Z. Geng, A. Pokle, W. Luo, J. Lin, J. Z. Kolter, "Consistency Models Made Easy", ICLR 2025 (ECT).

Claim: a consistency function maps any point x_t = x + t e of a noise trajectory to its start x, so
one evaluation generates, and it can be trained from scratch by asking two points of one trajectory
for the same answer.

    f(x_t, t) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t))   (CM Eq. 7, EDM scalings)
    c_skip = s_d^2 / ((t - t_min)^2 + s_d^2),   c_out = s_d (t - t_min) / sqrt(t^2 + s_d^2),
    c_in = 1 / sqrt(t^2 + s_d^2),   c_noise = log(t) / 4
    so f(x, t_min) = x: the boundary condition (CM Eq. 5)
    t ~ lognormal(P_mean, P_std),   r = the ECT mapping of t,   x_t = x + t e,   x_r = x + r e
    L = d(f(x_t, t), stopgrad f(x_r, r)) / (t - r),   d = sqrt(||.||^2 + c^2) - c
                                                            (ECT Eq. 9; the pseudo-Huber d: iCT 3.3)

The curriculum (ECT Sec. 3.2): stage 0 is plain denoising (r = 0: the target is x itself, diffusion
pretraining); stage s >= 1 uses r = max(t (1 - q^-s (1 + k sigmoid(-b t))), 0), so t - r shrinks by
q each stage and the model moves from a denoiser to a consistency model. The teacher is the same
network without gradient (iCT: no EMA teacher) and with the student's dropout masks. f runs in true
fp32 (TF32 off), as ECT trains: late in the curriculum f(x_t, t) - f(x_r, r) is a difference of two
nearly equal outputs that bf16 rounding would swamp (`--set bf16=true` turns bf16 on).

Commands (python consistency.py {train,sample,eval,toy} -h lists every flag):

    python consistency.py toy --out runs/ct_toy       # the claim: CPU, 2-D mixture, ~1 min
    python consistency.py train --preset cpu --out runs/ct_cpu --device cpu   # shapes, < 8 min
    python consistency.py eval --ckpt runs/ct_cpu/ckpt.pt --n 1000
    python consistency.py train --data cifar10 --out runs/ct --compile        # one GPU
    python consistency.py train --preset paper --out runs/ect  # ECT: FID 3.86 / 2.15 (1 / 2 steps)
    python consistency.py sample --ckpt runs/ct/ckpt.pt --n 50000 --sample-steps 2 --out s.npz
    python consistency.py eval --ckpt runs/ct/ckpt.pt --fd-model inception    # FID, 1 and 2 steps

Expected: the toy's 1-step samples land on the data, far closer than at initialisation (README).
ECT's run_ecm.sh (200k steps at batch 128, tuning EDM's checkpoint) reports CIFAR-10 FID 3.86 in 1
step and 2.15 in 2 (re-noised at t = 0.821), its 400k-step run 3.60 / 2.11. `--preset paper` is that
run from scratch: its stage 0 stands for the 200M images EDM trained on with 3.2M, so its FID lands
far above 3.86; shorter runs, further still. eval.json: FD at --sample-steps (fd) and at 2 steps
(fd_2step); probes of the U-Net bottleneck at t = 0.5 and from 10% to 90% signal in x + t e
(probe_linear_by_signal); on `shapes`, the stripes the one-step output f(x + t e, t) keeps from a
third noise, t = 0.5 (detail_pattern, detail_amplitude).

Deliberate differences from the official code (locuslab/ect):
- ECT fine-tunes EDM's DDPM++ U-Net from an EDM checkpoint; this file trains a compact DDPM++-style
  U-Net from scratch (the CM/iCT/ECT results are all U-Net results), so no released ECT checkpoint
  loads here, stage 0 stands for the EDM checkpoint and stage s >= 1 is the official stage s - 1
  (`paper`: SongUNet's widths, 57.4M parameters against its 55.7M);
- the presets but `paper` train with Adam and a warm-up, as for pretraining, on images mirrored at
  random (ECT, as `paper`: RAdam, lr 1e-4, batch 128, no warm-up, no flips); the EMA warms up (ECT's
  starts as EDM's);
- the loss draws the dropout masks once and hands them to both passes (ECMLoss replays the
  generator's state instead: the same draws, so the same numbers).

A run's checkpoint samples with `sample`, or in Python:

    import torch, consistency as C
    ckpt = torch.load("runs/ct/ckpt.pt", map_location="cpu", weights_only=True)
    model = C.Consistency(C.Config(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["ema"])
    x = model.sample(16, mid_t=[])  # [16, 3, 32, 32] in [-1, 1]: 1 step ([0.821]: ECT's 2 steps)
"""

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
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
    channels: int = 128  # U-Net base width
    # width multiplier per resolution (32, 16, 8)
    ch_mult: list = field(default_factory=lambda: [1, 2, 2])
    num_res: int = 2  # residual blocks per resolution
    attn_res: list = field(default_factory=lambda: [16])  # resolutions with self-attention
    dropout: float = 0.2  # ECT/iCT use dropout; the teacher shares the student's mask
    sigma_data: float = 0.5  # s_d in c_skip, c_out, c_in
    t_min: float = 0.003  # sigma_min of ECMPrecond (CM: 0.002): f(x, t_min) = x in eval mode
    # sigma_max: where 1-step sampling starts (t is not clamped in training, as ECT)
    t_max: float = 80.0
    P_mean: float = -1.1  # t ~ lognormal(P_mean, P_std) (iCT Sec. 3.5, ECT)
    P_std: float = 2.0
    q: float = 2.0  # ECT: t - r shrinks by q each stage
    # ECT mapping: r = t (1 - q^-s (1 + k sigmoid(-b t))), s here = official stage + 1
    k: float = 8.0
    b: float = 1.0
    # steps per curriculum stage (3.2M images: ECT's 25k steps at batch 128); stage 0 is plain
    # denoising, which ECT takes from an EDM checkpoint
    stage_steps: int = 12_500
    # pseudo-Huber c = huber_c * sqrt(dim); 0 = the L2 norm, ECT's CIFAR-10 run (its -c unset in
    # run_ecm.sh); iCT's is 0.00054
    huber_c: float = 0.0
    # re-noising levels for multi-step sampling (ECT 2-step)
    mid_t: list = field(default_factory=lambda: [0.821])
    # bf16 autocast. ECT trains in fp32, TF32 off: at late stages (t - r)/t is 1-4%, and bf16
    # rounding in f was measured at 4-6x iCT's c (default U-Net, init)
    bf16: bool = False
    flip: bool = True  # mirror training images at random (ECT: no x-flips)
    steps: int = 100_000  # optimiser steps
    batch_size: int = 256  # global batch size
    # "adam" (from scratch) or "radam" (ECT's fine-tuning), betas (0.9, 0.999) either way
    optim: str = "adam"
    # lr after the warm-up: ECT's 1e-4 at batch 128, doubled for batch 256 (`paper`: 1e-4, fixed at
    # any batch, as the official code)
    lr: float = 2e-4
    warmup: int = 1_000  # linear lr warm-up steps
    ema: float = 0.9999  # EMA decay for evaluation (ECT's run_ecm.sh; with the loop's warm-up)
    num_classes: int = 10  # filled in from the data (unconditional: used only by the probe)
    log_every: int = 50  # steps between log.jsonl rows
    sample_every: int = 5_000  # steps between sample grids (drawn when the step is a multiple)
    grid: int = 64  # images in the sample grids (0: none); first half 1 step, second half 2 steps
    ckpt_every: int = 2_500  # steps between checkpoints
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(
        data="shapes:500",
        image_size=16,
        channels=16,
        ch_mult=[1, 2],
        num_res=1,
        attn_res=[8],
        dropout=0.0,
        stage_steps=5,
        steps=20,
        batch_size=16,
        lr=1e-3,
        warmup=0,
        ema=0.9,
        log_every=1,
        sample_every=10,
        ckpt_every=10,
    ),
    # a 2-core CPU in under 8 minutes on shapes 16x16, 6 curriculum stages (the file's CPU claim is
    # the `toy` command)
    "cpu": dict(
        data="shapes:10000",
        image_size=16,
        channels=24,
        ch_mult=[1, 2],
        num_res=1,
        attn_res=[8],
        dropout=0.0,
        stage_steps=200,
        steps=1200,
        batch_size=32,
        lr=1e-3,
        warmup=100,
        ema=0.995,
        log_every=50,
        sample_every=400,
        ckpt_every=400,
    ),
    # one GPU: CIFAR-10 32x32, U-Net 128 channels, 8 stages of 12.5k steps
    "default": dict(),
    # ECT (Geng et al., ICLR 2025) on CIFAR-10: `bash run_ecm.sh <NGPUs> <PORT>`, the README's
    # "ECM (200k)" rows: FID 3.86 in 1 step, 2.15 in 2. It tunes EDM's CIFAR-10 checkpoint for
    # 25.6M images at batch 128 (200k steps) in eight stages of 3.2M images (--double 250 ticks of
    # 12.8 kimg: 25k steps): RAdam at lr 1e-4, no warm-up, EMA 0.9999 a step (no half-life, no
    # ramp-up), dropout 0.2, no augmentation, no x-flips, fp32 with TF32 off; 1 step from t = 80,
    # 2 re-noised at 0.821.
    # What differs:
    # - no EDM checkpoint loads here: stage 0 (25k steps of plain denoising) stands for it, so the
    #   run is 225k steps (25.6M / 128 + 25k) and stages 1-8 are ECT's 0-7. EDM trained its
    #   checkpoint on 200M images, stage 0 sees 3.2M: from scratch the FID lands far above 3.86
    #   and needs many times the steps to approach it;
    # - the U-Net is this file's DDPM++-style one at SongUNet's widths (128 x [2, 2, 2], 4 blocks a
    #   resolution, attention at 16x16): 57.4M parameters against 55.7M, strided-conv down- and
    #   nearest+conv upsampling for SongUNet's resampling blocks, attention in every 16x16 block;
    # - the EMA warms up to 0.9999 over the first 90k steps (ECT starts from EDM's EMA); by step
    #   225k the warm-up's weights weigh 0.9999^135k ~ 1e-6 in it.
    "paper": dict(
        data="cifar10",
        image_size=32,
        channels=128,
        ch_mult=[2, 2, 2],
        num_res=4,
        attn_res=[16],
        dropout=0.2,
        sigma_data=0.5,
        t_min=0.003,
        t_max=80.0,
        P_mean=-1.1,
        P_std=2.0,
        q=2.0,
        k=8.0,
        b=1.0,
        stage_steps=25_000,
        huber_c=0.0,
        mid_t=[0.821],
        bf16=False,
        flip=False,
        steps=225_000,
        batch_size=128,
        optim="radam",
        # fixed at any batch, as the official code
        lr=1e-4,
        warmup=0,
        ema=0.9999,
    ),
}


# ------------------------------------------------------------------------------------------- method
def scalings(t, sigma_data, t_min):
    """(c_skip, c_out, c_in) of CM Eq. 7 with EDM's preconditioning; c_skip(t_min) = 1 and
    c_out(t_min) = 0."""
    c_skip = sigma_data**2 / ((t - t_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (t - t_min) / (t**2 + sigma_data**2).sqrt()
    c_in = 1 / (t**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def ect_r(t, stage, q, k, b):
    """ECT's mapping t -> r for curriculum stage `stage` (0: denoising, r = 0)."""
    if stage == 0:
        return torch.zeros_like(t)
    return (t * (1 - q**-stage * (1 + k * torch.sigmoid(-b * t)))).clamp_min(0)


def pseudo_huber(a, b, c):
    """sqrt(||a - b||^2 + c^2) - c per sample (iCT Sec. 3.3)."""
    return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c


class Consistency(nn.Module):
    """forward(x, stage) -> (ECT's loss at that curriculum stage, its terms); sample(n) -> images in
    1 or k steps."""

    def __init__(self, cfg, net=None):
        super().__init__()
        self.cfg, self.net = cfg, net if net is not None else UNet(cfg)

    def f(self, x_t, t, masks=None):
        """The consistency function (CM Eq. 7) as ECT's ECMPrecond; t [B]; masks: the network's
        dropout masks (None: no dropout). Training mode: EDM's scalings (t_min = 0, the loss imposes
        the boundary); eval mode (sampling, the EMA model): CM's, f(x, t_min) = x."""
        scales = scalings(t, self.cfg.sigma_data, 0.0 if self.training else self.cfg.t_min)
        # [B] -> [B, 1, 1, 1]
        c_skip, c_out, c_in = (s.view(-1, *[1] * (x_t.dim() - 1)) for s in scales)
        return c_skip * x_t + c_out * self.net(c_in * x_t, t.log() / 4, masks).float()

    def forward(self, x, stage):
        """ECT's loss (Eq. 9) on images x [B, 3, H, W] at curriculum stage `stage` -> (loss, terms).
        The draws come in ECMLoss's order (t's normals, e, the dropout masks), so the same seed
        gives its numbers."""
        cfg = self.cfg

        def bc(s):  # [B] -> [B, 1, 1, 1], to scale images
            return s.view(-1, *[1] * (x.dim() - 1))

        # t ~ lognormal(P_mean, P_std) [B]
        t = (torch.randn(len(x), device=x.device) * cfg.P_std + cfg.P_mean).exp()
        r = ect_r(t, stage, cfg.q, cfg.k, cfg.b)  # 0 <= r < t, the curriculum's mapping [B]
        # one noise direction for both points of the trajectory [B, 3, H, W]
        e = torch.randn_like(x)
        # The teacher must be the student's own function, dropout included: the masks are drawn
        # once, here, and both passes apply them (None without dropout). They are plain tensors, so
        # they stay shared under torch.compile.
        masks = self.net.dropout_masks(len(x), x.device)
        pred = self.f(x + bc(t) * e, t, masks)  # the student f(x_t, t) [B, 3, H, W]
        if stage == 0:
            target = x  # stage 0: r = 0 everywhere, the target is x itself: plain denoising
        else:
            # stopgrad f(x_r, r): the same network and masks, no gradient (no EMA teacher)
            with torch.no_grad():
                # t where r = 0: log(r) stays finite
                f_r = self.f(x + bc(r) * e, torch.where(r > 0, r, t), masks)
            target = torch.where(bc(r) > 0, f_r, x)  # r = 0 (small t): the boundary f(x, 0) = x
        # d(f(x_t, t), target) [B]
        dist = pseudo_huber(pred, target, cfg.huber_c * math.sqrt(x[0].numel()))
        loss = (dist / (t - r)).mean()  # ECT Eq. 9: weighted by 1 / (t - r)
        return loss, dict(distance=dist.detach().mean(), boundary=(r == 0).float().mean())

    @torch.no_grad()
    def sample(self, n, *, mid_t=None, generator=None, device="cpu", shape=None):
        """1 step: x = f(t_max z, t_max). k steps: re-noise to each mid level and apply f again (CM
        Alg. 1, without its sqrt(s^2 - t_min^2), as ECT's generator_fn). In eval mode (the boundary
        scalings, no dropout)."""
        cfg = self.cfg
        shape = shape or (3, cfg.image_size, cfg.image_size)
        mid_t = cfg.mid_t if mid_t is None else mid_t

        def noise():
            return torch.randn((n, *shape), device=device, generator=generator)

        def at(s):  # the time s for every sample [n]
            return torch.full((n,), s, device=device)

        with common.autocast(torch.device(device), cfg.bf16):  # true fp32 (TF32 off) unless bf16
            x = self.f(cfg.t_max * noise(), at(cfg.t_max))
            for s in mid_t:
                x = self.f(x + s * noise(), at(s))
        return x.clamp(-1, 1) if len(shape) == 3 else x


def mid_levels(cfg, steps):
    """Re-noising levels for a k-step sample: ECT's 0.821 for 2 steps, else geometric between t_max
    and t_min."""
    if steps == 1:
        return []
    if steps == 2:
        return cfg.mid_t
    return np.geomspace(cfg.t_max, cfg.t_min, steps + 1)[1:-1].tolist()


# ----------------------------------------------------------------------------------------- backbone
def timestep_embedding(c, dim):
    """Sinusoidal embedding of c_noise = log(t)/4 (scaled by 1000 like DDPM's step index) -> [B,
    dim]."""
    f = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=c.device) / (dim // 2))
    a = 1000 * c[:, None].float() * f[None]
    return torch.cat([a.cos(), a.sin()], 1)


def group_norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, res):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.film = nn.Linear(emb_dim, 2 * c_out)  # time -> (scale, shift)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.mask_shape = (c_out, res, res)  # of the dropout mask on the input of conv2
        # each block starts as the identity (or its skip projection)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb, mask=None):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, 1)  # 2 x [B, C, 1, 1]
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = h if mask is None else h * mask  # dropout, its mask from UNet.dropout_masks
        return self.skip(x) + self.conv2(h)


class AttnBlock(nn.Module):
    def __init__(self, ch, heads=1):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)  # starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        # [B, 3, h, C/h, HW]
        qkv = self.qkv(self.norm(x)).view(B, 3, self.heads, C // self.heads, H * W)
        # head dim last and contiguous (a copy): the fused attention kernels need it, else they fall
        # back to the math
        q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)  # 3 x [B, h, HW, C/h]
        # [B, h, C/h, HW] -> [B, C, H, W]
        h = common.attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    """F_theta(c_in x, c_noise): down path with skips, a middle (res, attn, res), up path;
    zero-initialised output."""

    def __init__(self, cfg):
        super().__init__()
        ch, emb_dim = cfg.channels, 4 * cfg.channels

        def block(c_in, c_out, res):
            return ResBlock(c_in, c_out, emb_dim, res)

        def attn(c, res):  # attention at the resolutions cfg.attn_res
            return AttnBlock(c) if res in cfg.attn_res else nn.Identity()

        self.ch, self.p = ch, cfg.dropout
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        skips = [ch]  # channels of every down-path output, consumed in reverse by the up path
        c, res = ch, cfg.image_size
        for i, m in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res):
                self.down.append(nn.ModuleList([block(c, ch * m, res), attn(ch * m, res)]))
                c = ch * m
                skips.append(c)
            if i < len(cfg.ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, 2, 1))  # downsample x2
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList(
            [
                block(c, c, res),
                AttnBlock(c),
                block(c, c, res),
            ]
        )
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res + 1):
                self.up.append(
                    nn.ModuleList([block(c + skips.pop(), ch * m, res), attn(ch * m, res)])
                )
                c = ch * m
            if i > 0:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, 1, 1)
                    )
                )
                res *= 2
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, 1, 1)
        nn.init.zeros_(self.conv_out.weight)  # F = 0 at init: f(x_t, t) = c_skip x_t
        nn.init.zeros_(self.conv_out.bias)
        # in forward's order
        self.mask_shapes = [m.mask_shape for m in self.modules() if isinstance(m, ResBlock)]

    def dropout_masks(self, B, device):
        """Dropout as explicit masks, one [B, C, H, W] per residual block in forward's order, each
        drawn as F.dropout draws it on a CPU (Bernoulli(1 - p) / (1 - p)); None in eval mode or at p
        = 0 (nothing drawn)."""
        if not self.training or self.p == 0:
            return None
        return [
            torch.empty(B, *s, device=device).bernoulli_(1 - self.p) / (1 - self.p)
            for s in self.mask_shapes
        ]

    def forward(self, x, c_noise, masks=None, return_mid=False):
        emb = self.emb(timestep_embedding(c_noise, self.ch))
        drop = iter(masks or [])  # the residual blocks take their masks in order (none: no dropout)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, nn.Conv2d):
                h = layer(h)  # a strided conv: half the resolution
            else:
                # a residual block, then its attention (or an identity)
                h = layer[1](layer[0](h, emb, next(drop, None)))
            hs.append(h)
        h = self.mid[0](h, emb, next(drop, None))
        h = self.mid[2](self.mid[1](h), emb, next(drop, None))
        if return_mid:
            # [B, C, h, w] -> [B, C] pooled bottleneck features, for probing
            return h.float().mean((2, 3))
        for layer in self.up:
            if isinstance(layer, nn.Sequential):
                h = layer(h)
            else:
                # [B, C + C_skip, H, W] in
                h = layer[1](layer[0](torch.cat([h, hs.pop()], 1), emb, next(drop, None)))
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------- toy
class ToyMLP(nn.Module):
    def __init__(self, dim=2, width=256):
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(
            nn.Linear(dim + 64, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, dim),
        )

    def dropout_masks(self, B, device):
        return None  # no dropout

    def forward(self, x, c_noise, masks=None):
        return self.mlp(torch.cat([x, timestep_embedding(c_noise, 64)], 1))


def toy_data(n, generator):
    """8 Gaussians on a ring, std ~ sigma_data = 0.5."""
    k = torch.randint(8, (n,), generator=generator).float() * (2 * math.pi / 8)
    return torch.stack([k.cos(), k.sin()], 1) * 0.6 + 0.04 * torch.randn(n, 2, generator=generator)


def toy(args):
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    cfg = Config(stage_steps=max(1, args.toy_steps // 6), mid_t=[0.4])
    model = Consistency(cfg, ToyMLP())
    real = toy_data(2000, torch.Generator().manual_seed(123))

    def draw(steps):
        return model.eval().sample(
            2000, mid_t=[] if steps == 1 else cfg.mid_t, generator=g, shape=(2,)
        )

    rows = [
        dict(model="init", steps=1, distance=round(common.sliced_wasserstein(draw(1), real), 4))
    ]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in tqdm(range(args.toy_steps), desc="toy"):
        # forward (the stage: step // stage_steps), backward, update; no EMA, no log
        loss, _ = model(toy_data(512, g), step // cfg.stage_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = {s: draw(s) for s in (1, 2)}
    rows += [
        dict(model="trained", steps=s, distance=round(common.sliced_wasserstein(x, real), 4))
        for s, x in samples.items()
    ]
    for r in rows:
        print0(f"{r['model']:>7} {r['steps']}-step  sliced W1 = {r['distance']:.4f}")
    with open(os.path.join(args.out, "toy.json"), "w") as f:
        json.dump(
            {
                "metric": "sliced_wasserstein_1 (2-D, 256 directions, n=2000; lower is better)",
                "results": rows,
            },
            f,
            indent=1,
        )
    toy_png(
        {"data": real, "1-step": samples[1], "2-step": samples[2]},
        os.path.join(args.out, "toy.png"),
    )


def toy_png(panels, path, size=200):
    """Scatter panels without matplotlib."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size * len(panels), size + 14), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, pts) in enumerate(panels.items()):
        draw.text((i * size + 4, 1), name, fill="black")
        for px, py in ((pts.clamp(-1.5, 1.5) + 1.5) / 3 * (size - 8) + 4).long().tolist():
            draw.point((i * size + px, 14 + size - 1 - py), fill=(30, 60, 200))
        draw.rectangle((i * size, 14, i * size + size - 1, 14 + size - 1), outline="gray")
    img.save(path)


# ------------------------------------------------------------------------------------- train / main
# ECT: torch.optim.RAdam, betas (0.9, 0.999), eps 1e-8
OPTIMIZERS = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}


def optimizer(model, cfg):
    """Adam or RAdam (cfg.optim) at cfg.lr, with ECT's betas and eps."""
    return OPTIMIZERS[cfg.optim](model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def make_config(args):
    cfg = common.configure(Config, PRESETS, args)
    if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
        raise UsageError(
            f"image size {cfg.image_size} is not divisible by the U-Net's "
            f"{2 ** (len(cfg.ch_mult) - 1)}"
        )
    if cfg.grid < 0:
        raise UsageError(f"grid ({cfg.grid}) must be >= 0")
    if cfg.optim not in OPTIMIZERS:
        raise UsageError(f"optim {cfg.optim!r}: use {' or '.join(OPTIMIZERS)}")
    return cfg


def train(args):
    d, cfg, ckpt = common.start_run(args, Config, PRESETS, make_config)
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    # the same initial weights on every rank (and in eval's "at initialisation")
    torch.manual_seed(cfg.seed)
    model = Consistency(cfg).to(d.device)
    ema = common.Ema(model)
    opt = optimizer(model, cfg)
    start = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(
        f"consistency U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, {len(images)} images of "
        f"{cfg.data}, step {start} -> {cfg.steps}, {d.world} x {d.device}, "
        f"{'bf16' if cfg.bf16 else 'fp32'}"
    )
    # the whole loss (student, teacher, masks) is one graph
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world
    log = common.Log(args.out, d, cfg, start)
    for step in log.steps(start, cfg.steps):
        # learning rate: linear warm-up, then constant; the curriculum stage (ECT Sec. 3.2)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        stage = step // cfg.stage_steps
        # forward (the student, then the teacher without gradient), backward, update, EMA
        # this rank's batch: rows drawn with replacement, mirrored at random if cfg.flip;
        # x [B, 3, H, W] in [-1, 1]
        x, _ = common.batch(
            images, labels, bs, cfg.seed, step, d.rank, flip=cfg.flip, device=d.device
        )
        # true fp32 (TF32 off) unless bf16: see Config.bf16
        with common.autocast(d.device, cfg.bf16):
            loss, terms = step_model(x, stage)
        opt.zero_grad(set_to_none=True)
        # the backward in true fp32 too (no autocast, TF32 off)
        with common.autocast(d.device, False):
            loss.backward()
        opt.step()
        ema.update(model, min(cfg.ema, (1 + step) / (10 + step)))  # EMA, its decay warmed up
        # log (averaged over the processes; a NaN stops the run), sample grid, checkpoint
        done = step + 1
        log(done, loss, lr=lr, stage=stage, **terms)
        # the first half in 1 step, the rest in 2
        if d.master and cfg.grid and done % cfg.sample_every == 0:
            # own generator: the training RNG stream is untouched
            g = torch.Generator(d.device).manual_seed(cfg.seed)
            x1 = ema.model.sample(cfg.grid // 2, mid_t=[], generator=g, device=d.device)
            x2 = ema.model.sample(cfg.grid - cfg.grid // 2, generator=g, device=d.device)
            common.save_grid(torch.cat([x1, x2]), os.path.join(args.out, f"samples_{done:07d}.png"))
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt)


def generate(model, cfg, n, steps, args, d):
    """n samples in `steps` steps, split over the processes and gathered: [n, 3, H, W] in [-1, 1]
    (on every rank)."""
    per = math.ceil(n / d.world)
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = [
        model.sample(
            min(args.batch, per - i), mid_t=mid_levels(cfg, steps), generator=g, device=d.device
        )
        for i in tqdm(range(0, per, args.batch), desc=f"sample {steps}-step", disable=not d.master)
    ]
    return common.gather(torch.cat(xs), n, d)


def sample_cmd(args):
    d, ckpt, cfg, model = common.load_run(
        args, Config, lambda cfg, ckpt: Consistency(cfg), compile_net=args.compile
    )
    x = generate(model, cfg, args.n, args.sample_steps, args, d)
    if d.master:
        common.write_samples(args.out, x)


T_PROBE = 0.5  # the probe's noise level: t = s_d, signal and noise of equal power


def t_at_signal(signal):
    """The t at which x + t e holds the fraction `signal` = a / (a + s) of signal
    (common.PROBE_SIGNALS): 1 / (1 + t) = signal. Signals 0.1 to 0.9 span t = 9 to 0.11, inside
    training's lognormal(-1.1, 2) (median 0.33)."""
    return (1 - signal) / signal


# the detail read-out's noise level (a third noise, as every file): t = 0.5, T_PROBE's
T_DETAIL = t_at_signal(common.DETAIL_SIGNAL)


def at_t(model, images, t, device, fn):
    """fn(x_t, t [B]) over images, with x_t = x + t e, e seeded by the chunk's first row: the same
    noisy inputs for every model and figure at that t -> [N, ...]."""

    def one(x, i):
        e = torch.randn(x.shape, device=device, generator=torch.Generator(device).manual_seed(i))
        with common.autocast(device, model.cfg.bf16):
            return fn(x + t * e, torch.full((len(x),), t, device=device))

    return common.extract(one, images, device)


def features(model, images, t, device):
    """The consistency model's own representation: the U-Net bottleneck of c_in (x + t e),
    mean-pooled -> [N, C]."""

    def fn(x_t, tt):  # tt: t [B]
        # [B] -> [B, 1, 1, 1]
        _, _, c_in = scalings(tt, model.cfg.sigma_data, model.cfg.t_min)
        c_in = c_in.view(-1, 1, 1, 1)
        return model.net(c_in * x_t, tt.log() / 4, return_mid=True)

    return at_t(model, images, t, device, fn)


def eval_cmd(args):
    d, ckpt, cfg, model = common.load_run(
        args, Config, lambda cfg, ckpt: Consistency(cfg), compile_net=args.compile
    )
    data = args.data or cfg.data
    fd_net = common.FDFeatures(args.fd_model, d.device)
    samples = {s: generate(model, cfg, args.n, s, args, d) for s in sorted({args.sample_steps, 2})}
    if not d.master:
        return
    x_tr, y_tr, x_te, y_te = common.probe_data(data, cfg.image_size)
    torch.manual_seed(cfg.seed)
    # the same U-Net at initialisation: the probes' floor
    init = Consistency(cfg).to(d.device).eval()
    fd = {s: common.fd_to_train(fd_net, x, data, cfg.image_size) for s, x in samples.items()}
    res = dict(
        step=ckpt["step"],
        data=data,
        fd=fd[args.sample_steps],
        fd_ref=common.fd_to_ref(fd_net, samples[args.sample_steps], args.fd_ref),
        fd_2step=fd[2],
        sample_steps=args.sample_steps,
        fd_model=args.fd_model,
        n_samples=args.n,
        mid_t=cfg.mid_t,
        probe=f"mean-pooled U-Net bottleneck of x + t e at t={T_PROBE} (EMA weights)",
        detail=f"the one-step output f(x + t e, t) at t={T_DETAIL:.3g}, clamped to [-1, 1]",
    )
    for suffix, m in (("", model), ("_init", init)):
        f_tr, f_te = features(m, x_tr, T_PROBE, d.device), features(m, x_te, T_PROBE, d.device)
        res.update(common.probes(f_tr, y_tr, f_te, y_te, suffix))
        # the model's clean estimate f(x_t, t) [1000, 3, H, W] from a third noise
        x_made = None
        if data.startswith("shapes"):
            x_made = at_t(m, x_te[:1000], T_DETAIL, d.device, m.f).clamp(-1, 1)
        res.update(common.detail(x_made, data, suffix))
    res.update(common.pixel_probes(x_tr, y_tr, x_te, y_te, data))  # the floors: pixels
    # smaller, for five noise levels
    xs_tr, ys_tr, xs_te, ys_te = common.probe_data(data, cfg.image_size, 5_000, 2_000)

    def probe(signal):
        t = t_at_signal(signal)
        f_tr, f_te = features(model, xs_tr, t, d.device), features(model, xs_te, t, d.device)
        return common.linear_probe(f_tr, ys_tr.to(d.device), f_te, ys_te.to(d.device))

    by_signal = [[f, round(probe(f), 4)] for f in common.PROBE_SIGNALS]
    res["probe_linear_by_signal"] = by_signal
    common.write_eval(args.ckpt, res)


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    for s in (sub.choices["sample"], sub.choices["eval"]):
        s.add_argument(
            "--sample-steps",
            type=common.number(int),
            default=1,
            help=(
                "1 (from t_max), 2 (re-noise at 0.821) or "
                "more (eval: fd at this many, fd_2step at 2)"
            ),
        )
    to = sub.add_parser("toy", help="consistency training on a 2-D mixture with an MLP, on a CPU")
    to.add_argument(
        "--toy-steps",
        type=common.number(int),
        default=6000,
        help="training steps (6 curriculum stages)",
    )
    to.add_argument("--out", required=True, type=common.out_dir)
    to.add_argument("--seed", type=common.number(int, 0, strict=False), default=0)
    args = p.parse_args(argv)
    {"train": train, "sample": sample_cmd, "eval": eval_cmd, "toy": toy}[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
