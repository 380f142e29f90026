"""Decoupled latent: a representation split into [understanding | shared | detail], then generation in it.

This is the repository's own question (../shared/seeds): understanding (a linear probe) needs contours, generation
needs every detail, and "a simple joint training doesn't seem to make the model's channels split". The proposal: split
the latent into three parts, "the first for pure understanding, the second for the overlap between generation and
understanding, and the third for the detail information for generation", and inject an inductive bias that makes the
split real, so a probe can ignore the detail part while a generator still has everything it needs. Nearest published
relatives: SVG (frozen DINO features + a learned residual detail encoder) and VA-VAE (a latent aligned to a vision
foundation model). The seeds also note that consistency training looks like SimSiam: two views, one without gradient.

Stage 1, the autoencoder (`train`). z = [z_u | z_s | z_d]:
    z_u = h_u(E_u(x)[pool])                   a global vector, from its own ResNet E_u (what `export-encoder` writes;
                                              a conv net learns the contour from few images far faster than a ViT)
    [z_s, z_d] = h_sd(E_sd(x)[patches])       per patch token of a ViT E_sd; z_s and z_d are channel slices
    semantic bias on z_u:  --encoder SPEC: L_sem = -cos(g(z_u), f_enc(x)[cls])            (alignment, as VA-VAE)
                           otherwise:      L_sem = SimSiam: -1/2 cos(p(u1), sg(u2)) - 1/2 cos(p(u2), sg(u1)),
                           u_i = z_u of view i; views remove what understanding should ignore: colour (jitter,
                           grayscale, channel shuffle), pose (crop, flip, rotation) and fine texture (blur);
                           + var_coeff mean_j relu(1 - std_j(u)) (VICReg's variance hinge): nothing in the
                           reconstruction needs z_u (z_s can carry the low pass), so without it z_u collapses
    z_u is understanding only: the decoder reads sg(z_u) (detach_u), so reconstruction cannot pull colour and texture
                           into it (as SVG keeps its DINO features frozen); z_s and z_d learn around it
    decoupling bias:       keep ~ Bernoulli(1 - drop_d) per image;  x_hat = D(sg(z_u), [z_s, keep z_d])
                           L_rec = || x_hat - (x if keep else lowpass(x)) ||^2
                           so [z_u, z_s] must carry the low-pass image, z_d only what the low-pass misses
    L = L_rec + sem_coeff L_sem
    --no-decouple (the control): the same networks and sizes, undivided: L_sem on the whole latent [z_u, z_s, z_d]
    (pooled), z_d never dropped, the full image always the target.
Stage 2, generation (`train-gen --ae DIR/ckpt.pt`): a DiT over the normalised latent (z_u as one extra token, the
patch tokens [z_s, z_d]) with JiT's x-prediction and v-loss, Heun sampling, then D decodes. Not built: generating z_u
first and the rest conditioned on it (RCG's order); the single DiT models all parts jointly.

`eval` writes the seeds' table: for z_u, z_s, z_d, [z_u, z_s] and the whole latent, the linear / kNN probe of the
class and, on `shapes`, the R^2 for each generating factor (colours, position, scale, rotation, stripes) of a linear
regression (`r2`) and of a one-hidden-layer MLP (`r2_mlp`: a stripe's phase varies, so a part holding the waveform is
linearly unreadable for frequency and angle); reconstruction PSNR with all parts and with z_d dropped, on the
low-passed and on the high-passed image, and the stripes' R^2 read from the spectrum of the reconstructions
(`stripe_r2_decoded`); and with a stage-2 checkpoint the FD of generated samples.

Commands (python decoupled_latent.py {train,train-gen,sample,eval,export-encoder} -h lists every flag):
    CPU smoke, seconds: python decoupled_latent.py train --preset tiny --out runs/dl_tiny --device cpu
    the claim on a CPU: python decoupled_latent.py train --preset cpu --out runs/dl_cpu              # < 10 min
                        python decoupled_latent.py eval --ckpt runs/dl_cpu/ckpt.pt
                        python decoupled_latent.py train --preset cpu --no-decouple --out runs/dl_cpu_ctrl  (control)
    generation:         python decoupled_latent.py train-gen --preset cpu --steps 4000 --ae runs/dl_cpu/ckpt.pt \
                            --out runs/dl_gen                                                    # ~7 min
                        python decoupled_latent.py eval --ckpt runs/dl_gen/ckpt.pt     # the table + FD of samples
    one GPU:            python decoupled_latent.py train --data cifar10 --out runs/dl --compile   (then train-gen)
    frozen encoder:     python decoupled_latent.py export-encoder --ckpt runs/dl/ckpt.pt --out runs/dl/enc.pt
Expected on `shapes` (cpu preset, 2-core CPU, 6.4 min, then eval): z_u's linear probe 0.21 against 0.13 at init, as
high as the whole latent and far above z_d (0.14); reconstruction 26 dB with all parts, 21 dB with z_d dropped; the
control probes 0.18 and reconstructs at 23 dB. The stripes are not reconstructed at that budget (their angle reads
at R^2 0.17 from the reconstructions against 0.68 from the images), so no part holds them readably. The README's
decoupled_latent.py section has the whole table.
"""
import json, math, os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UsageError, print0


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    data: str = "cifar10"           # dataset (common.load_images)
    image_size: int = 32            # images are resized to image_size^2
    patch: int = 4                  # latent tokens: (image_size / patch)^2
    split: list = field(default_factory=lambda: [128, 128, 128])  # sizes of z_u, z_s, z_d (z_s, z_d: over all tokens)
    decouple: bool = True           # False: the control, one undivided latent with the same losses on all of it
    u_width: int = 64               # E_u: a ResNet with the CIFAR stem (resnet18: width 64, layers 2 2 2 2)
    u_layers: list = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage of E_u
    enc_dim: int = 256              # E_sd: ViT width (heads = width / 64) and depth
    enc_depth: int = 6
    dec_dim: int = 256              # decoder ViT width
    dec_depth: int = 6
    encoder: str = ""               # frozen encoder to align z_u to (common.load_encoder); "" = SimSiam invariance
    sem_coeff: float = 1.0          # weight of L_sem
    var_coeff: float = 1.0          # weight of the variance hinge that keeps the SimSiam target from collapsing
    drop_d: float = 0.5             # P(z_d dropped): then the target is the low-pass image
    detach_u: bool = True           # the decoder reads z_u but sends it no gradient: only L_sem shapes z_u (as SVG)
    lowpass: float = 1.5            # Gaussian sigma of the low-pass target, in pixels of the training image
    crop_scale: list = field(default_factory=lambda: [0.35, 1.0])  # random-resized-crop area of the views
    jitter: float = 0.6             # colour jitter strength of the views
    blur: list = field(default_factory=lambda: [0.5, 2.0])  # Gaussian blur sigma of the views (pixels)
    gen_dim: int = 384              # stage 2: DiT width, depth, heads
    gen_depth: int = 8
    gen_heads: int = 6
    P_mean: float = -0.8            # stage 2: t = sigmoid(N(P_mean, P_std^2)) (JiT)
    P_std: float = 0.8
    t_eps: float = 0.05             # clamp of 1 - t in v = (x - z) / (1 - t)
    sample_steps: int = 50          # Heun steps
    steps: int = 50_000             # optimiser steps of the stage being trained
    batch_size: int = 256           # global batch size
    lr: float = 3e-4                # AdamW peak lr
    warmup: int = 1_000             # linear warm-up steps
    weight_decay: float = 0.05
    ema: float = 0.999              # EMA decay (with warm-up)
    num_classes: int = 10           # filled in from the data (only the probe uses labels)
    log_every: int = 50             # steps between log.jsonl rows
    sample_every: int = 5_000       # steps between grids (stage 1: reconstructions; stage 2: samples)
    ckpt_every: int = 2_500         # steps between checkpoints
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(data="shapes:2000", image_size=16, patch=4, split=[16, 16, 16], u_width=8, u_layers=[1, 1],
                 enc_dim=64, enc_depth=1, dec_dim=64, dec_depth=1, gen_dim=64, gen_depth=1, gen_heads=2,
                 sample_steps=4, steps=20, batch_size=32, lr=1e-3, warmup=0, ema=0.9, log_every=1, sample_every=10,
                 ckpt_every=10),
    # the claim on `shapes` on a 2-core CPU in under 10 minutes per stage. z_d is twice the others: 6 channels a
    # 4x4 patch for the stripes; the views' blur starts at 1 px, which removes them at 16 px (as the low pass does)
    "cpu": dict(data="shapes:10000", image_size=16, patch=4, split=[48, 48, 96], u_width=32, u_layers=[1, 1, 1, 1],
                enc_dim=128, enc_depth=3, dec_dim=128, dec_depth=3, blur=[1.0, 2.0], gen_dim=128, gen_depth=4,
                gen_heads=2, sample_steps=20, steps=1200, batch_size=64, lr=1e-3, warmup=100, ema=0.99,
                sample_every=500, ckpt_every=500),
    # one GPU: CIFAR-10 32x32, 64 tokens, z of 3 x 128
    "default": dict(),
}


# -------------------------------------------------------------------------------------------------------- backbone
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-norm transformer block; with cond_dim, adaLN-zero modulation from a vector c (DiT)."""

    def __init__(self, dim, heads, cond_dim=0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not cond_dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not cond_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim)) if cond_dim else None
        if self.ada is not None:  # adaLN-zero: the block starts as the identity
            nn.init.zeros_(self.ada[-1].weight)
            nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x, c=None):
        B, N, D = x.shape
        mods = self.ada(c)[:, None].chunk(6, -1) if self.ada is not None else [0, 0, 1, 0, 0, 1]  # 6 x [B, 1, D]
        sh1, sc1, g1, sh2, sc2, g2 = mods
        qkv = self.qkv(modulate(self.norm1(x), sh1, sc1)).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, hd]
        x = x + g1 * self.proj(common.attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


def sincos_1d(n, dim):
    """Fixed sin-cos embedding of positions 0..n-1 -> [n, dim]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2) / (dim // 2))
    a = torch.outer(torch.arange(n).float(), omega)
    return torch.cat([a.sin(), a.cos()], 1)


def unpatchify(x, p, g):
    """[B, g*g, p*p*3] -> [B, 3, g*p, g*p]."""
    B = x.shape[0]
    x = x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # [B, 3, g, p, g, p]
    return x.reshape(B, 3, g * p, g * p)


class Decoder(nn.Module):
    """D(z_u, tokens [z_s, z_d]) -> image: z_u as a prefix token, the patch tokens, a ViT, a linear patch head."""

    def __init__(self, cfg):
        super().__init__()
        c_u, c_tok, D = cfg.split[0], (cfg.split[1] + cfg.split[2]) // n_tokens(cfg), cfg.dec_dim
        self.p, self.g = cfg.patch, cfg.image_size // cfg.patch
        self.embed_u = nn.Linear(c_u, D)
        self.embed_tok = nn.Linear(c_tok, D)
        self.register_buffer("pos", sincos_1d(1 + self.g ** 2, D)[None], persistent=False)  # [1, 1 + N, D]
        self.blocks = nn.ModuleList(Block(D, D // 64) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.out = nn.Linear(D, self.p * self.p * 3)

    def forward(self, z_u, tokens):
        h = torch.cat([self.embed_u(z_u)[:, None], self.embed_tok(tokens)], 1) + self.pos  # [B, 1 + N, D]
        for block in self.blocks:
            h = block(h)
        return unpatchify(self.out(self.norm(h[:, 1:])), self.p, self.g)


def mlp(d_in, d_hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def n_tokens(cfg):
    return (cfg.image_size // cfg.patch) ** 2


# ------------------------------------------------------------------------------------------------------------ views
def views(x, cfg):
    """One augmented view per image, removing what understanding should ignore: pose (random resized crop, flip,
    rotation), colour (jitter, random grayscale, channel shuffle) and fine texture (blur).
    x, out: [B,3,H,W] in [-1, 1]."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*cfg.crop_scale)
    s = area.sqrt()  # half-extent of the crop, in units of the half-side
    cx, cy = ((torch.rand(2, B, device=dev) * 2 - 1) * (1 - s))
    rot = torch.rand(B, device=dev) * 2 * math.pi
    flip = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)  # [B, 2, 3]: output -> input coordinates
    theta[:, 0, 0], theta[:, 0, 1] = s * rot.cos() * flip, -s * rot.sin()
    theta[:, 1, 0], theta[:, 1, 1] = s * rot.sin() * flip, s * rot.cos()
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, H, W, 2]
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    v = (v + 1) / 2
    f = lambda: 1 + (torch.rand(B, 1, 1, 1, device=dev) * 2 - 1) * cfg.jitter
    v = v * f()  # brightness
    mean = v.mean((1, 2, 3), keepdim=True)
    v = (v - mean) * f() + mean  # contrast
    gray = v.mean(1, keepdim=True)
    v = torch.where(torch.rand(B, 1, 1, 1, device=dev) < 0.2, gray.expand_as(v), (v - gray) * f() + gray)  # saturation
    v = torch.gather(v, 1, torch.rand(B, 3, device=dev).argsort(1)[:, :, None, None].expand_as(v))  # channel shuffle
    v = common.gaussian_blur(v, torch.empty(B, device=dev).uniform_(*cfg.blur), cfg.blur[1])
    return v.clamp(0, 1) * 2 - 1


# ---------------------------------------------------------------------------------------------------------- method
def simsiam(p1, p2, u1, u2):
    """-1/2 cos(p1, sg(u2)) - 1/2 cos(p2, sg(u1)): the gradient reaches each view only through its predictor output."""
    cos = lambda p, u: F.cosine_similarity(p.float(), u.detach().float(), dim=-1).mean()
    return -0.5 * (cos(p1, u2) + cos(p2, u1))


def variance_hinge(u):
    """mean over dimensions of relu(1 - std over the batch) (VICReg): zero once every dimension varies."""
    return F.relu(1 - (u.float().var(0) + 1e-4).sqrt()).mean()


class DecoupledAE(nn.Module):
    """forward(x) -> L_rec + sem_coeff L_sem (stage 1); encode(x) -> (z_u [B, c_u], tokens [B, N, c_s/N + c_d/N]);
    decode(z_u, tokens, keep_d) -> image."""

    def __init__(self, cfg, enc_dim=None):
        super().__init__()
        N, (c_u, c_s, c_d) = n_tokens(cfg), cfg.split
        if c_s % N or c_d % N:
            raise UsageError(f"split {cfg.split}: z_s and z_d must divide over the {N} tokens")
        self.cfg, self.c_s, self.c_d = cfg, c_s // N, c_d // N  # channels per token
        g, D = cfg.image_size // cfg.patch, cfg.enc_dim
        self.enc_u = common.ResNet(cfg.u_width, cfg.u_layers, cifar_stem=True)  # E_u: the z_u encoder (exported)
        self.enc_sd = common.DinoViT(D, cfg.enc_depth, D // 64, cfg.patch, g)  # E_sd: z_s and z_d per token
        self.head_u = nn.Linear(self.enc_u.dim, c_u)
        self.head_sd = nn.Linear(D, self.c_s + self.c_d)
        self.decoder = Decoder(cfg)
        sem_dim = c_u if cfg.decouple else c_u + c_s + c_d  # what L_sem acts on
        # one of the two semantic heads (DDP needs every parameter to get a gradient):
        self.predictor = None if enc_dim else mlp(sem_dim, 4 * sem_dim, sem_dim)  # SimSiam's p
        self.align = mlp(sem_dim, 4 * sem_dim, enc_dim) if enc_dim else None  # g: z_u -> the frozen encoder's space
        self.register_buffer("mean", torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def encode(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std  # ImageNet normalisation, as common.FrozenEncoder (for the export)
        z_u = self.head_u(self.enc_u(x)[0])  # [B, c_u]
        tokens = self.head_sd(self.enc_sd(x)[1])  # [B, N, c_s/N + c_d/N]
        return z_u, tokens

    def parts(self, z_u, tokens):
        """-> dict of the flattened parts: z_u, z_s, z_d, z_us, all."""
        z_s, z_d = tokens[..., :self.c_s].flatten(1), tokens[..., self.c_s:].flatten(1)  # [B, N*c] each
        return dict(z_u=z_u, z_s=z_s, z_d=z_d, z_us=torch.cat([z_u, z_s], 1), all=torch.cat([z_u, z_s, z_d], 1))

    def decode(self, z_u, tokens, keep_d=None):
        """keep_d [B] bool: where False, z_d is dropped (set to 0) and the decoder makes the low-pass image."""
        if keep_d is not None:
            mask = torch.ones_like(tokens)
            mask[..., self.c_s:] = keep_d.to(tokens.dtype)[:, None, None]
            tokens = tokens * mask
        return self.decoder(z_u, tokens)

    def lowpass(self, x):
        return common.gaussian_blur(x, self.cfg.lowpass)

    def sem_vector(self, x):
        """What L_sem acts on: z_u (decoupled) or the whole latent pooled over tokens (the control)."""
        z_u, tokens = self.encode(x)
        return z_u if self.cfg.decouple else torch.cat([z_u, tokens.flatten(1)], 1)

    def forward(self, x, target_tokens=None):
        """target_tokens: the frozen encoder's global token of x [B, D_enc] (alignment), else SimSiam on two views."""
        cfg, B = self.cfg, x.shape[0]
        z_u, tokens = self.encode(x)
        keep = torch.rand(B, device=x.device) >= cfg.drop_d if cfg.decouple else torch.ones(B, dtype=torch.bool,
                                                                                             device=x.device)
        target = torch.where(keep[:, None, None, None], x, self.lowpass(x))
        z_dec = z_u.detach() if cfg.decouple and cfg.detach_u else z_u
        loss_rec = ((self.decode(z_dec, tokens, keep).float() - target) ** 2).mean()
        if self.align is not None:
            u = z_u if cfg.decouple else torch.cat([z_u, tokens.flatten(1)], 1)
            loss_sem = -F.cosine_similarity(self.align(u).float(), target_tokens.float(), dim=-1).mean()
        else:
            u1, u2 = self.sem_vector(views(x, cfg)), self.sem_vector(views(x, cfg))
            loss_sem = simsiam(self.predictor(u1), self.predictor(u2), u1, u2)
            loss_sem = loss_sem + cfg.var_coeff * 0.5 * (variance_hinge(u1) + variance_hinge(u2))
        self.last = dict(loss_rec=loss_rec.detach(), loss_sem=loss_sem.detach())
        return loss_rec + cfg.sem_coeff * loss_sem


# -------------------------------------------------------------------------------------------------- stage 2: DiT
class LatentDiT(nn.Module):
    """x-prediction DiT over the latent: z_u as one token, the N patch tokens; (z_u, tokens, t) -> (z_u, tokens)."""

    def __init__(self, cfg):
        super().__init__()
        c_u, c_tok, D = cfg.split[0], (cfg.split[1] + cfg.split[2]) // n_tokens(cfg), cfg.gen_dim
        self.cfg = cfg
        self.in_u = nn.Linear(c_u, D)
        self.in_tok = nn.Linear(c_tok, D)
        self.register_buffer("pos", sincos_1d(1 + n_tokens(cfg), D)[None], persistent=False)  # [1, 1 + N, D]
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(Block(D, cfg.gen_heads, cond_dim=D) for _ in range(cfg.gen_depth))
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_u = nn.Linear(D, c_u)
        self.out_tok = nn.Linear(D, c_tok)

    def forward(self, z_u, tokens, t):
        f = torch.exp(-math.log(10000) * torch.arange(128, device=t.device) / 128)
        a = 1000 * t[:, None].float() * f[None]
        c = self.t_embed(torch.cat([a.cos(), a.sin()], 1))  # [B, D]
        h = torch.cat([self.in_u(z_u)[:, None], self.in_tok(tokens)], 1) + self.pos  # [B, 1 + N, D]
        for block in self.blocks:
            h = block(h, c)
        h = self.norm(h)
        return self.out_u(h[:, 0]), self.out_tok(h[:, 1:])


class LatentGenerator(nn.Module):
    """Stage 2: forward(z_u, tokens) -> v-loss of x-prediction on the normalised latent (JiT Alg. 1);
    sample(n) -> latents (Heun, JiT Alg. 2). The frozen autoencoder decodes them."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.net = cfg, LatentDiT(cfg)
        self.register_buffer("mu_u", torch.zeros(cfg.split[0]))  # latent statistics (set from the data once)
        self.register_buffer("sd_u", torch.ones(cfg.split[0]))
        c_tok = (cfg.split[1] + cfg.split[2]) // n_tokens(cfg)
        self.register_buffer("mu_tok", torch.zeros(c_tok))
        self.register_buffer("sd_tok", torch.ones(c_tok))

    @torch.no_grad()
    def set_stats(self, z_u, tokens):
        """Per-channel mean and std of z_u [N, c_u] and of the tokens [N, T, c] (over images and tokens)."""
        self.mu_u.copy_(z_u.mean(0))
        self.sd_u.copy_(z_u.std(0) + 1e-4)
        self.mu_tok.copy_(tokens.mean((0, 1)))
        self.sd_tok.copy_(tokens.std((0, 1)) + 1e-4)

    def normalise(self, z_u, tokens):
        return (z_u - self.mu_u) / self.sd_u, (tokens - self.mu_tok) / self.sd_tok

    def denormalise(self, z_u, tokens):
        return z_u * self.sd_u + self.mu_u, tokens * self.sd_tok + self.mu_tok

    def velocity(self, z, t):
        """v_pred = (x_pred - z) / max(1 - t, t_eps) for both parts; z = (z_u, tokens), t [B]."""
        x_pred = self.net(*z, t)
        one_m_t = (1 - t).clamp_min(self.cfg.t_eps)
        return [(xp.float() - zi) / one_m_t.view(-1, *[1] * (zi.dim() - 1)) for xp, zi in zip(x_pred, z)]

    def forward(self, z_u, tokens):
        cfg, B = self.cfg, z_u.shape[0]
        x = self.normalise(z_u, tokens)
        t = torch.sigmoid(torch.randn(B, device=z_u.device) * cfg.P_std + cfg.P_mean)  # logit-normal t
        e = [torch.randn_like(xi) for xi in x]
        tb = [t.view(-1, *[1] * (xi.dim() - 1)) for xi in x]
        z = [ti * xi + (1 - ti) * ei for ti, xi, ei in zip(tb, x, e)]  # z_t = t x + (1 - t) e
        v = [(xi - zi) / (1 - ti).clamp_min(cfg.t_eps) for xi, zi, ti in zip(x, z, tb)]
        v_pred = self.velocity(z, t)
        return sum(((vp - vi) ** 2).sum() for vp, vi in zip(v_pred, v)) / sum(vi.numel() for vi in v)

    @torch.no_grad()
    def sample(self, n, *, steps=None, generator=None, device="cpu"):
        """Heun from t = 0 (noise) to 1 (data), the last step Euler; -> (z_u, tokens), denormalised."""
        cfg = self.cfg
        steps = steps or cfg.sample_steps
        c_tok = (cfg.split[1] + cfg.split[2]) // n_tokens(cfg)
        z = [torch.randn(n, cfg.split[0], device=device, generator=generator),
             torch.randn(n, n_tokens(cfg), c_tok, device=device, generator=generator)]
        ts = torch.linspace(0, 1, steps + 1).tolist()
        for i in range(steps):
            t, t_next = ts[i], ts[i + 1]
            tt = torch.full((n,), t, device=device)
            with common.autocast(torch.device(device)):
                v = self.velocity(z, tt)
                z_e = [zi + (t_next - t) * vi for zi, vi in zip(z, v)]
                if i < steps - 1:  # Heun
                    v2 = self.velocity(z_e, torch.full((n,), t_next, device=device))
                    z_e = [zi + (t_next - t) * 0.5 * (a + b) for zi, a, b in zip(z, v, v2)]
            z = z_e
        return self.denormalise(*z)


# ---------------------------------------------------------------------------------------------------- train / main
def make_config(args):
    cfg = common.configure(Config, PRESETS, args)
    if args.no_decouple:
        cfg.decouple = False
    if cfg.image_size % cfg.patch:
        raise UsageError(f"image size {cfg.image_size} is not divisible by the patch {cfg.patch}")
    if len(cfg.split) != 3 or min(cfg.split) <= 0:
        raise UsageError(f"split {cfg.split}: three positive sizes, z_u z_s z_d")
    if cfg.enc_dim % 64 or cfg.dec_dim % 64 or cfg.gen_dim % cfg.gen_heads:
        raise UsageError("enc_dim and dec_dim must be multiples of 64, gen_dim of gen_heads")
    if cfg.u_width <= 0 or not cfg.u_layers or min(cfg.u_layers) <= 0:
        raise UsageError(f"u_width {cfg.u_width}, u_layers {cfg.u_layers}: positive sizes")
    if not 0 <= cfg.drop_d < 1:
        raise UsageError(f"drop_d {cfg.drop_d} must be in [0, 1)")
    return cfg


def train(args):
    """Stage 1: the autoencoder with the split latent."""
    d, cfg, ckpt = common.start_run(args, Config, make_config)
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    encoder = common.load_encoder(cfg.encoder, d.device) if cfg.encoder else None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (and in eval's "at initialisation")
    model = DecoupledAE(cfg, encoder.dim if encoder else None).to(d.device)
    ema = common.Ema(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(f"decoupled AE {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, z = {cfg.split} "
           f"({'split' if cfg.decouple else 'undivided: the control'}), L_sem: {cfg.encoder or 'SimSiam'}, "
           f"{len(images)} images of {cfg.data}, step {step} -> {cfg.steps}, {d.world} x {d.device}")
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world

    def loss_of(net, step):  # L_rec + sem_coeff L_sem on this rank's batch of `step`
        x, _ = common.batch(images, labels, bs, cfg.seed, step, d.rank, device=d.device)
        target = encoder(x)[0] if encoder else None  # the frozen encoder's global token of the clean image
        with common.autocast(d.device):
            return net(x, target)

    log = common.Log(args.out, d, cfg, step, common.flops_per_image(lambda: loss_of(model, 0), bs, d, model))
    x_show = common.to_float(images[common.subset(len(images), 8)]).to(d.device)  # fixed images for the grids
    for step in log.steps(step, cfg.steps):
        # learning rate: linear warm-up, then constant
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        # forward, backward, update, EMA
        loss = loss_of(step_model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
        # log, reconstruction grid (rows: image, all parts, z_d dropped, the low-pass target), checkpoint
        done = step + 1
        log(done, loss, lr=lr, **model.last)
        if d.master and common.due(done, cfg.sample_every, cfg.steps):
            with torch.no_grad():
                z = ema.model.encode(x_show)
                keep = torch.zeros(len(x_show), dtype=torch.bool, device=d.device)
                rows = [x_show, ema.model.decode(*z), ema.model.decode(*z, keep), ema.model.lowpass(x_show)]
            common.save_grid(torch.cat(rows), os.path.join(args.out, f"samples_{done:07d}.png"))
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt)


def load_ae(path, device, ckpt=None):
    """The autoencoder of a stage-1 checkpoint (its EMA) or the one a stage-2 checkpoint carries -> (cfg, frozen model
    in eval mode)."""
    ckpt = ckpt or common.load_checkpoint(path)
    stage2 = "ae" in ckpt
    cfg = common.config_of(Config, dict(config=ckpt["ae_config"]) if stage2 else ckpt, path)
    sd = ckpt["ae"] if stage2 else ckpt["ema"]
    try:
        model = DecoupledAE(cfg, sd["align.3.weight"].shape[0] if "align.3.weight" in sd else None)
        model.load_state_dict(sd)
    except (KeyError, RuntimeError) as e:
        raise UsageError(f"{path} is not a decoupled_latent.py checkpoint ({type(e).__name__})") from None
    return cfg, model.to(device).eval().requires_grad_(False)


AE_KEYS = ("data", "image_size", "patch", "split", "decouple", "u_width", "u_layers", "enc_dim", "enc_depth", "dec_dim",
           "dec_depth")  # what a stage-2 run takes from its stage-1 autoencoder's config


def train_gen(args):
    """Stage 2: the DiT over the frozen autoencoder's normalised latent."""
    ae_cfg, ae = load_ae(args.ae, "cpu")

    def gen_config(args):  # the stage-1 run's data and latent, this run's schedule and generator
        cfg = make_config(args)
        for k in AE_KEYS:
            setattr(cfg, k, getattr(ae_cfg, k))
        return cfg

    d, cfg, ckpt = common.start_run(args, Config, gen_config)
    ae = ae.to(d.device)
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    torch.manual_seed(cfg.seed)
    model = LatentGenerator(cfg).to(d.device)
    if ckpt is None:  # latent statistics, once, on up to 10,000 training images
        model.set_stats(*encode_all(ae, images[common.subset(len(images), 10_000)], d.device))
    ema = common.Ema(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(f"latent DiT {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on the latent of {args.ae}, "
           f"step {step} -> {cfg.steps}, {d.world} x {d.device}")
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world

    def loss_of(net, step):  # the v-loss on the latents of this rank's batch of `step`
        x, _ = common.batch(images, labels, bs, cfg.seed, step, d.rank, device=d.device)
        with torch.no_grad():
            z_u, tokens = ae.encode(x)
        with common.autocast(d.device):
            return net(z_u.float(), tokens.float())

    log = common.Log(args.out, d, cfg, step, common.flops_per_image(lambda: loss_of(model, 0), bs, d))
    for step in log.steps(step, cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(step_model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, step)
        done = step + 1
        log(done, loss, lr=lr)
        if d.master and common.due(done, cfg.sample_every, cfg.steps):
            g = torch.Generator(d.device).manual_seed(cfg.seed)
            x = ae.decode(*ema.model.sample(64, generator=g, device=d.device))
            common.save_grid(x, os.path.join(args.out, f"samples_{done:07d}.png"))
        if common.due(done, cfg.ckpt_every, cfg.steps):  # the stage-1 autoencoder travels with the generator
            common.save_run(args.out, d, done, cfg, model, ema, opt, ae=ae.state_dict(), ae_config=asdict(ae_cfg))


@torch.no_grad()
def encode_all(ae, images, device):
    """-> (z_u [N, c_u], tokens [N, T, c]) of uint8 images."""
    def flat(x, i):  # one encoder pass -> [b, c_u + T c]
        z_u, tokens = ae.encode(x)
        return torch.cat([z_u, tokens.flatten(1)], 1)
    z = common.extract(flat, images, device)
    c_u = ae.cfg.split[0]
    return z[:, :c_u], z[:, c_u:].view(len(images), n_tokens(ae.cfg), -1)  # [N, c_u], [N, T, c]


def load_any(args):
    """A stage-1 or stage-2 checkpoint -> (dist, ckpt, stage-1 cfg, autoencoder, generator or None)."""
    d = common.setup_dist(args.device)
    ckpt = common.load_checkpoint(args.ckpt)
    cfg, ae = load_ae(args.ckpt, d.device, ckpt)
    if "ae" not in ckpt:
        return d, ckpt, cfg, ae, None
    gen = LatentGenerator(common.config_of(Config, ckpt, args.ckpt))
    try:
        gen.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError) as e:
        raise UsageError(f"{args.ckpt} is not a decoupled_latent.py checkpoint ({type(e).__name__})") from None
    return d, ckpt, cfg, ae, gen.to(d.device).eval()


def generate(ae, gen, n, args, d):
    per = math.ceil(n / d.world)
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = [ae.decode(*gen.sample(min(args.batch, per - i), steps=args.sample_steps, generator=g, device=d.device))
          for i in tqdm(range(0, per, args.batch), desc="sample", disable=not d.master)]
    return common.gather(torch.cat(xs).clamp(-1, 1), n, d)


def sample_cmd(args):
    d, ckpt, cfg, ae, gen = load_any(args)
    if gen is None:
        raise UsageError(f"{args.ckpt} is a stage-1 autoencoder: sample needs a train-gen checkpoint")
    x = generate(ae, gen, args.n, args, d)
    if d.master:
        common.write_samples(args.out, x)


def r2_mlp(f_tr, v_tr, f_te, v_te, hidden=256, steps=300, lr=3e-3, wd=1e-3):
    """R^2 on the test split of a one-hidden-layer MLP regressing all factors at once (standardised features and
    targets, full-batch Adam, seeded start) -> [F]. A stripe's phase varies from image to image, so a part that holds
    the stripes as a waveform is linearly unreadable for frequency and angle; this read-out is not."""
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    vm, vs = v_tr.mean(0), v_tr.std(0) + 1e-6
    a, b, t = (f_tr - mu) / sd, (f_te - mu) / sd, (v_tr - vm) / vs
    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(a.shape[1], hidden), nn.GELU(), nn.Linear(hidden, t.shape[1]))
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=wd)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            ((net(a) - t) ** 2).mean().backward()
            opt.step()
    with torch.no_grad():
        res = ((net(b) * vs + vm - v_te) ** 2).sum(0)
    return 1 - res / ((v_te - v_te.mean(0)) ** 2).sum(0)


def table(ae, data, device, n_train=10_000, n_test=5_000):
    """The seeds' table: per part, linear / kNN probe of the class and (on shapes) R^2 per generating factor."""
    x_tr, y_tr, _ = common.load_images(data, "train", ae.cfg.image_size)
    x_te, y_te, _ = common.load_images(data, "test", ae.cfg.image_size)
    i, j = common.subset(len(x_tr), n_train), common.subset(len(x_te), n_test)
    p_tr, p_te = [ae.parts(*encode_all(ae, x[k], device)) for x, k in ((x_tr, i), (x_te, j))]
    factors = data.startswith("shapes")
    if factors:
        v_tr, v_te = common.shape_factors(data, "train")[i], common.shape_factors(data, "test")[j]
    out = {}
    for name in p_tr:
        f_tr, f_te = p_tr[name].cpu(), p_te[name].cpu()
        out[name] = dict(dim=f_tr.shape[1], **common.probes(f_tr, y_tr[i], f_te, y_te[j]))
        if factors:
            for key, fn in (("r2", common.r2_scores), ("r2_mlp", r2_mlp)):
                out[name][key] = {k: round(float(r), 4) for k, r in zip(common.FACTORS, fn(f_tr, v_tr, f_te, v_te))}
    return out


def spectrum(x):
    """The stripes' phase-free read-out: log power spectrum of the high-passed luminance, [B, 3, H, W] -> [B, H*W]."""
    g = x.float().mean(1, keepdim=True)
    h = g - common.gaussian_blur(g, 1.0)
    return torch.log1p(100 * torch.fft.fft2(h[:, 0]).abs() ** 2).flatten(1)


@torch.no_grad()
def reconstruction(ae, data, device, n=1000):
    """PSNR (dB, images in [-1, 1]) of the full reconstruction and of the one with z_d dropped, each on the
    low-passed and on the high-passed (x - lowpass(x)) image. On shapes also `stripe_r2_decoded`: the stripe factors'
    R^2 of a linear read-out of spectrum(), fitted on the train images, applied to the test images themselves (the
    ceiling), to their reconstruction, and to the one with z_d dropped: what the decoder draws of the stripes."""
    x_te, _, _ = common.load_images(data, "test", ae.cfg.image_size)
    j = common.subset(len(x_te), n)
    x = common.to_float(x_te[j]).to(device)
    z = ae.encode(x)
    lo = ae.lowpass(x)
    psnr = lambda a, b: (10 * torch.log10(4 / ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10))).mean().item()
    out, rec = {}, dict(images=x)
    for name, keep in (("all", None), ("drop_d", torch.zeros(len(x), dtype=torch.bool, device=device))):
        r = rec[name] = ae.decode(*z, keep).float().clamp(-1, 1)
        r_lo = ae.lowpass(r)
        out[f"psnr_{name}"] = round(psnr(r, x), 3)
        out[f"psnr_{name}_low"] = round(psnr(r_lo, lo), 3)
        out[f"psnr_{name}_high"] = round(psnr(r - r_lo, x - lo), 3)
    if data.startswith("shapes"):
        x_tr, _, _ = common.load_images(data, "train", ae.cfg.image_size)
        i = common.subset(len(x_tr), 10_000)
        f_tr = spectrum(common.to_float(x_tr[i]))
        v_tr, v_te = common.shape_factors(data, "train"), common.shape_factors(data, "test")
        cols = [k for k, name in enumerate(common.FACTORS) if "stripe" in name]
        fit = lambda r: common.r2_scores(f_tr, v_tr[i][:, cols], spectrum(r).cpu(), v_te[j][:, cols])  # [4]
        out["stripe_r2_decoded"] = {name: {common.FACTORS[k]: round(float(v), 4) for k, v in zip(cols, fit(r))}
                                    for name, r in rec.items()}
    return out


def eval_cmd(args):
    d, ckpt, cfg, ae, gen = load_any(args)
    data = args.data or cfg.data
    res = dict(step=ckpt["step"], data=data, decouple=cfg.decouple, split=cfg.split, fd=None, fd_model=args.fd_model,
               n_samples=0)
    x = generate(ae, gen, args.n, args, d) if gen is not None else None  # every rank samples its share
    if not d.master:
        return
    if x is not None:  # FD on rank 0 alone: one Inception pass, one writer of the statistics cache
        fd_net = common.FDFeatures(args.fd_model, d.device)
        res.update(fd=common.fd_to_train(fd_net, x, data, cfg.image_size), n_samples=args.n)
    parts = table(ae, data, d.device)
    torch.manual_seed(cfg.seed)
    init = DecoupledAE(cfg, ae.align[-1].out_features if ae.align is not None else None).to(d.device).eval()
    parts_init = table(init, data, d.device)  # the same networks at initialisation: the floor
    stripes = lambda row: round(float(np.mean([v for k, v in row["r2"].items() if "stripe" in k])), 4) \
        if "r2" in row else None  # the mean R^2 of the stripe factors (common.stripe_r2's)
    res.update(probe="z_u (the understanding part of the latent)", probe_linear=parts["z_u"]["probe_linear"],
               probe_knn=parts["z_u"]["probe_knn"], probe_linear_init=parts_init["z_u"]["probe_linear"],
               probe_knn_init=parts_init["z_u"]["probe_knn"], r2_stripes=stripes(parts["z_u"]),
               r2_stripes_init=stripes(parts_init["z_u"]), parts=parts, parts_init=parts_init,
               **reconstruction(ae, data, d.device))
    res.update(common.pixel_probes(*common.probe_data(data, cfg.image_size), data, d.device))  # the floor: pixels
    common.write_eval(args.ckpt, res)
    for name, row in parts.items():
        stripe = {key: np.mean([v for k, v in row[key].items() if "stripe" in k]) for key in ("r2", "r2_mlp")
                  if key in row}
        print0(f"{name:>5} ({row['dim']:4d}-d): linear {row['probe_linear']:.3f} kNN {row['probe_knn']:.3f}" +
               (f"  stripes R^2 linear {stripe['r2']:.3f} MLP {stripe['r2_mlp']:.3f}" if stripe else ""))


def export_encoder(args):
    """E_u as a torchvision-layout ResNet state dict: common.load_encoder(PATH) reads it (z_u is a linear map of its
    pooled feature)."""
    d, ckpt, cfg, ae, gen = load_any(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.save_checkpoint(args.out, ae.enc_u.state_dict())
    print0(f"wrote {args.out}: ResNet width {cfg.u_width}, layers {cfg.u_layers}; use --encoder {args.out}")


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    tr, sa, ev = sub.choices["train"], sub.choices["sample"], sub.choices["eval"]
    tr.add_argument("--no-decouple", action="store_true", help="the control: one undivided latent, the same losses")
    tr.add_argument("--encoder", help="frozen encoder to align z_u to (default: none, SimSiam invariance)")
    tg = common.train_flags(sub.add_parser("train-gen", help="stage 2: a DiT over a stage-1 latent"), PRESETS)
    tg.add_argument("--ae", required=True, help="the stage-1 checkpoint (DIR/ckpt.pt of `train`)")
    tg.set_defaults(no_decouple=False, encoder=None)
    for s in (sa, ev):
        s.add_argument("--sample-steps", type=common.number(int), help="Heun steps (default: the run's)")
    ev.set_defaults(n=1000)
    ex = sub.add_parser("export-encoder", help="write E_u for common.load_encoder / --encoder PATH")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    cmds = {"train": train, "train-gen": train_gen, "sample": sample_cmd, "eval": eval_cmd,
            "export-encoder": export_encoder}
    cmds[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
