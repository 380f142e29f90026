"""Decoupled latent: a representation split into [understanding | shared | detail], then generation.

The repository's own proposal, not a published method. Nearest published relatives: SVG (frozen DINO
features + a learned residual detail encoder) and VA-VAE (a latent aligned to a vision foundation
model).

Claim: understanding (a linear probe of the class) needs the contour, generation needs every detail,
and a joint training does not by itself split a latent's channels into the two. Split by
construction: z_u for understanding alone, z_s for what both share, z_d for the detail only
generation needs, each with the bias that makes the split real, so that a probe can ignore z_d while
a generator still has everything.

Stage 1, the autoencoder (`train`), z = [z_u | z_s | z_d]:

    z_u = h_u(E_u(x)[pool])               a global vector from a ResNet E_u
    [z_s, z_d] = h_sd(E_sd(x)[patches])   per patch token of a ViT E_sd (channel slices)
    L_sem = InfoNCE(g(u1), g(u2); tau)    SimCLR: u_i = z_u of view i, g a projection head
    or  L_sem = -cos(g(z_u), f_enc(x)[cls])           with --encoder SPEC (VA-VAE's alignment)
    keep ~ Bernoulli(1 - drop_d) per image,  x_hat = D(sg(z_u), [z_s, keep z_d])
    L_rec = ||x_hat - (x if keep else lowpass(x))||^2
    L = L_rec + sem_coeff L_sem

So [z_u, z_s] carry the low-pass image and z_d only what the low pass misses; sg (the stop-gradient,
detach_u) keeps the reconstruction from pulling colour and texture into z_u, as SVG keeps its DINO
frozen. The views remove colour, pose and fine texture. --no-decouple is the control: the same
networks undivided (L_sem on the whole latent, z_d never dropped, the full image always the target).

Stage 2 (`train-gen --ae DIR/ckpt.pt`): a DiT over the normalised latent (z_u one extra token, the
patch tokens [z_s, z_d]) with JiT's x-prediction and v-loss, Heun sampling; D decodes.

Commands (python decoupled_latent.py {train,train-gen,sample,eval,export-encoder} -h):

    python decoupled_latent.py train --preset cpu --out runs/dl_cpu              # CPU, < 10 min
    python decoupled_latent.py eval --ckpt runs/dl_cpu/ckpt.pt
    python decoupled_latent.py train --preset cpu --no-decouple --out runs/dl_cpu_ctrl   # control
    python decoupled_latent.py train-gen --preset cpu --ae runs/dl_cpu/ckpt.pt --out runs/dl_gen
    python decoupled_latent.py eval --ckpt runs/dl_gen/ckpt.pt     # the table and the FD of samples
    python decoupled_latent.py train --data cifar10 --out runs/dl --compile   # one GPU
    python decoupled_latent.py export-encoder --ckpt runs/dl/ckpt.pt --out runs/dl/enc.pt

Expected on `shapes` (cpu preset, 2-core CPU, 4.5 min): z_u's linear / kNN probe 0.317 / 0.323
against 0.126 / 0.141 at initialisation and 0.151 / 0.217 for the raw pixels; the undivided
control's same slice 0.151. Reconstruction 25.5 dB with all parts, 20.9 dB with z_d dropped.
eval.json: per part (z_u, z_s, z_d, [z_u, z_s], all) the linear and kNN probes and, on `shapes`,
the R^2 of each generating factor read linearly (`r2`, trained and at initialisation) and by an
MLP (`r2_mlp`, trained); PSNR with all parts and with z_d dropped; the stripes kept (common.detail:
`detail_pattern`, `detail_amplitude`; `_drop_d` without z_d, `_init` at initialisation); FD.
`swap`, the split's own test: the first 1000 test images A decoded with all parts (`all`), without
z_d (`drop_d`), with the z_d of the next image B (`z_d_from_B`) or with B's z_u (`z_u_from_B`); per
decoding its stripes read against A's and B's factors (`pattern_A`, ..., `amplitude_B`), the class a
ridge fitted on real images' z_u reads from its z_u re-encoded (`class_A`, `class_B`) and its PSNR
to A. The split holds where z_d_from_B's stripes follow B (pattern_B > pattern_A) while its class
stays with A (class_A > class_B) and drop_d keeps no stripes; the control's slices mix the two.

A stage-2 run samples with `sample`, or in Python:

    import torch, decoupled_latent as DL
    cfg, ae = DL.load_ae("runs/dl_gen/ckpt.pt", "cpu")  # the autoencoder it carries
    ckpt = torch.load("runs/dl_gen/ckpt.pt", map_location="cpu", weights_only=True)
    gen = DL.LatentGenerator(DL.Config(**ckpt["config"]))
    gen.load_state_dict(ckpt["ema"])
    x = ae.decode(*gen.eval().sample(8))  # [8, 3, H, W] in [-1, 1]
"""

import math
import os
from dataclasses import asdict, dataclass, field, replace

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
    patch: int = 4  # latent tokens: (image_size / patch)^2
    # sizes of z_u, z_s, z_d (z_s, z_d: over all tokens)
    split: list = field(default_factory=lambda: [128, 128, 128])
    # False: the control, one undivided latent with the same losses on all of it
    decouple: bool = True
    u_width: int = 64  # E_u: a ResNet with the CIFAR stem (resnet18: width 64, layers 2 2 2 2)
    u_layers: list = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage of E_u
    enc_dim: int = 256  # E_sd: ViT width (heads = width / 64) and depth
    enc_depth: int = 6
    dec_dim: int = 256  # decoder ViT width
    dec_depth: int = 6
    # frozen encoder to align z_u to (common.load_encoder); "" = SimCLR on two views
    encoder: str = ""
    sem_coeff: float = 1.0  # weight of L_sem
    tau: float = 0.2  # InfoNCE temperature (SimCLR's best at large batch: 0.1 to 0.5; 0.2 measured)
    # SimCLR projection head g: hidden and output widths
    proj: list = field(default_factory=lambda: [256, 128])
    drop_d: float = 0.5  # P(z_d dropped): then the target is the low-pass image
    # the decoder reads z_u but sends it no gradient: only L_sem shapes z_u (as SVG)
    detach_u: bool = True
    lowpass: float = 1.5  # Gaussian sigma of the low-pass target, in pixels of the training image
    # random-resized-crop area of the views
    crop_scale: list = field(default_factory=lambda: [0.35, 1.0])
    jitter: float = 0.6  # colour jitter strength of the views
    # Gaussian blur sigma of the views (pixels)
    blur: list = field(default_factory=lambda: [0.5, 2.0])
    ae: str = ""  # stage 2: the stage-1 checkpoint it generates in (train-gen --ae)
    gen_dim: int = 384  # stage 2: DiT width, depth, heads
    gen_depth: int = 8
    gen_heads: int = 6
    P_mean: float = -0.8  # stage 2: t = sigmoid(N(P_mean, P_std^2)) (JiT)
    P_std: float = 0.8
    t_eps: float = 0.05  # clamp of 1 - t in v = (x - z) / (1 - t)
    sample_steps: int = 50  # Heun steps
    steps: int = 50_000  # optimiser steps of the stage being trained
    batch_size: int = 256  # global batch size
    lr: float = 3e-4  # AdamW peak lr
    warmup: int = 1_000  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay (stage 1; stage 2 uses none)
    ema: float = 0.999  # EMA decay (with warm-up)
    num_classes: int = 10  # filled in from the data (only the probe uses labels)
    log_every: int = 50  # steps between log.jsonl rows
    # steps between grids, drawn when the step is a multiple (stage 1: reconstructions)
    sample_every: int = 5_000
    grid: int = 64  # images in the sample grids (0: none; stage 1: grid / 4 images, 4 rows)
    ckpt_every: int = 2_500  # steps between checkpoints
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(
        data="shapes:1000",
        image_size=16,
        patch=4,
        split=[16, 16, 16],
        u_width=8,
        u_layers=[1, 1],
        proj=[32, 16],
        enc_dim=64,
        enc_depth=1,
        dec_dim=64,
        dec_depth=1,
        gen_dim=64,
        gen_depth=1,
        gen_heads=2,
        sample_steps=4,
        steps=20,
        batch_size=32,
        lr=1e-3,
        warmup=0,
        ema=0.9,
        log_every=1,
        sample_every=10,
        ckpt_every=10,
    ),
    # the claim on `shapes` on a 2-core CPU in under 10 minutes per stage, E_u on SimCLR's measured
    # recipe (width 32, blocks 1 1 1 1, 600 steps at batch 128, lr 2e-3, wd 1e-4). z_d is twice the
    # others: 6 channels a 4x4 patch for the stripes; the views' blur starts at 1 px, which removes
    # them at 16 px (as the low pass does)
    "cpu": dict(
        data="shapes:10000",
        image_size=16,
        patch=4,
        split=[48, 48, 96],
        u_width=32,
        u_layers=[1, 1, 1, 1],
        enc_dim=128,
        enc_depth=3,
        dec_dim=128,
        dec_depth=3,
        blur=[1.0, 2.0],
        gen_dim=128,
        gen_depth=4,
        gen_heads=2,
        sample_steps=20,
        steps=600,
        batch_size=128,
        lr=2e-3,
        weight_decay=1e-4,
        warmup=50,
        ema=0.99,
        sample_every=300,
        ckpt_every=300,
    ),
    # one GPU: CIFAR-10 32x32, 64 tokens, z of 3 x 128
    "default": dict(),
}


# ------------------------------------------------------------------------------ stage 1: the method
def n_tokens(cfg):
    return (cfg.image_size // cfg.patch) ** 2


# (z_u [B, c_u], tokens [B, N, c]) -> the latent as one vector [B, c_u + N c]
def flat(z_u, tokens):
    return torch.cat([z_u, tokens.flatten(1)], 1)


def unflat(z, cfg):  # flat's inverse: [B, c_u + N c] -> (z_u [B, c_u], tokens [B, N, c])
    return z[:, : cfg.split[0]], z[:, cfg.split[0] :].unflatten(1, (n_tokens(cfg), -1))


def mlp(d_in, d_hidden, d_out):  # the heads on z_u: SimCLR's projection g, or the alignment map g
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out)
    )


def views(x, cfg):
    """One augmented view per image, removing what understanding should ignore: pose (random resized
    crop, flip, rotation), colour (jitter, random grayscale, channel shuffle) and fine texture
    (blur). x, out: [B,3,H,W] in [-1, 1]."""
    B, dev = x.shape[0], x.device
    # half-extent of the crop, in half-sides
    s = torch.empty(B, device=dev).uniform_(*cfg.crop_scale).sqrt()
    cx, cy = (torch.rand(2, B, device=dev) * 2 - 1) * (1 - s)
    rot = torch.rand(B, device=dev) * 2 * math.pi
    flip = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.stack(
        [s * rot.cos() * flip, -s * rot.sin(), cx, s * rot.sin() * flip, s * rot.cos(), cy], 1
    )
    theta = theta.view(B, 2, 3)  # output -> input coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, H, W, 2]
    # in [0, 1]
    v = (
        F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False) + 1
    ) / 2

    def jitter():  # a factor per image, uniform in [1 - jitter, 1 + jitter]
        return 1 + (torch.rand(B, 1, 1, 1, device=dev) * 2 - 1) * cfg.jitter

    v = v * jitter()  # brightness
    mean = v.mean((1, 2, 3), keepdim=True)
    v = (v - mean) * jitter() + mean  # contrast
    gray = v.mean(1, keepdim=True)
    # saturation
    v = torch.where(
        torch.rand(B, 1, 1, 1, device=dev) < 0.2, gray.expand_as(v), (v - gray) * jitter() + gray
    )
    # channel shuffle
    v = torch.gather(v, 1, torch.rand(B, 3, device=dev).argsort(1)[:, :, None, None].expand_as(v))
    # bound: a Python float
    v = common.gaussian_blur(v, torch.empty(B, device=dev).uniform_(*cfg.blur), cfg.blur[1])
    return v.clamp(0, 1) * 2 - 1


def info_nce(h1, h2, tau):
    """SimCLR's NT-Xent of the projections of two views [B, d] each: cross-entropy of each of the 2B
    views picking the other view of its image among the other 2B - 1 (the negatives: this process's
    batch)."""
    B = h1.shape[0]
    z = F.normalize(torch.cat([h1, h2]).float(), dim=-1)  # [2B, d]
    sim = (z @ z.T).float() / tau  # [2B, 2B] cosine similarities
    # not itself
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    # [2B]: view i's other view, i + B mod 2B
    positive = torch.arange(2 * B, device=z.device).roll(B)
    return F.cross_entropy(sim, positive)


class DecoupledAE(nn.Module):
    """forward(x) -> (L_rec + sem_coeff L_sem, terms); encode(x) -> (z_u [B, c_u], tokens [B, N,
    c_s/N + c_d/N]); decode(z_u, tokens, keep_d) -> image."""

    def __init__(self, cfg, enc_dim=None):
        super().__init__()
        N, (c_u, c_s, c_d) = n_tokens(cfg), cfg.split
        if c_s % N or c_d % N:
            raise UsageError(f"split {cfg.split}: z_s and z_d must divide over the {N} tokens")
        self.cfg, self.c_s, self.c_d = cfg, c_s // N, c_d // N  # channels per token
        g, D = cfg.image_size // cfg.patch, cfg.enc_dim
        # E_u: the z_u encoder (exported)
        self.enc_u = common.ResNet(cfg.u_width, cfg.u_layers, cifar_stem=True)
        # E_sd: z_s and z_d per token
        self.enc_sd = common.DinoViT(D, cfg.enc_depth, D // 64, cfg.patch, g)
        self.head_u = nn.Linear(self.enc_u.dim, c_u)
        self.head_sd = nn.Linear(D, self.c_s + self.c_d)
        self.decoder = Decoder(cfg)
        sem_dim = c_u if cfg.decouple else c_u + c_s + c_d  # what L_sem acts on
        # one of the two semantic heads (DDP needs every parameter to get a gradient):
        self.proj = None if enc_dim else mlp(sem_dim, *cfg.proj)  # SimCLR's g
        # g: z_u -> the frozen encoder's space
        self.align = mlp(sem_dim, 4 * sem_dim, enc_dim) if enc_dim else None
        self.register_buffer(
            "mean", torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )

    # -> z_u [B, c_u]; ImageNet normalisation, as common.FrozenEncoder (for the export)
    def encode_u(self, x):
        return self.head_u(self.enc_u(((x + 1) / 2 - self.mean) / self.std)[0])

    def encode(self, x):
        # [B, N, c_s/N + c_d/N]
        tokens = self.head_sd(self.enc_sd(((x + 1) / 2 - self.mean) / self.std)[1])
        return self.encode_u(x), tokens

    def parts(self, z_u, tokens):  # -> dict of the flattened parts: z_u, z_s, z_d, z_us, all
        # [B, N*c] each
        z_s, z_d = tokens[..., : self.c_s].flatten(1), tokens[..., self.c_s :].flatten(1)
        return dict(
            z_u=z_u,
            z_s=z_s,
            z_d=z_d,
            z_us=torch.cat([z_u, z_s], 1),
            all=torch.cat([z_u, z_s, z_d], 1),
        )

    def decode(self, z_u, tokens, keep_d=None):
        """keep_d [B] bool: where False, z_d is dropped (set to 0) and the decoder makes the
        low-pass image."""
        if keep_d is not None:
            tokens = torch.cat(
                [tokens[..., : self.c_s], tokens[..., self.c_s :] * keep_d[:, None, None]], -1
            )
        return self.decoder(z_u, tokens)

    def lowpass(self, x):
        return common.gaussian_blur(x, self.cfg.lowpass)

    def forward(self, x, target=None):
        """x [B,3,H,W]; target: the frozen encoder's global token of x [B, D_enc] (alignment), else
        SimCLR."""
        cfg, B = self.cfg, x.shape[0]
        z_u, tokens = self.encode(x)  # [B, c_u], [B, N, c]
        # decoupling bias: z_d dropped for a drop_d share of the images, whose target is then the
        # low pass
        keep = torch.rand(B, device=x.device) >= (cfg.drop_d if cfg.decouple else 0.0)  # [B]
        x_target = torch.where(keep[:, None, None, None], x, self.lowpass(x))
        # sg(z_u): only L_sem shapes z_u
        z_dec = z_u.detach() if cfg.decouple and cfg.detach_u else z_u
        loss_rec = ((self.decode(z_dec, tokens, keep).float() - x_target) ** 2).mean()
        # semantic bias: alignment to the frozen encoder, or SimCLR's InfoNCE between two views
        if self.align is not None:
            u = z_u if cfg.decouple else flat(z_u, tokens)
            loss_sem = -F.cosine_similarity(self.align(u).float(), target.float(), dim=-1).mean()
        else:

            def semantic(v):  # z_u, or all of z (the control)
                return self.encode_u(v) if cfg.decouple else flat(*self.encode(v))

            u1, u2 = semantic(views(x, cfg)), semantic(views(x, cfg))  # [B, sem_dim] each
            loss_sem = info_nce(self.proj(u1), self.proj(u2), cfg.tau)
        return loss_rec + cfg.sem_coeff * loss_sem, dict(
            loss_rec=loss_rec.detach(), loss_sem=loss_sem.detach()
        )


# ------------------------------------------------------------------------ stage 2: latent generator
class LatentGenerator(nn.Module):
    """Stage 2: forward(z_u, tokens) -> v-loss of x-prediction on the normalised latent, flattened
    to one vector [B, c_u + N c] (JiT Alg. 1); sample(n) -> (z_u, tokens) (Heun, JiT Alg. 2). The
    frozen autoencoder decodes them."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.net = cfg, LatentDiT(cfg)
        # latent statistics (set from the data once)
        self.register_buffer("mu_u", torch.zeros(cfg.split[0]))
        self.register_buffer("sd_u", torch.ones(cfg.split[0]))
        c_tok = (cfg.split[1] + cfg.split[2]) // n_tokens(cfg)
        self.register_buffer("mu_tok", torch.zeros(c_tok))
        self.register_buffer("sd_tok", torch.ones(c_tok))

    @torch.no_grad()
    def set_stats(self, z_u, tokens):
        """Per-channel mean and std of z_u [N, c_u] and of the tokens [N, T, c] (over images and
        tokens)."""
        self.mu_u.copy_(z_u.mean(0))
        self.sd_u.copy_(z_u.std(0) + 1e-4)
        self.mu_tok.copy_(tokens.mean((0, 1)))
        self.sd_tok.copy_(tokens.std((0, 1)) + 1e-4)

    def velocity(self, z, t):  # v_pred = (x_pred - z) / max(1 - t, t_eps); z [B, c_u + N c], t [B]
        x_pred = flat(*self.net(*unflat(z, self.cfg), t))  # [B, c_u + N c]
        return (x_pred.float() - z) / (1 - t[:, None]).clamp_min(self.cfg.t_eps)

    def forward(self, z_u, tokens):
        cfg = self.cfg
        # normalised, [B, c_u + N c]
        x = flat((z_u - self.mu_u) / self.sd_u, (tokens - self.mu_tok) / self.sd_tok)
        # logit-normal t [B]
        t = torch.sigmoid(torch.randn(len(x), device=x.device) * cfg.P_std + cfg.P_mean)
        z = t[:, None] * x + (1 - t[:, None]) * torch.randn_like(x)  # z_t = t x + (1 - t) e
        v = (x - z) / (1 - t[:, None]).clamp_min(cfg.t_eps)
        return ((self.velocity(z, t) - v) ** 2).mean()

    @torch.no_grad()
    def sample(self, n, *, steps=None, generator=None, device="cpu"):
        """Heun from t = 0 (noise) to 1 (data), the last step Euler; -> (z_u, tokens),
        denormalised."""
        steps = steps or self.cfg.sample_steps
        # [n, c_u + N c]
        z = torch.randn(n, sum(self.cfg.split), device=device, generator=generator)
        # Python floats: no device tensor read per step
        ts = torch.linspace(0, 1, steps + 1).tolist()
        for i in range(steps):
            t, dt = ts[i], ts[i + 1] - ts[i]
            with common.autocast(torch.device(device)):
                v = self.velocity(z, torch.full((n,), t, device=device))
                if i < steps - 1:  # Heun: the mean of the velocities at both ends of the Euler step
                    v = 0.5 * (
                        v + self.velocity(z + dt * v, torch.full((n,), ts[i + 1], device=device))
                    )
            z = z + dt * v
        z_u, tokens = unflat(z, self.cfg)
        return z_u * self.sd_u + self.mu_u, tokens * self.sd_tok + self.mu_tok


# ----------------------------------------------------------------------------------------- backbone
class Block(nn.Module):
    """Pre-norm transformer block; with cond_dim, adaLN-zero modulation from a vector c (DiT)."""

    def __init__(self, dim, heads, cond_dim=0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not cond_dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not cond_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim)) if cond_dim else None
        if self.ada is not None:  # adaLN-zero: the block starts as the identity
            nn.init.zeros_(self.ada[-1].weight)
            nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x, c=None):
        B, N, D = x.shape
        # 6 x [B, 1, D]
        mods = self.ada(c)[:, None].chunk(6, -1) if self.ada is not None else [0, 0, 1, 0, 0, 1]
        sh1, sc1, g1, sh2, sc2, g2 = mods
        qkv = self.qkv(self.norm1(x) * (1 + sc1) + sh1).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, hd]
        x = x + g1 * self.proj(common.attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


def sincos_1d(n, dim):  # fixed sin-cos embedding of positions 0..n-1 -> [n, dim]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2) / (dim // 2))
    a = torch.outer(torch.arange(n).float(), omega)
    return torch.cat([a.sin(), a.cos()], 1)


class Decoder(nn.Module):
    """D(z_u, tokens [z_s, z_d]) -> image: z_u as a prefix token, the patch tokens, a ViT, a linear
    patch head."""

    def __init__(self, cfg):
        super().__init__()
        c_u, c_tok, D = cfg.split[0], (cfg.split[1] + cfg.split[2]) // n_tokens(cfg), cfg.dec_dim
        self.p, self.g = cfg.patch, cfg.image_size // cfg.patch
        self.embed_u = nn.Linear(c_u, D)
        self.embed_tok = nn.Linear(c_tok, D)
        # [1, 1 + N, D]
        self.register_buffer("pos", sincos_1d(1 + self.g**2, D)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(D, D // 64) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.out = nn.Linear(D, self.p * self.p * 3)

    def forward(self, z_u, tokens):
        # [B, 1 + N, D]
        h = torch.cat([self.embed_u(z_u)[:, None], self.embed_tok(tokens)], 1) + self.pos
        for block in self.blocks:
            h = block(h)
        B, p, g = h.shape[0], self.p, self.g
        # [B, 3, g, p, g, p]
        x = self.out(self.norm(h[:, 1:])).view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, 3, g * p, g * p)


class LatentDiT(nn.Module):
    """x-prediction DiT over the latent: z_u as one token, the N patch tokens; (z_u, tokens, t) ->
    (z_u, tokens)."""

    def __init__(self, cfg):
        super().__init__()
        c_u, c_tok, D = cfg.split[0], (cfg.split[1] + cfg.split[2]) // n_tokens(cfg), cfg.gen_dim
        self.in_u = nn.Linear(c_u, D)
        self.in_tok = nn.Linear(c_tok, D)
        # [1, 1 + N, D]
        self.register_buffer("pos", sincos_1d(1 + n_tokens(cfg), D)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(
            Block(D, cfg.gen_heads, cond_dim=D) for _ in range(cfg.gen_depth)
        )
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.out_u = nn.Linear(D, c_u)
        self.out_tok = nn.Linear(D, c_tok)

    def forward(self, z_u, tokens, t):
        f = torch.exp(-math.log(10000) * torch.arange(128, device=t.device) / 128)
        a = 1000 * t[:, None].float() * f[None]  # [B, 128]
        c = self.t_embed(torch.cat([a.cos(), a.sin()], 1))  # [B, D]
        h = torch.cat([self.in_u(z_u)[:, None], self.in_tok(tokens)], 1) + self.pos  # [B, 1 + N, D]
        for block in self.blocks:
            h = block(h, c)
        h = self.norm(h)
        return self.out_u(h[:, 0]), self.out_tok(h[:, 1:])  # [B, c_u], [B, N, c]


# ------------------------------------------------------------------------------------- train / main
def make_config(args):
    cfg = common.configure(Config, PRESETS, args)
    if cfg.image_size % cfg.patch:
        raise UsageError(f"image size {cfg.image_size} is not divisible by the patch {cfg.patch}")
    if len(cfg.split) != 3 or min(cfg.split) <= 0:
        raise UsageError(f"split {cfg.split}: three positive sizes, z_u z_s z_d")
    if cfg.enc_dim % 64 or cfg.dec_dim % 64 or cfg.gen_dim % cfg.gen_heads:
        raise UsageError("enc_dim and dec_dim must be multiples of 64, gen_dim of gen_heads")
    if cfg.u_width <= 0 or not cfg.u_layers or min(cfg.u_layers) <= 0:
        raise UsageError(f"u_width {cfg.u_width}, u_layers {cfg.u_layers}: positive sizes")
    if not 0 <= cfg.drop_d < 1 or cfg.tau <= 0 or len(cfg.proj) != 2 or min(cfg.proj) <= 0:
        raise UsageError(
            f"drop_d {cfg.drop_d} must be in [0, 1), tau "
            f"{cfg.tau} positive, proj two positive widths"
        )
    return cfg


def fit(args, d, cfg, ckpt, model, weight_decay, data, loss_fn, grid_fn, about, **extra):
    """The loop both stages share: AdamW with lr warm-up, EMA, log, grids, checkpoints (with the
    extra entries). loss_fn(step_model, x) -> (loss, terms to log); grid_fn(EMA model, path) draws a
    grid."""
    ema = common.Ema(model)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=weight_decay
    )
    start = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(
        f"{about}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, step {start} -> {cfg.steps}, "
        f"{d.world} x {d.device}"
    )
    step_model = common.wrap(model, d, args.compile)
    log = common.Log(args.out, d, cfg, start)
    for step in log.steps(start, cfg.steps):
        # linear warm-up, then constant
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        # forward (this rank's batch: rows drawn with replacement, mirrored at random), backward,
        # update, EMA
        x, _ = common.batch(
            *data, cfg.batch_size // d.world, cfg.seed, step, d.rank, flip=True, device=d.device
        )
        loss, terms = loss_fn(step_model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model, min(cfg.ema, (1 + step) / (10 + step)))  # EMA, its decay warmed up
        # log (averaged over the processes; a NaN stops the run), grid, checkpoint
        done = step + 1
        log(done, loss, lr=lr, **terms)
        # the EMA model is frozen: no graph
        if d.master and cfg.grid and done % cfg.sample_every == 0:
            grid_fn(ema.model, os.path.join(args.out, f"samples_{done:07d}.png"))
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt, **extra)


def train(args):
    """Stage 1: the autoencoder with the split latent."""
    d, cfg, ckpt = common.start_run(args, Config, PRESETS, make_config)
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    encoder = common.load_encoder(cfg.encoder, d.device) if cfg.encoder else None
    # the same initial weights on every rank (and in eval's "at initialisation")
    torch.manual_seed(cfg.seed)
    model = DecoupledAE(cfg, encoder.dim if encoder else None).to(d.device)
    # grid images
    x_show = common.to_float(images[common.subset(len(images), max(1, cfg.grid // 4))]).to(d.device)

    def loss_fn(step_model, x):
        with common.autocast(d.device):
            # the frozen encoder's global token of the clean image
            target = encoder(x)[0] if encoder else None
            return step_model(x, target)  # L, terms

    def grid(ae, path):  # rows: image, all parts, z_d dropped, low pass
        z, keep = ae.encode(x_show), torch.zeros(len(x_show), dtype=torch.bool, device=d.device)
        rows = [x_show, ae.decode(*z), ae.decode(*z, keep), ae.lowpass(x_show)]
        common.save_grid(torch.cat(rows), path, nrow=len(x_show))

    fit(
        args,
        d,
        cfg,
        ckpt,
        model,
        cfg.weight_decay,
        (images, labels),
        loss_fn,
        grid,
        f"decoupled AE, z = {cfg.split} "
        f"({'split' if cfg.decouple else 'undivided: the control'}), L_sem: "
        f"{cfg.encoder or 'SimCLR'}, {len(images)} images of {cfg.data}",
    )


def load_ae(path, device, ckpt=None):
    """The autoencoder of a stage-1 checkpoint (its EMA) or the one a stage-2 checkpoint carries ->
    (cfg, frozen model in eval mode)."""
    ckpt = ckpt or common.load_checkpoint(path)
    stage2 = "ae" in ckpt
    cfg = common.config_of(Config, dict(config=ckpt["ae_config"]) if stage2 else ckpt, path)
    try:
        sd = ckpt["ae"] if stage2 else ckpt["ema"]
        model = DecoupledAE(cfg, sd["align.3.weight"].shape[0] if "align.3.weight" in sd else None)
        model.load_state_dict(sd)
    except (KeyError, RuntimeError) as e:
        raise UsageError(
            f"{path} is not a decoupled_latent.py checkpoint ({type(e).__name__})"
        ) from None
    return cfg, model.to(device).eval().requires_grad_(False)


AE_KEYS = (
    "data",
    "image_size",
    "patch",
    "split",
    "decouple",
    "u_width",
    "u_layers",
    "enc_dim",
    "enc_depth",
    # what a stage-2 run takes from its stage-1 autoencoder's config
    "dec_dim",
    "dec_depth",
    "proj",
)


def train_gen(args):
    """Stage 2: the DiT over the frozen autoencoder's normalised latent."""
    ae_cfg, ae = load_ae(args.ae, "cpu")

    def gen_config(args):  # the stage-1 run's data and latent, this run's schedule and generator
        given = common.given(args, Config)
        differ = [k for k in AE_KEYS if given.get(k, getattr(ae_cfg, k)) != getattr(ae_cfg, k)]
        if differ:
            raise UsageError(f"train-gen takes {', '.join(differ)} from its --ae run")
        return replace(make_config(args), **{k: getattr(ae_cfg, k) for k in AE_KEYS})

    d, cfg, ckpt = common.start_run(args, Config, PRESETS, gen_config)
    ae = ae.to(d.device)
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    torch.manual_seed(cfg.seed)
    model = LatentGenerator(cfg).to(d.device)
    if ckpt is None:  # latent statistics, once, on up to 10,000 training images
        model.set_stats(*encode_all(ae, images[common.subset(len(images), 10_000)], d.device))

    def loss_fn(step_model, x):
        z_u, tokens = ae.encode(x)  # [B, c_u], [B, N, c]: the frozen autoencoder (no graph) in fp32
        with common.autocast(d.device):
            return step_model(z_u, tokens), {}

    def grid(gen, path):  # the run's own sampler steps
        # own generator: the training RNG stream is untouched
        g = torch.Generator(d.device).manual_seed(cfg.seed)
        common.save_grid(ae.decode(*gen.sample(cfg.grid, generator=g, device=d.device)), path)

    fit(
        args,
        d,
        cfg,
        ckpt,
        model,
        0.0,
        (images, labels),
        loss_fn,
        grid,
        f"latent DiT on the latent of {args.ae}",
        # the stage-1 autoencoder travels with the generator
        ae=ae.state_dict(),
        ae_config=asdict(ae_cfg),
    )


@torch.no_grad()
def encode_all(ae, images, device):  # uint8 images -> (z_u [N, c_u], tokens [N, T, c])
    return unflat(common.extract(lambda x, i: flat(*ae.encode(x)), images, device), ae.cfg)


def load_any(args):
    """A stage-1 or stage-2 checkpoint -> (dist, ckpt, stage-1 cfg, autoencoder, generator or None);
    with --compile the decoder and the DiT compiled."""
    d = common.setup_dist(args.device)
    ckpt = common.load_checkpoint(args.ckpt)
    cfg, ae = load_ae(args.ckpt, d.device, ckpt)
    gen = None
    if "ae" in ckpt:
        gen = LatentGenerator(common.config_of(Config, ckpt, args.ckpt))
        try:
            gen.load_state_dict(ckpt["ema"])
        except (KeyError, RuntimeError) as e:
            raise UsageError(
                f"{args.ckpt} is not a decoupled_latent.py checkpoint ({type(e).__name__})"
            ) from None
        gen = gen.to(d.device).eval()
    if getattr(args, "compile", False):  # sample / eval --compile (export-encoder has no such flag)
        ae.decoder = torch.compile(ae.decoder)
        if gen is not None:
            gen.net = torch.compile(gen.net)
    return d, ckpt, cfg, ae, gen


def generate(ae, gen, n, args, d):
    """n samples, split over the processes and gathered: [n, 3, H, W] in [-1, 1] (on every rank)."""
    per = math.ceil(n / d.world)
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = [
        ae.decode(
            *gen.sample(
                min(args.batch, per - i), steps=args.sample_steps, generator=g, device=d.device
            )
        )
        for i in tqdm(range(0, per, args.batch), desc="sample", disable=not d.master)
    ]
    return common.gather(torch.cat(xs).clamp(-1, 1), n, d)


def sample_cmd(args):
    d, ckpt, cfg, ae, gen = load_any(args)
    if gen is None:
        raise UsageError(
            f"{args.ckpt} is a stage-1 autoencoder: sample needs a train-gen checkpoint"
        )
    x = generate(ae, gen, args.n, args, d)
    if d.master:
        common.write_samples(args.out, x)


def r2_mlp(f_tr, v_tr, f_te, v_te, hidden=256, steps=300, lr=3e-3, wd=1e-3):
    """R^2 on the test split of a one-hidden-layer MLP regressing all factors at once (standardised
    features and targets, full-batch Adam, seeded start) -> [F]. A stripe's phase varies from image
    to image, so a part that holds the stripes as a waveform is linearly unreadable for frequency
    and angle; this read-out is not."""
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


def factors_of_subset(data, split, n, rows):
    """The `shapes` factors of the first `rows` rows of common.subset(split size, n) [rows, F]."""
    factors = common.shape_factors(data, split)
    return factors[common.subset(len(factors), n)[:rows]]


def table(ae, data, device, n_train=10_000, n_test=5_000, mlp=True):
    """Per part, linear / kNN probe of the class and (on shapes) R^2 per generating factor, on
    probe_data: read linearly (`r2`) and, with mlp, by r2_mlp (`r2_mlp`, most of the time)."""
    x_tr, y_tr, x_te, y_te = common.probe_data(data, ae.cfg.image_size, n_train, n_test)
    p_tr, p_te = [ae.parts(*encode_all(ae, x, device)) for x in (x_tr, x_te)]
    factors = data.startswith("shapes")
    if factors:  # the factors of probe_data's rows: the same subsets
        v_tr, v_te = [
            factors_of_subset(data, split, n, len(x))
            for split, n, x in (("train", n_train, x_tr), ("test", n_test, x_te))
        ]

    def linear(f_tr, v_tr, f_te, v_te):
        return common.r2(common.ridge(f_tr, v_tr)(f_te), v_te)

    readers = dict(r2=linear, r2_mlp=r2_mlp) if mlp else dict(r2=linear)
    out = {}
    for name in p_tr:
        f_tr, f_te = p_tr[name].cpu(), p_te[name].cpu()
        out[name] = dict(dim=f_tr.shape[1], **common.probes(f_tr, y_tr, f_te, y_te))
        if factors:
            for key, fn in readers.items():
                out[name][key] = {
                    k: round(float(r), 4)
                    for k, r in zip(common.FACTORS, fn(f_tr, v_tr, f_te, v_te))
                }
    return out


@torch.no_grad()
def reconstruction(ae, data, device, n=1000):
    """PSNR (dB, images in [-1, 1]) of the full reconstruction and of the one with z_d dropped, each
    on the low-passed and on the high-passed (x - lowpass(x)) image, of the first n images of
    probe_data's test subset. On shapes also the stripes each keeps (common.detail):
    `detail_pattern`, `detail_amplitude` with all parts, the same + `_drop_d` without z_d (None
    elsewhere)."""
    x = common.to_float(common.probe_data(data, ae.cfg.image_size)[2][:n]).to(device)
    z, lo = ae.encode(x), ae.lowpass(x)
    out = {}
    for name, keep in (
        ("all", None),
        ("drop_d", torch.zeros(len(x), dtype=torch.bool, device=device)),
    ):
        r = ae.decode(*z, keep).float().clamp(-1, 1)
        r_lo = ae.lowpass(r)
        out[f"psnr_{name}"] = round(common.psnr(r, x), 3)
        out[f"psnr_{name}_low"] = round(common.psnr(r_lo, lo), 3)
        out[f"psnr_{name}_high"] = round(common.psnr(r - r_lo, x - lo), 3)
        out.update(common.detail(r, data, "" if keep is None else "_drop_d"))
    return out


def swap_z_d(tokens, donor, c_s):
    """Latent tokens [B, N, c] with the z_d slice (channels c_s:) of the donor's [B, N, c]."""
    return torch.cat([tokens[..., :c_s], donor[..., c_s:]], -1)


def fit_classifier(f_tr, y_tr):
    """A least-squares linear classifier: common.ridge from features [N, D] to one-hot labels,
    deterministic -> classify(f [M, D]) -> predicted labels [M]."""
    predict = common.ridge(f_tr.cpu(), F.one_hot(y_tr.cpu().long()).float())

    def classify(f):
        return predict(f.cpu()).argmax(1)

    return classify


@torch.no_grad()
def swap_test(ae, data, device, n=1000):
    """The split's own test. A: the first n images of probe_data's test subset; B: A rolled by one
    (B_i = A_{i+1 mod n}). A decoded four ways: all parts, z_d dropped, B's z_d in A's tokens, B's
    z_u with A's tokens. Per decoding -> {pattern_A, pattern_B, amplitude_A, amplitude_B: the
    stripes (common.detail) read against A's and B's factors (None off shapes); class_A, class_B:
    accuracy against A's and B's labels of a ridge classifier fitted on real train images' z_u,
    applied to the z_u the decoding re-encodes to; psnr_A: PSNR to A}."""
    x_tr, y_tr, x_te, y_te = common.probe_data(data, ae.cfg.image_size)
    classify = fit_classifier(common.extract(lambda x, i: ae.encode_u(x), x_tr, device), y_tr)
    a = common.to_float(x_te[:n]).to(device)
    # B_i = A_{i+1}: row i's donor is row i + 1
    y_a = y_te[:n].cpu()
    y_b = y_a.roll(-1, 0)
    z_u, tokens = ae.encode(a)  # [n, c_u], [n, N, c]
    z_u_b, tokens_b = z_u.roll(-1, 0), tokens.roll(-1, 0)
    drop = torch.zeros(len(a), dtype=torch.bool, device=device)
    decodings = {
        "all": (z_u, tokens, None),
        "drop_d": (z_u, tokens, drop),
        "z_d_from_B": (z_u, swap_z_d(tokens, tokens_b, ae.c_s), None),
        "z_u_from_B": (z_u_b, tokens, None),
    }
    out = {}
    for name, z in decodings.items():
        r = ae.decode(*z).float().clamp(-1, 1)
        # r.roll(1, 0)[j] = r[j - 1], whose donor is A_j: read against row j's factors
        on_a, on_b = common.detail(r, data), common.detail(r.roll(1, 0), data)
        pred = classify(ae.encode_u(r))
        out[name] = dict(
            pattern_A=on_a["detail_pattern"],
            pattern_B=on_b["detail_pattern"],
            amplitude_A=on_a["detail_amplitude"],
            amplitude_B=on_b["detail_amplitude"],
            class_A=round((pred == y_a).float().mean().item(), 4),
            class_B=round((pred == y_b).float().mean().item(), 4),
            psnr_A=round(common.psnr(r, a), 4),
        )
    return out


def eval_cmd(args):
    d, ckpt, cfg, ae, gen = load_any(args)
    data = args.data or cfg.data
    res = dict(
        step=ckpt["step"],
        data=data,
        decouple=cfg.decouple,
        split=cfg.split,
        fd=None,
        fd_model=args.fd_model,
        n_samples=0,
    )
    # every rank samples its share
    x = generate(ae, gen, args.n, args, d) if gen is not None else None
    if not d.master:
        return
    if x is not None:  # FD on rank 0 alone: one Inception pass, one writer of the statistics cache
        fd_net = common.FDFeatures(args.fd_model, d.device)
        res["fd"] = common.fd_to_train(fd_net, x, data, cfg.image_size)
        res["fd_ref"] = common.fd_to_ref(fd_net, x, args.fd_ref)
        res["n_samples"] = args.n
    parts = table(ae, data, d.device)
    torch.manual_seed(cfg.seed)
    init = (
        DecoupledAE(cfg, ae.align[-1].out_features if ae.align is not None else None)
        .to(d.device)
        .eval()
    )
    # the same networks at initialisation: the floor (read linearly: the MLP's five fits would
    # double the eval's time)
    parts_init = table(init, data, d.device, mlp=False)
    rec_init = reconstruction(init, data, d.device)
    res.update(
        probe="z_u (the understanding part of the latent)",
        probe_linear=parts["z_u"]["probe_linear"],
        probe_knn=parts["z_u"]["probe_knn"],
        probe_linear_init=parts_init["z_u"]["probe_linear"],
        probe_knn_init=parts_init["z_u"]["probe_knn"],
        parts=parts,
        parts_init=parts_init,
        **reconstruction(ae, data, d.device),
        # the stripes the networks at initialisation keep: the floor
        detail_pattern_init=rec_init["detail_pattern"],
        detail_amplitude_init=rec_init["detail_amplitude"],
        swap=swap_test(ae, data, d.device),
    )
    # the floors: pixels
    res.update(common.pixel_probes(*common.probe_data(data, cfg.image_size), data))
    common.write_eval(args.ckpt, res)


def export_encoder(args):
    """E_u as a torchvision-layout ResNet state dict: common.load_encoder(PATH) reads it (z_u is a
    linear map of its pooled feature)."""
    d, ckpt, cfg, ae, gen = load_any(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.save_checkpoint(args.out, ae.enc_u.state_dict())
    print0(
        f"wrote {args.out}: ResNet width {cfg.u_width}, "
        f"layers {cfg.u_layers}; use --encoder {args.out}"
    )


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    tr, sa, ev = sub.choices["train"], sub.choices["sample"], sub.choices["eval"]
    tr.add_argument(
        "--no-decouple",
        dest="decouple",
        action="store_false",
        default=None,
        help="the control: one undivided latent, the same losses",
    )
    tr.add_argument(
        "--encoder", help="frozen encoder to align z_u to (default: none, SimCLR on two views)"
    )
    tg = common.train_flags(
        sub.add_parser("train-gen", help="stage 2: a DiT over a stage-1 latent"), PRESETS
    )
    tg.add_argument("--ae", required=True, help="the stage-1 checkpoint (DIR/ckpt.pt of `train`)")
    for s in (sa, ev):
        s.add_argument(
            "--sample-steps", type=common.number(int), help="Heun steps (default: the run's)"
        )
    ev.set_defaults(n=1000)
    ex = sub.add_parser("export-encoder", help="write E_u for common.load_encoder / --encoder PATH")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True, type=common.out_file)
    ex.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    cmds = {
        "train": train,
        "train-gen": train_gen,
        "sample": sample_cmd,
        "eval": eval_cmd,
        "export-encoder": export_encoder,
    }
    cmds[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
