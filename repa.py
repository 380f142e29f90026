"""REPA: a SiT's hidden tokens aligned to the patch tokens of a frozen self-supervised encoder.

S. Yu, S. Kwak, H. Jang, J. Jeong, J. Huang, J. Shin, S. Xie, "Representation Alignment for
Generation: Training Diffusion Transformers Is Easier Than You Think", ICLR 2025.

Claim: a diffusion transformer learns semantic features slowly; aligning its early hidden tokens to
a frozen encoder (DINOv2) makes training much faster (17.5x for SiT-XL) and its features more
understanding-like.

    x_t = (1 - t) x + t e,   v = e - x,   t ~ U(0, 1), t = 1 noise     (SiT's interpolant, Eq. 2)
    L_v = ||v_theta(x_t, t, y) - v||^2                                                   (Eq. 3)
    L_align = -1/N sum_n cos(h_phi(h_t[n]), y_*[n])                                      (Eq. 8)
        h_t: the tokens after block align_depth,  h_phi: a 3-layer MLP projector,
        y_*: the encoder's patch tokens of the clean x
    L = L_v + lambda L_align,   lambda = 0.5   (--proj-coeff 0: the plain SiT)           (Eq. 9)

Samplers: Euler (`ode`) or Heun (`heun`) on the probability-flow ODE dx/dt = v, and
Euler-Maruyama (`sde`, the paper's) on the reverse SDE; CFG where lo <= t <= hi (the paper:
t <= 0.7, scale 1.8).

Commands (python repa.py {train,sample,eval,import} -h lists every flag):

    python repa.py train --preset cpu --out runs/repa_cpu   # CPU (and --proj-coeff 0, runs/sit_cpu)
    python repa.py eval --ckpt runs/repa_cpu/ckpt.pt --n 1000
    python repa.py train --data cifar10 --out runs/repa --compile             # one GPU: the claim
    python repa.py train --data cifar10 --proj-coeff 0 --out runs/sit --compile   # the control
    python repa.py sample --ckpt runs/repa/ckpt.pt --n 50000 --sampler sde --cfg-scale 1.8 \\
        --out runs/repa/samples.npz
    python repa.py eval --ckpt runs/repa/ckpt.pt --fd-model inception            # and runs/sit
    python repa.py train --data in256/ --latents --preset B --out runs/repa_b     # SD-VAE latents
    torchrun --nproc_per_node 8 repa.py train --preset paper --data in256/ --out runs/xl # FID 1.42
    python repa.py sample --ckpt runs/xl/ckpt.pt --n 50000 --out runs/xl/z.npz  # SDE 250, CFG 1.8
    torchrun --nproc_per_node 8 repa.py train --preset paper-B --data in256/ --out runs/b # FID 24.4

in256/ is ImageNet's train split as the official preprocessing makes it (preprocessing/README.md):
train_images.npy uint8 [N, 256, 256, 3] (ADM's centre crop: the encoder's input), train_labels.npy
[N], and train_latents.npy float [N, 8, 32, 32]: per image the posterior mean and std of
stabilityai/sd-vae-ft-mse's encoder on the image in [-1, 1], on channels (its img-mean-std-*.npy,
stacked in dataset.json's order). Each step draws z = (mean + std e) x 0.18215 of the batch
(sample_posterior; vae_channels, vae_scale); a file of [N, 4, 32, 32] is read as the latents
themselves (e.g. the mean x 0.18215). test_*.npy of the val split, made the same way, are eval's
(without them a seeded tenth of train is held out, and the run trains on the rest). `sample` then
writes latents.

Expected with DINOv2 (a GPU): at equal steps, the aligned run has the lower FD and the higher probe
of its own hidden tokens. The paper: SiT-B/2 on ImageNet 256 at 400k steps, FID 24.4 with REPA
without CFG (`paper-B`); SiT-XL/2 at 4M steps (800 epochs), 1.42 with the SDE's 250 steps and CFG
1.8 on t <= 0.7 (`paper`); FID of 50k samples decoded by the VAE (ADM's suite). Offline there is
no DINOv2: against random-vit-s the CPU preset shows the mechanism (the alignment term reaches cos
0.86), not the gain, since a random ViT holds no semantics (the README's table has the figures).
eval.json: FD; probes of the SiT's tokens after block align_depth at t = probe_t (null class,
mean-pooled) and from 10% to 90% signal in x_t (probe_linear_by_signal); the encoder's own probes;
on `shapes`, the stripes x_t - t v keeps from a third noise (detail_pattern, detail_amplitude).

Encoders (--encoder, common.load_encoder): dinov2_vitb14 (the paper's, downloaded once into
torch.hub's cache), random-vit-s (offline) or a soda.py export; @RES sets the input size (224:
16 x 16 patch tokens; another grid is interpolated to the SiT's).

Deliberate differences from the official code (sihyun-yu/REPA):
- bf16 autocast on a GPU, the frozen encoder's forward included (official: fp16; the alignment loss
  is normalised in fp32, where fp16 gave NaNs);
- an EMA that warms up; class-balanced sample labels (official: random); the null class's row even
  without label dropout;
- batches of rows drawn with replacement, every step's own (official: shuffled epochs); no VAE here:
  the latents are precomputed (above), and `sample` writes latents for the VAE to decode.

The released SiT-XL/2 (ImageNet 256, SD-VAE latents, DINOv2-B; generate.py's last.pt) loads with
strict=True; `import` makes it a run and `sample` writes its latents (decode them as generate.py
does, with stabilityai/sd-vae-ft-ema: vae.decode(z / 0.18215), then (x + 1) / 2; -ema and -mse
share their encoder, only the decoders were fine-tuned):

    python repa.py import --official last.pt --out runs/repa_xl
    python repa.py sample --ckpt runs/repa_xl/ckpt.pt --n 50000 --sampler sde --sample-steps 250 \\
        --cfg-scale 1.8 --out runs/repa_xl/latents.npz
"""

import argparse
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace

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
    # images are resized to image_size^2 (with --latents: the latent grid, filled in)
    image_size: int = 32
    # train on --data DIR's train_latents.npy (the paper: SD-VAE's), not on pixels
    latents: bool = False
    channels: int = 3  # what the SiT reads and writes (with --latents: the latents' C, filled in)
    # the VAE's latent channels C: a train_latents.npy of 2C channels holds the VAE posterior's
    # [mean, std] (the official preprocessing's), sampled every step; any other count, the latents
    vae_channels: int = 4
    vae_scale: float = 0.18215  # SD-VAE's: z = (mean + std e) x vae_scale, of a [mean, std] file
    patch: int = 2  # SiT/2
    hidden: int = 384  # SiT-S width (B 768, L 1024, XL 1152)
    depth: int = 12  # blocks (S/B 12, L 24, XL 28)
    heads: int = 6  # attention heads (B 12, L/XL 16)
    encoder: str = "dinov2_vitb14"  # frozen encoder (paper: DINOv2-B)
    align_depth: int = 4  # block whose tokens are aligned (B: 4, L/XL: 8)
    proj_dim: int = 2048  # projector width
    proj_coeff: float = 0.5  # lambda; 0 = plain SiT
    label_drop: float = 0.1  # class dropped to the null class for CFG
    num_classes: int = 10  # filled in from the data
    steps: int = 100_000  # optimiser steps
    batch_size: int = 256  # global batch size
    lr: float = 1e-4  # AdamW, weight decay 0 (paper); fixed at any batch, as the official code
    grad_clip: float = 1.0  # paper: 1
    warmup: int = 0  # paper: none
    ema: float = 0.9999  # paper: 0.9999 (with warm-up here)
    # heun (2nd order at 50 steps) | ode (Euler: generate.py's default) | sde (paper)
    sampler: str = "heun"
    sample_steps: int = 50  # paper: 250 SDE steps
    cfg_scale: float = 1.0  # CFG scale (paper 1.8 for its best FID)
    # CFG where lo <= t <= hi (paper: t <= 0.7)
    cfg_interval: list = field(default_factory=lambda: [0.0, 0.7])
    probe_t: float = 0.25  # noise level at which eval probes the hidden tokens
    log_every: int = 50  # steps between log.jsonl rows
    sample_every: int = 5_000  # steps between sample grids (drawn when the step is a multiple)
    grid: int = 64  # images in the sample grids (0: none)
    ckpt_every: int = 2_500  # steps between checkpoints
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(
        data="shapes:1000",
        image_size=16,
        patch=4,
        hidden=64,
        depth=2,
        heads=2,
        encoder="random-vit-s@28",
        align_depth=1,
        proj_dim=64,
        steps=20,
        batch_size=16,
        lr=1e-3,
        ema=0.9,
        sample_steps=4,
        log_every=1,
        sample_every=10,
        ckpt_every=10,
    ),
    # 2-core CPU, 7.7 min: the mechanism against a random ViT (offline: no DINOv2), not the paper's
    # gain (docstring)
    "cpu": dict(
        data="shapes:10000",
        image_size=16,
        patch=4,
        hidden=128,
        depth=4,
        heads=4,
        encoder="random-vit-s@28",
        align_depth=2,
        proj_dim=256,
        steps=1000,
        batch_size=64,
        lr=5e-4,
        ema=0.999,
        sample_steps=20,
        log_every=50,
        sample_every=500,
        ckpt_every=500,
    ),
    # one GPU: SiT-S/2 on CIFAR-10 32x32, aligned to DINOv2-B at 224 (16x16 patch tokens, one per
    # SiT token)
    "default": dict(),
    # the SiT sizes only (widths, depth, heads, aligned block) on the default's schedule, not the
    # paper's runs (those are `paper-B` and `paper`)
    "B": dict(hidden=768, depth=12, heads=12, align_depth=4),  # SiT-B/2
    "L": dict(hidden=1024, depth=24, heads=16, align_depth=8),  # SiT-L/2
    # SiT-XL/2's sizes, the released checkpoint's (`import`); not the paper's run
    "XL": dict(hidden=1152, depth=28, heads=16, align_depth=8),
    # The paper's headline: SiT-XL/2 + REPA on ImageNet 256 (SD-VAE latents, 32 x 32 x 4), FID 1.42
    # with the SDE sampler's 250 steps and CFG 1.8 on t <= 0.7 (the paper's system-level comparison
    # with CFG: 800 epochs, the guidance interval). The official run, sihyun-yu/REPA@67f7145's
    # README.md command
    #   accelerate launch train.py --allow-tf32 --mixed-precision=fp16 --seed=0 --path-type=linear
    #     --prediction=v --weighting=uniform --model=SiT-XL/2 --enc-type=dinov2-vit-b
    #     --proj-coeff=0.5 --encoder-depth=8 --data-dir=DIR
    # with --max-train-steps=4000000 (the released checkpoint's 4M iterations, README.md; the
    # command as written stops at train.py's default 400k), then README.md's generate.py --mode=sde
    # --num-steps=250 --cfg-scale=1.8 --guidance-high=0.7 on 50k samples. Steps: 4M iterations at
    # batch 256 = 800 epochs of ImageNet's 1,281,167 (4e6 x 256 / 1,281,167 = 799.3). lr constant,
    # no warm-up; AdamW (0.9, 0.999), eps 1e-8, wd 0; clip 1; EMA 0.9999; label drop 0.1; no flips.
    # What differs (the docstring's list): bf16 autocast where the official run is fp16 (both with
    # TF32), an EMA that warms up (at 0.9999 from step 90k on), batches drawn with replacement
    # rather than shuffled epochs, the latents precomputed into --data DIR (train_latents.npy of the
    # VAE's mean and std, sampled every step as officially): none changes what is optimised.
    "paper": dict(
        data="imagenet",
        latents=True,
        image_size=32,
        channels=4,
        vae_channels=4,
        vae_scale=0.18215,
        patch=2,
        hidden=1152,
        depth=28,
        heads=16,
        encoder="dinov2_vitb14",
        align_depth=8,
        proj_dim=2048,
        proj_coeff=0.5,
        label_drop=0.1,
        num_classes=1000,
        steps=4_000_000,
        batch_size=256,
        lr=1e-4,
        grad_clip=1.0,
        warmup=0,
        ema=0.9999,
        sampler="sde",
        sample_steps=250,
        cfg_scale=1.8,
        cfg_interval=[0.0, 0.7],
        ckpt_every=50_000,
    ),
}

# SiT-B/2 + REPA at 400k steps (train.py's default --max-train-steps), FID 24.4 without CFG
# (the paper's comparison with the plain SiT at 400k): `paper` with SiT-B/2's sizes, its aligned
# block 4 (the authors: layer 4 for SiT-B/2, 8 for L and XL; the README's command is XL's 8)
# and no CFG (generate.py --cfg-scale=1.0), the same SDE at 250 steps.
PRESETS["paper-B"] = PRESETS["paper"] | dict(
    hidden=768, depth=12, heads=12, align_depth=4, steps=400_000, cfg_scale=1.0
)


# ------------------------------------------------------------------------------------------- method
class REPA(nn.Module):
    """forward(x, y, z_enc) -> (L_v + lambda L_align, its terms); sample(y) -> images (or latents).
    z_enc: the frozen encoder's patch tokens of the clean images. h_phi lives in the SiT
    (net.projectors.0), as officially."""

    def __init__(self, cfg, enc_dim=None):
        super().__init__()
        self.cfg, self.net = cfg, SiT(cfg, enc_dim if cfg.proj_coeff > 0 else None)

    def forward(self, x, y, z_enc=None):
        cfg, B = self.cfg, x.shape[0]
        # the official loss.py's order of draws: t, noise, then the dropped labels
        t = torch.rand(B, device=x.device)
        e = torch.randn_like(x)
        if cfg.label_drop > 0:
            # null class for CFG
            y = torch.where(torch.rand(B, device=x.device) < cfg.label_drop, cfg.num_classes, y)
        t4 = t.view(B, 1, 1, 1)
        x_t = (1 - t4) * x + t4 * e  # Eq. 2
        # [B, C, H, W], the tokens after block align_depth [B, N, D]
        v_pred, h = self.net(x_t, t, y)
        loss_v = ((v_pred.float() - (e - x)) ** 2).mean()  # Eq. 3
        if not self.net.projectors:
            return loss_v, {"loss_v": loss_v.detach()}
        # Eq. 8, h_phi: [B, N, D_enc]
        loss_align = align_loss(self.net.projectors[0](h), to_grid(z_enc, self.net.grid))
        terms = {"loss_v": loss_v.detach(), "loss_align": loss_align.detach()}
        return loss_v + cfg.proj_coeff * loss_align, terms  # Eq. 9

    @torch.no_grad()
    def sample(self, y, *, sampler=None, steps=None, scale=None, interval=None, generator=None):
        """Class labels y [B] -> images [B,3,H,W] in [-1, 1] (or latents [B,C,h,w]), from noise at t
        = 1."""
        cfg = self.cfg
        scale, interval = cfg.cfg_scale if scale is None else scale, interval or cfg.cfg_interval
        sampler, steps = sampler or cfg.sampler, steps or cfg.sample_steps
        x = torch.randn(
            (len(y), cfg.channels, cfg.image_size, cfg.image_size),
            device=y.device,
            generator=generator,
        )
        with common.autocast(x.device):

            def v(x, t, t_cfg=None):  # the velocity with CFG, for the samplers
                return self.velocity(x, t, y, scale, interval, t_cfg)

            if sampler == "sde":
                x = sample_sde(v, x, steps, generator)
            else:
                x = sample_ode(v, x, steps, heun=sampler == "heun")
        return x if cfg.latents else x.clamp(-1, 1)

    def velocity(self, x, t, y, scale, interval, t_cfg=None):
        """v(x, t) in float64 (x: float64, the official samplers' state), with CFG on all channels
        where lo <= t_cfg <= hi (t_cfg = t, except Heun's second evaluation: the official one keeps
        the step's decision)."""
        B, t_cfg = x.shape[0], t if t_cfg is None else t_cfg
        tt = torch.full((B,), t, device=x.device)
        if scale != 1 and interval[0] <= t_cfg <= interval[1]:
            # one batch: the conditional half, then the null class's half
            y_and_null = torch.cat([y, torch.full_like(y, self.cfg.num_classes)])
            v = self.net(torch.cat([x, x]).float(), torch.cat([tt, tt]), y_and_null)[0]
            v_c, v_u = v.double().chunk(2)
            return v_u + scale * (v_c - v_u)
        return self.net(x.float(), tt, y)[0].double()


SAMPLERS = ("heun", "ode", "sde")


def sample_ode(v, x, steps, heun=False):
    """Euler (or Heun) on dx/dt = v(x, t) from t = 1 (noise) to 0 on linspace(1, 0, steps + 1), in
    float64 as the official euler_sampler; Heun's last step is Euler (no evaluation at t = 0). ->
    float32."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    x = x.double()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        velocity = v(x, t)
        x_next = x + (t_next - t) * velocity
        if heun and i < steps - 1:
            # CFG decided at t, as officially
            x_next = x + (t_next - t) * (0.5 * velocity + 0.5 * v(x_next, t_next, t))
        x = x_next
    return x.float()


def sample_sde(v, x, steps, generator=None):
    """Euler-Maruyama on dx = [v - w/2 s] dt + sqrt(w) dW, s = -(x + (1 - t) v)/t, w = 2t, on the
    official grid (euler_maruyama_sampler): steps - 1 noisy steps on linspace(1, 0.04, steps), then
    0.04 -> 0 as the mean of one more step; state and noise in float64. CFG on v is the official CFG
    on the drift (affine in v). -> float32."""
    ts = torch.linspace(1, 0.04, steps, dtype=torch.float64).tolist() + [0.0]
    x = x.double()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        d = v(x, t)
        w, s = 2 * t, -(x + (1 - t) * d) / t  # the diffusion w(t) and the score implied by v
        x = x + (t_next - t) * (d - 0.5 * w * s)
        if i < steps - 1:  # the last step (0.04 -> 0) is the mean: no noise
            noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            x = x + math.sqrt(w * (t - t_next)) * noise  # sqrt(w |dt|) e
    return x.float()


def align_loss(h_proj, z_enc):
    """-mean cos(h_proj, z_enc) over tokens and batch (Eq. 8); normalised in fp32, also under bf16
    autocast (the official fp16 run's NaNs)."""
    return (
        -(F.normalize(h_proj.float(), dim=-1) * F.normalize(z_enc.float(), dim=-1)).sum(-1).mean()
    )


def to_grid(tokens, grid):
    """[B, M, D] tokens of a sqrt(M) x sqrt(M) grid -> [B, grid*grid, D] (bilinear), unchanged when
    the grids agree."""
    B, M, D = tokens.shape
    m = math.isqrt(M)
    if m == grid:
        return tokens
    t = tokens.transpose(1, 2).reshape(B, D, m, m)  # [B, D, m, m]
    return (
        F.interpolate(t.float(), size=(grid, grid), mode="bilinear", align_corners=False)
        .flatten(2)
        .transpose(1, 2)
    )


def projector(dim, proj_dim, enc_dim):
    """h_phi: Linear, SiLU, Linear, SiLU, Linear, applied to every token (official build_mlp)."""
    return nn.Sequential(
        nn.Linear(dim, proj_dim),
        nn.SiLU(),
        nn.Linear(proj_dim, proj_dim),
        nn.SiLU(),
        nn.Linear(proj_dim, enc_dim),
    )


# ----------------------------------------------------------------------------------------- backbone
def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding -> [grid*grid, dim], in float64 as MAE's numpy code
    (official sit.py): the first half of the channels encodes the column, the second the row, each
    as [sin, cos]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    out = [torch.outer(p.flatten().double(), omega) for p in (cols, rows)]  # 2 x [N, dim/4]
    return torch.cat(
        [torch.sin(out[0]), torch.cos(out[0]), torch.sin(out[1]), torch.cos(out[1])], 1
    ).float()


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        # 3 x [B, h, N, hd]
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # [B, h, N, hd] -> [B, N, D]
        return self.proj(common.attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """DiT/SiT block: LayerNorm, attention, GELU MLP, adaLN-zero modulation from c."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        mlp = dict(
            fc1=nn.Linear(dim, 4 * dim),
            act=nn.GELU(approximate="tanh"),
            fc2=nn.Linear(4 * dim, dim),
        )
        self.mlp = nn.Sequential(OrderedDict(mlp))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, -1)  # 6 x [B, 1, D]
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t [B] in [0, 1], raw (not x1000, as the official SiT) -> [B, dim]
        f = torch.exp(
            -math.log(10000)
            * torch.arange(self.freq_dim // 2, device=t.device)
            / (self.freq_dim // 2)
        )
        a = t[:, None].float() * f[None]
        return self.mlp(torch.cat([a.cos(), a.sin()], 1))


class SiT(nn.Module):
    """forward(x_t, t, y) -> (v_pred [B,C,H,W], tokens after block align_depth [B,N,D]). Parameter
    names are the official ones (models/sit.py), projectors included: the released state dicts load
    with strict=True."""

    def __init__(self, cfg, enc_dim=None):
        super().__init__()
        p, D, self.grid, self.cfg = cfg.patch, cfg.hidden, cfg.image_size // cfg.patch, cfg
        self.x_embedder = nn.ModuleDict(dict(proj=nn.Conv2d(cfg.channels, D, p, p)))
        self.t_embedder = TimestepEmbedder(D)
        # last: null
        self.y_embedder = nn.ModuleDict(dict(embedding_table=nn.Embedding(cfg.num_classes + 1, D)))
        self.register_buffer("pos_embed", sincos_2d(self.grid, D)[None])  # [1, N, D], fixed
        self.blocks = nn.ModuleList(Block(D, cfg.heads) for _ in range(cfg.depth))
        # h_phi
        self.projectors = nn.ModuleList([projector(D, cfg.proj_dim, enc_dim)] if enc_dim else [])
        self.final_layer = fl = nn.ModuleDict(
            dict(
                norm_final=nn.LayerNorm(D, elementwise_affine=False, eps=1e-6),
                linear=nn.Linear(D, p * p * cfg.channels),
                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D)),
            )
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(D, -1))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in self.t_embedder.mlp[::2]:
            nn.init.normal_(m.weight, std=0.02)
        # adaLN-zero
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks] + [
            fl.adaLN_modulation[-1],
            fl.linear,
        ]
        for w in nn.ModuleList(zeroed).parameters():  # and a zero output
            nn.init.zeros_(w)

    def forward(self, x, t, y, stop_at=None):
        B, p, g, C = x.shape[0], self.cfg.patch, self.grid, self.cfg.channels
        # [B, D, g, g] -> [B, N, D]
        h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)  # conditioning vector [B, D]
        for block in self.blocks[: self.cfg.align_depth]:
            h = block(h, c)
        h_align = h  # the tokens REPA aligns [B, N, D]
        if stop_at == "align":  # eval's probes need no more
            return None, h_align
        for block in self.blocks[self.cfg.align_depth :]:
            h = block(h, c)
        fl = self.final_layer
        sh, sc = fl.adaLN_modulation(c)[:, None].chunk(2, -1)  # 2 x [B, 1, D]
        out = fl.linear(modulate(fl.norm_final(h), sh, sc))  # [B, N, p*p*C]
        out = out.view(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        return out.reshape(B, C, g * p, g * p), h_align


# ------------------------------------------------------------------------------------- train / main
def sample_posterior(moments, scale, generator=None):
    """The VAE posterior's [mean, std] [B, 2C, h, w] -> z = (mean + std e) x scale [B, C, h, w], e ~
    N(0, I) drawn on the CPU from generator (official train.py's sample_posterior, bias 0)."""
    mean, std = moments.chunk(2, dim=1)  # 2 x [B, C, h, w]
    e = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * e) * scale


def step_generator(seed, step, rank):
    """A CPU generator that is a function of (seed, step, rank) alone, as common.batch_rows' is (a
    resumed run draws the same numbers), on a stream of its own: a hashed seed, not batch_rows'."""
    seed = np.random.SeedSequence([seed % 2**32, step, rank, 1]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def is_posterior(cfg, xs):
    """Whether the latents xs hold the VAE posterior's [mean, std] (2C channels), not latents."""
    return cfg.latents and xs.shape[1] == 2 * cfg.channels


def load_data(cfg, split):
    """-> (what the SiT models, the images the encoder reads, labels); fills in cfg.num_classes. In
    pixel space both are the uint8 images. With --latents, the SiT models the float latents the
    paper precomputes: --data DIR, a folder of .npy files with train_latents.npy beside
    train_images.npy, both memory-mapped (common.npy_split: the same rows); the encoder reads the
    images at their own size. train_latents.npy [N, 2C, h, w] (C = vae_channels) holds SD-VAE's
    posterior [mean, std] (sample_posterior draws from it), any other [N, C', h, w] the latents."""
    if not cfg.latents:
        images, labels, cfg.num_classes = common.load_images(cfg.data, split, cfg.image_size)
        return images, images, labels
    if not os.path.isfile(os.path.join(cfg.data, "train_images.npy")):
        raise UsageError(
            "--latents needs --data DIR with train_latents.npy "
            f"beside train_images.npy (not {cfg.data}; the docstring has their layout)"
        )
    latents = common.npy_split(cfg.data, split, "latents")[0]
    images, labels, cfg.num_classes = common.load_images(cfg.data, split, None)
    if len(latents) != len(images):
        raise UsageError(f"{cfg.data}: {len(latents)} latents for {len(images)} images")
    # [mean, std]: the SiT models C channels
    c = latents.shape[1]
    cfg.channels = c // 2 if c == 2 * cfg.vae_channels else c
    cfg.image_size = latents.shape[-1]
    if cfg.image_size % cfg.patch:
        raise UsageError(
            f"latent size {cfg.image_size} is not divisible by the patch size {cfg.patch}"
        )
    return latents, images, labels


def make_config(args):
    cfg = common.configure(Config, PRESETS, args)
    if cfg.image_size % cfg.patch:
        raise UsageError(
            f"image size {cfg.image_size} is not divisible by the patch size {cfg.patch}"
        )
    if not 1 <= cfg.align_depth <= cfg.depth:
        raise UsageError(
            f"align_depth {cfg.align_depth} is not a block of the {cfg.depth}-block SiT"
        )
    if cfg.sampler not in SAMPLERS:
        raise UsageError(f"sampler is one of {', '.join(SAMPLERS)} (got {cfg.sampler!r})")
    return cfg


def train(args):
    d, cfg, ckpt = common.start_run(args, Config, PRESETS, make_config)
    # xs: what the SiT models (the images, or their latents)
    xs, images, labels = load_data(cfg, "train")
    encoder = common.load_encoder(cfg.encoder, d.device) if cfg.proj_coeff > 0 else None
    # the same initial weights on every rank (and in eval's "at initialisation")
    torch.manual_seed(cfg.seed)
    model = REPA(cfg, encoder.dim if encoder else None).to(d.device)
    ema = common.Ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    align = "no alignment"
    if encoder:
        align = f"REPA to {cfg.encoder} at block {cfg.align_depth}, lambda {cfg.proj_coeff}"
    # latents, or the VAE posterior's [mean, std] that each step samples
    posterior = is_posterior(cfg, xs)
    what = "latents" if cfg.latents else "images"
    if posterior:
        what = f"VAE posteriors, z = (mean + std e) x {cfg.vae_scale:g}"
    print0(
        f"SiT {sum(p.numel() for p in model.net.parameters()) / 1e6:.1f}M "
        f"params, {align}, {len(xs)} rows of {cfg.data} ({what}), "
        f"step {start} -> {cfg.steps}, {d.world} x {d.device}"
    )
    step_model = common.wrap(model, d, args.compile)
    # no flips of latents: a flipped latent is not the latent of the flipped image (flip the images
    # when precomputing)
    rows = dict(
        batch_size=cfg.batch_size // d.world,
        seed=cfg.seed,
        rank=d.rank,
        flip=not cfg.latents,
        device=d.device,
    )
    log = common.Log(args.out, d, cfg, start)
    for step in log.steps(start, cfg.steps):
        # learning rate: linear warm-up (none in the paper), then constant
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        # batch: this rank's rows of the step (drawn with replacement); the encoder reads their
        # images
        x, y = common.batch(xs, labels, step=step, **rows)  # what the SiT models [B, C, H, W]
        x_img = common.batch(images, labels, step=step, **rows)[0] if cfg.latents else x
        if posterior:
            # [B, 2C, h, w] -> a fresh z [B, C, h, w] of the VAE posterior every step, its e the
            # step's own (exact resume)
            x = sample_posterior(x, cfg.vae_scale, step_generator(cfg.seed, step, d.rank))
        # forward (bf16 on a GPU, the frozen encoder too: the official mixed precision), backward,
        # clip, update, EMA
        with common.autocast(d.device):
            # patch tokens of the clean images [B, M, D_enc]
            z_enc = encoder(x_img)[1] if encoder else None
            loss, terms = step_model(x, y, z_enc)  # Eq. 9 and its terms L_v, L_align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, min(cfg.ema, (1 + step) / (10 + step)))  # EMA, its decay warmed up
        # log (averaged over the processes; a NaN stops the run), sample grid (pixels only),
        # checkpoint
        done = step + 1
        log(done, loss, lr=lr, **terms)
        # the run's own sampler
        if d.master and cfg.grid and not cfg.latents and done % cfg.sample_every == 0:
            # own generator: the training RNG stream is untouched
            g = torch.Generator(d.device).manual_seed(cfg.seed)
            y = torch.arange(cfg.grid, device=d.device) % cfg.num_classes
            common.save_grid(
                ema.model.sample(y, generator=g), os.path.join(args.out, f"samples_{done:07d}.png")
            )
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt)


def build(cfg, ckpt):
    """The model of a checkpoint: the projector's output width is the encoder's, read from the saved
    weights."""
    return REPA(
        cfg, ckpt["ema"]["net.projectors.0.4.weight"].shape[0] if cfg.proj_coeff > 0 else None
    )


def generate(model, cfg, n, args, d):
    """n class-balanced samples, split over the processes, gathered on every rank: images in [-1, 1]
    (or latents)."""
    per = math.ceil(n / d.world)
    y = (torch.arange(per) + d.rank * per) % cfg.num_classes
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = [
        model.sample(
            yb.to(d.device),
            sampler=args.sampler,
            steps=args.sample_steps,
            scale=args.cfg_scale,
            interval=args.cfg_interval,
            generator=g,
        )
        for yb in tqdm(y.split(args.batch), desc="sample", disable=not d.master)
    ]
    return common.gather(torch.cat(xs), n, d)


def sample_cmd(args):
    d, ckpt, cfg, model = common.load_run(args, Config, build, compile_net=args.compile)
    x = generate(model, cfg, args.n, args, d)
    if not d.master:
        return
    if not cfg.latents:
        return common.write_samples(args.out, x)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, latents=x.float().cpu().numpy(), labels=np.arange(args.n) % cfg.num_classes)
    print0(
        f"wrote {args.out}: latents {list(x.shape)} (decode "
        "them with the VAE that made the training latents)"
    )


def at_t(model, xs, t, device, x_hat=False):
    """The SiT on x_t of xs (uint8 images or float latents; e seeded per chunk, the null class) ->
    its representation, the tokens after block align_depth mean-pooled [N, D]; x_hat: the clean
    estimate x_t - t v_pred in [-1, 1]. In true fp32 (TF32 off): eval's figures are not bf16's
    rounding (and on a CPU, fp32 is the faster)."""

    def fn(x, i):
        B = len(x)
        e = torch.randn(x.shape, device=device, generator=torch.Generator(device).manual_seed(i))
        x_t = (1 - t) * x + t * e  # Eq. 2
        tt = torch.full((B,), t, device=device)
        null = torch.full((B,), model.cfg.num_classes, device=device)
        with common.autocast(device, False):
            v, h = model.net(x_t, tt, null, stop_at=None if x_hat else "align")
        # [B, C, H, W] or [B, N, D] -> [B, D]
        return (x_t - t * v.float()).clamp(-1, 1) if x_hat else h.float().mean(1)

    return common.extract(fn, xs, device)


def t_at_signal(signal):
    """The t at which x_t = (1 - t) x + t e (Eq. 2) holds the fraction `signal` = a / (a + s) of
    signal (common.PROBE_SIGNALS): 1 - t = signal."""
    return 1 - signal


def probe_data(cfg, data):
    """Uniform subsets of both splits (common.probe_data) -> (s_tr, x_tr, y_tr, s_te, x_te, y_te):
    what the SiT reads (the images, or with --latents the latents of the same rows), the images, the
    labels."""
    dcfg = replace(cfg, data=data)  # the run's config (size, latents) on the data asked for
    s_tr, images, _ = load_data(dcfg, "train")
    s_te = load_data(dcfg, "test")[0]
    x_tr, y_tr, x_te, y_te = common.probe_data(data, images.shape[-1])
    if not cfg.latents:
        return x_tr, x_tr, y_tr, x_te, x_te, y_te
    # the latents of the same rows (common.probe_data draws them with common.subset)
    posterior = is_posterior(dcfg, s_tr)
    s_tr = s_tr[common.subset(len(s_tr), len(x_tr))]
    s_te = s_te[common.subset(len(s_te), len(x_te))]
    if posterior:
        # the posterior's mean x vae_scale: the probes' latents are deterministic
        s_tr = s_tr.chunk(2, dim=1)[0] * cfg.vae_scale
        s_te = s_te.chunk(2, dim=1)[0] * cfg.vae_scale
    return s_tr, x_tr, y_tr, s_te, x_te, y_te


def eval_cmd(args):
    d, ckpt, cfg, model = common.load_run(args, Config, build, compile_net=args.compile)
    # latent samples need their VAE: no FD
    data, dev, pixels = args.data or cfg.data, d.device, not cfg.latents
    s_tr, x_tr, y_tr, s_te, x_te, y_te = probe_data(cfg, data)
    encoder = common.load_encoder(args.encoder or cfg.encoder, dev)
    fd_net = common.FDFeatures(args.fd_model, dev) if pixels else None
    x = generate(model, cfg, args.n, args, d) if pixels else None
    if not d.master:
        return
    torch.manual_seed(cfg.seed)
    # the same SiT at initialisation (train's seed and order): the floor
    init = build(cfg, ckpt).to(dev).eval()
    res = dict(
        step=ckpt["step"],
        data=data,
        proj_coeff=cfg.proj_coeff,
        fd=common.fd_to_train(fd_net, x, data, cfg.image_size) if pixels else None,
        fd_ref=common.fd_to_ref(fd_net, x, args.fd_ref) if pixels else None,
        fd_model=args.fd_model if pixels else "none: decode the latents with their VAE",
        n_samples=args.n if pixels else None,
        sampler=args.sampler or cfg.sampler,
        sample_steps=args.sample_steps or cfg.sample_steps,
        cfg_scale=cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale,
        probe=(
            f"SiT tokens after block {cfg.align_depth}/{cfg.depth} at t={cfg.probe_t}, null "
            f"class, mean-pooled (detail: x_t - t v at signal {common.DETAIL_SIGNAL:.3g})"
        ),
    )
    t = cfg.probe_t
    for suffix, m in (("", model), ("_init", init)):
        f_tr, f_te = at_t(m, s_tr, t, dev), at_t(m, s_te, t, dev)
        res.update(common.probes(f_tr, y_tr, f_te, y_te, suffix))
        # the clean estimate x_t - t v from a third noise (init: v = 0, x_t itself)
        x_hat = None
        if data.startswith("shapes"):
            x_hat = at_t(m, s_te[:1000], t_at_signal(common.DETAIL_SIGNAL), dev, x_hat=True)
        res.update(common.detail(x_hat, data, suffix))

    # the same features at five noise levels, on the first 5,000 / 2,000 rows (the rows of
    # common.probe_data(data, size, 5_000, 2_000))
    def probe(signal):
        t = t_at_signal(signal)
        f_tr, f_te = at_t(model, s_tr[:5000], t, dev), at_t(model, s_te[:2000], t, dev)
        return common.linear_probe(f_tr, y_tr[:5000].to(dev), f_te, y_te[:2000].to(dev))

    by_signal = [[f, round(probe(f), 4)] for f in common.PROBE_SIGNALS]
    res["probe_linear_by_signal"] = by_signal

    def enc(x, first_row):  # the frozen encoder's global token [B, D_enc]
        global_token, _ = encoder(x)
        return global_token

    f_tr, f_te = common.extract(enc, x_tr, dev), common.extract(enc, x_te, dev)
    enc_probes = common.probes(f_tr, y_tr, f_te, y_te)
    res["encoder"] = args.encoder or cfg.encoder
    res.update({f"encoder_{k}": v for k, v in enc_probes.items()})
    res.update(common.pixel_probes(x_tr, y_tr, x_te, y_te, data))  # the floors: pixels
    common.write_eval(args.ckpt, res)


def import_cmd(args):
    """An official state dict (the released last.pt, or a train.py checkpoint's "ema") ->
    OUT/ckpt.pt of this file, for `sample` (latents) and `eval`. Sizes are read from the weights;
    heads and align_depth are not in them."""
    # train.py's checkpoints hold their args
    with torch.serialization.safe_globals([argparse.Namespace]):
        sd = common.load_checkpoint(args.official)
    try:
        sd = sd.get("ema", sd)
        w = sd["x_embedder.proj.weight"]
        n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        cfg = Config(
            latents=True,
            channels=w.shape[1],
            patch=w.shape[2],
            hidden=w.shape[0],
            depth=n,
            heads=args.heads,
            image_size=w.shape[2] * math.isqrt(sd["pos_embed"].shape[1]),
            align_depth=args.align_depth,
            proj_dim=sd["projectors.0.0.weight"].shape[0],
            num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        )
        if cfg.hidden % cfg.heads or cfg.align_depth > n:
            raise UsageError(
                f"--heads must divide the width {cfg.hidden}, --align-depth is at most {n}"
            )
        model = REPA(cfg, sd["projectors.0.4.weight"].shape[0])
        model.net.load_state_dict(sd, strict=True)
    except (AttributeError, KeyError, ValueError, RuntimeError) as e:
        raise UsageError(
            f"{args.official}: not an official REPA SiT state dict ({type(e).__name__}: {e})"
        ) from None
    os.makedirs(args.out, exist_ok=True)
    common.save_checkpoint(
        os.path.join(args.out, "ckpt.pt"), dict(ema=model.state_dict(), step=0, config=asdict(cfg))
    )
    print0(
        f"wrote {args.out}/ckpt.pt: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters"
    )


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    tr, sa, ev = sub.choices["train"], sub.choices["sample"], sub.choices["eval"]
    tr.add_argument(
        "--encoder", help="frozen encoder spec (default: the preset's; see common.load_encoder)"
    )
    tr.add_argument(
        "--proj-coeff",
        type=common.number(float, 0, strict=False),
        help="lambda of the alignment loss (default 0.5; 0 = plain SiT)",
    )
    tr.add_argument(
        "--latents",
        action="store_true",
        default=None,
        help="train on DIR/train_latents.npy [N,C,h,w] (--data DIR; its images feed the encoder)",
    )
    ev.add_argument("--encoder", help="encoder probed beside the SiT (default: the run's)")
    for s in (sa, ev):
        s.add_argument(
            "--sampler",
            choices=SAMPLERS,
            help="Heun or Euler ODE, Euler-Maruyama SDE (default: the run's)",
        )
        s.add_argument(
            "--sample-steps", type=common.number(int), help="sampler steps (default: the run's, 50)"
        )
        s.add_argument(
            "--cfg-scale",
            type=common.number(float, 0, strict=False),
            help="CFG scale (default: the run's)",
        )
        s.add_argument(
            "--cfg-interval",
            type=common.number(float, 0, strict=False),
            nargs=2,
            help="CFG only for lo <= t <= hi (default 0 0.7)",
        )
    im = sub.add_parser(
        "import", help="an official REPA state dict -> OUT/ckpt.pt (for sample, eval)"
    )
    im.add_argument(
        "--official", required=True, help="the released last.pt, or a train.py checkpoint"
    )
    im.add_argument("--out", required=True, type=common.out_dir, help="run folder")
    im.add_argument(
        "--heads", type=common.number(int), default=16, help="attention heads (SiT-XL/2: 16)"
    )
    im.add_argument(
        "--align-depth", type=common.number(int), default=8, help="the aligned block (SiT-XL/2: 8)"
    )
    args = p.parse_args(argv)
    {"train": train, "sample": sample_cmd, "eval": eval_cmd, "import": import_cmd}[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
