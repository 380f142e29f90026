"""RAE: diffusion in the latent space of a frozen representation encoder.

B. Zheng, N. Ma, S. Tong, S. Xie, "Diffusion Transformers with Representation Autoencoders", 2025.

Claim: a frozen self-supervised encoder (DINOv2-B) with a trained ViT decoder is a better
autoencoder for latent diffusion than the SD-VAE: its latent is semantic, it reconstructs well
(rFID 0.57), and a DiT with a shallow, wide head (DiT^DH) trains in this wide latent to FID 1.51 at
ImageNet 256 without guidance.

Stage 1 (`train-decoder`): the encoder E stays frozen; the decoder D (ViT-MAE's) trains on raw z.

    z = LN(E(x))                   patch tokens after the last LayerNorm, without its affine
    x^ = D(z + s n),  s = tau u,  u ~ U(0, 1),  n ~ N(0, I),  tau = 0.8   (training only)
    L = |x^ - x|_1 + lambda_p |z~(x^) - z~(x)|^2                       (L1 on [0, 1] images)
    z~ = (z - mu) / sqrt(var + 1e-5)    per element, mu and var [N, C] of training latents

Stage 2 (`train --decoder DIR/ckpt.pt`): flow matching on z~ (t = 1 is noise).

    x_t = (1 - t) z~ + t e,   v = e - z~,   L = |v_theta(x_t, t, y) - v|^2
    t = shift(min(sigmoid(n), 0.999)),   n ~ N(0, 1)
    shift(t) = a t / (1 + (a - 1) t),   a = sqrt(m / 4096),   m = N C    (the latent's dimension)
    sampler: Euler on dx/dt = v over shift(1 - linspace(0, 0.999, K)), CFG on an interval

DiT^DH: DDT blocks (adaLN-zero, RMSNorm, SwiGLU, 2-D RoPE); the trunk reads x_t with
c = silu(t_emb + y_emb) and gives s = silu(t_emb + trunk) per token; the head (2 blocks, 2048 wide)
reads its own embedding of x_t with adaLN from s, token by token. `--head none` is the plain DiT
with as many more trunk blocks as match the head's parameters: the control for the wide head.

Commands (python rae.py {train-decoder,train,sample,eval} -h lists every flag):

    python rae.py train-decoder --preset cpu --out runs/rae_dec    # the decoder: CPU, < 10 min
    python rae.py eval --ckpt runs/rae_dec/ckpt.pt                 # psnr, rFD, against init
    python rae.py train --preset cpu --decoder runs/rae_dec/ckpt.pt --out runs/rae_gen
    python rae.py eval --ckpt runs/rae_gen/ckpt.pt --n 1000        # and the FD of samples
    python rae.py train-decoder --data cifar10 --out runs/rae_dec --compile       # one GPU
    python rae.py train --decoder runs/rae_dec/ckpt.pt --out runs/rae --compile   # --head none

With cache_latents (the tiny and cpu presets), the frozen encoder's latents of an image set are
written once into the decoder's run folder (latents-HASH.pt, encode()): its second stage and the
evals of both read them there.

The paper's run, `--preset paper` on 8 GPUs (DIR: ImageNet, train/<class>/ and val/<class>/): the
ViT-XL decoder for 16 epochs (official rFID 0.57), then DiT^DH-XL for 1400 epochs: FID 1.51 without
guidance (the README's GPU rerun: 2.16 after 80 epochs), 50,000 samples scored by ADM's evaluator
against VIRTUAL_imagenet256_labeled.npz:

    torchrun --nproc_per_node 8 rae.py train-decoder --preset paper --data DIR --out runs/ae
    torchrun --nproc_per_node 8 rae.py train --preset paper --decoder runs/ae/ckpt.pt --out runs/dit
    torchrun --nproc_per_node 8 rae.py sample --ckpt runs/dit/ckpt.pt --n 50000 --out runs/dit/s.npz

Expected on a CPU (`shapes`, random-vit-s@56: 4 x 4 tokens of 384; 2 cores): train-decoder 7.8
min, psnr 30.1 dB against 10.1 dB at initialisation, rFD 0.028 against 56.9 (pixel features);
stage 2 (1,000 steps, 15 min): DiT^DH v-loss 0.27 and pixel FD 9.3 (1,000 samples), against 0.88
and 10.2 for --head none.

Encoders (--encoder, common.load_encoder): dinov2_vitb14_reg (the paper's), a soda.py or
decoupled_latent.py export, or random-vit-s (offline); @RES sets the input size (224 by default:
16 x 16 tokens). A ResNet encoder's map has no LayerNorm and is taken as it is.

Deliberate differences from the official code (bytetriper/RAE):
- the decoder's L1 + LPIPS + adaptive GAN becomes L1 + the distance of the frozen encoder's latents
  (LPIPS needs downloaded VGG weights; the GAN comes late in the official run);
- a may be < 1 here (small latents; the official code asserts a >= 1);
- `paper` (PRESETS): stage 1's crop, the latent statistics and the EMA's warm-up differ in small
  ways, and the 1.13 of AutoGuidance (a DiT^DH-S guiding the XL) has no sampler here.

The released DiT^DH-XL (ImageNet 256, DINOv2-B; `hf download nyu-visionx/RAE-collections
--local-dir models`) loads with strict=True, the ViT-XL decoder too when its file holds the
module's keys:

    python -c "import rae; rae.from_official('models', 'runs/rae_xl')"     # weights only
    python rae.py sample --ckpt runs/rae_xl/ckpt.pt --n 50000 --out runs/rae_xl/samples.npz
"""

import argparse
import contextlib
import hashlib
import math
import os
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import IMAGENET_MEAN, IMAGENET_STD, UsageError, print0


# ------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    data: str = "cifar10"  # dataset (common.load_images)
    image_size: int = 32  # images are resized to image_size^2
    encoder: str = "dinov2_vitb14_reg"  # frozen encoder (paper: DINOv2-B with registers, 224 px)
    # encode the training set once, into CPU memory (no augmentation); else every step
    cache_latents: bool = False
    # stage 1: the decoder
    dec_dim: int = 512  # ViT decoder width (paper: ViT-XL, 28 x 1152, MLP 4096, at 256 px)
    dec_depth: int = 8  # decoder blocks
    dec_heads: int = 8  # decoder attention heads
    dec_mlp: int = 0  # decoder MLP width; 0: 4 dec_dim
    noise_tau: float = 0.8  # noise augmentation s = tau U(0, 1) on z, training only (paper: 0.8)
    # lambda_p of the encoder-feature perceptual term (paper: LPIPS at weight 1)
    perc_coeff: float = 1.0
    # stage 2: DiT^DH
    decoder: str = ""  # the stage-1 checkpoint (train --decoder)
    hidden: int = 384  # trunk width (DiT^DH-S, the official DiTDH-S; the paper's best: XL, 1152)
    depth: int = 12  # trunk blocks
    heads: int = 6  # trunk attention heads
    head: str = "wide"  # wide (DiT^DH) | none (the plain DiT of about the same size: the control)
    head_dim: int = 2048  # head width (paper: 2048 for every trunk)
    head_depth: int = 2  # head blocks (paper: 2)
    head_heads: int = 16  # head attention heads
    shift: float = 0.0  # a of the time shift; 0: sqrt(m / 4096), m the latent's dimension (paper)
    label_drop: float = 0.1  # labels dropped to the null class, for CFG (paper: 0.1)
    num_classes: int = 10  # filled in from the data
    sample_steps: int = 50  # points of the Euler grid: steps - 1 steps (official: 50)
    cfg_scale: float = 1.0  # CFG scale (1: none; the paper's 1.51 is unguided)
    # CFG where lo <= t <= hi (t = 1 noise; official)
    cfg_interval: list = field(default_factory=lambda: [0.0, 1.0])
    # the schedule of the command that runs (train-decoder: STAGE1 below); fractions of `steps`
    # stand for epochs
    steps: int = 100_000  # optimiser steps
    batch_size: int = 256  # global batch size (paper: stage 2 1024, stage 1 512)
    # AdamW (0.9, 0.95), weight decay 0 (official); fixed at any batch, as the official code (2e-4
    # at batch 1024 in stage 2, 512 in stage 1)
    lr: float = 2e-4
    lr_final: float = 2e-5  # the end of the decay (official: 2e-5, both stages)
    # fraction of steps before the decay (official stage 2: 40 of 1400 epochs)
    warmup: float = 40 / 1400
    # the warm-up rises from 0; else it holds lr (official: stage 1 yes, stage 2 no)
    warmup_from_zero: bool = False
    # linear | cosine, from lr to lr_final (official: stage 2 linear, stage 1 cosine)
    decay: str = "linear"
    # fraction of steps where the decay ends (official stage 2: epoch 800 of 1400)
    decay_end: float = 800 / 1400
    grad_clip: float = 1.0  # 0: none (official: 1 in stage 2, none in stage 1)
    ema: float = 0.9995  # EMA decay (official: 0.9995; stage 1: 0.9978)
    bf16: bool = False  # bf16 autocast for the trained network (official: fp32)
    log_every: int = 50  # steps between log.jsonl rows
    # steps between grids (stage 1: images and reconstructions; stage 2: samples)
    sample_every: int = 5_000
    ckpt_every: int = 2_500  # steps between checkpoints
    grid: int = 64  # images in the sample grids (0: none)
    seed: int = 0  # seed of the weights, batches and draws


PRESETS = {
    "tiny": dict(
        data="shapes:200",
        image_size=16,
        encoder="random-vit-s@28",
        cache_latents=True,
        dec_dim=64,
        dec_depth=1,
        dec_heads=2,
        hidden=64,
        depth=1,
        heads=2,
        head_dim=96,
        head_depth=1,
        head_heads=2,
        sample_steps=4,
        steps=20,
        batch_size=16,
        lr=1e-3,
        lr_final=1e-3,
        ema=0.9,
        log_every=1,
        sample_every=10,
        ckpt_every=10,
        grid=16,
    ),  # seconds, for tests
    # 2-core CPU, < 10 min a stage: 4 x 4 random-ViT tokens of 16 px images, encoded once; a head as
    # wide as a token (384), a trunk not (128): the paper's case; a constant rate after a warm-up;
    # no perceptual term (3 x a step)
    "cpu": dict(
        data="shapes:10000",
        image_size=16,
        encoder="random-vit-s@56",
        cache_latents=True,
        dec_dim=128,
        dec_depth=4,
        dec_heads=4,
        perc_coeff=0.0,
        hidden=128,
        depth=4,
        heads=4,
        head_dim=384,
        head_depth=2,
        head_heads=6,
        sample_steps=20,
        steps=1000,
        batch_size=64,
        lr=5e-4,
        lr_final=5e-4,
        warmup=0.1,
        warmup_from_zero=True,
        ema=0.999,
        sample_every=500,
        ckpt_every=500,
    ),
    # one GPU: CIFAR-10 32 px, DINOv2-B/14 with registers at 224 (16 x 16 x 768), DiT^DH-S
    "default": dict(),
    # RAE (Zheng et al., 2025), the headline run: DiT^DH-XL on the latent of DINOv2-B with registers
    # (224 px input: 16 x 16 x 768) and its ViT-XL decoder, ImageNet 256: FID 1.51 without guidance
    # (abstract; 1.13 with AutoGuidance), rFID 0.57. It mirrors bytetriper/RAE's `torchrun
    # src/train_stage1.py --config configs/stage1/training/DINOv2-B_decXL.yaml --image-size 256
    # --precision fp32` (train-decoder: STAGE1["paper"] below), then `torchrun src/train.py --config
    # configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml --precision fp32` (train), sampled
    # as configs/stage2/sampling/ImageNet256/DiTDHXL-DINOv2-B.yaml: Euler, 50 points, no guidance,
    # fp32. The README says these GPU configs were retuned and score slightly better than reported.
    # Stage 2: 1400 epochs at batch 1024, ceil(1400 x 1,281,167 / 1024) = 1,751,596 steps; AdamW
    # 2e-4 held for 40 epochs, linear to 2e-5 at epoch 800, then held; clip 1; EMA 0.9995; labels
    # dropped at 0.1; fp32; images centre-cropped and mirrored at random, encoded every step.
    # What differs:
    # - stage 1 trains L1 + |z~(x^) - z~(x)|^2 (the frozen encoder's latents), not L1 + LPIPS
    #   (weight 1) + the adaptive GAN (weight 0.75 from epoch 8, a DINO-S/8 discriminator): LPIPS
    #   needs downloaded VGG weights and no GAN is built here. The official 0.57 is the rFID of L1 +
    #   LPIPS + GAN; without them the reconstructions are blurrier and the rFID stands well above it
    #   (not measured here), and the FID of the samples, decoded by this decoder, rises with it;
    # - stage 1's crop: the official resizes the short side to 384 and crops 256 px at random; here
    #   the 256 px centre square (load_images) is resized to 384 and cropped;
    # - mu and sigma of the latent come from 10,000 training images, not the released stat.pt;
    # - the EMA's decay warms up to 0.9995 over its first ~18k steps (official: 0.9995 from step 0);
    # - AutoGuidance (1.13; a DiT^DH-S of 14 epochs guides the XL at 1.42) has no sampler here.
    "paper": dict(
        data="imagenet",
        image_size=256,
        encoder="dinov2_vitb14_reg",
        # 1.28M x 256 x 768 floats would be 1 TB: encoded every step, as the official
        cache_latents=False,
        dec_dim=1152,
        dec_depth=28,
        dec_heads=16,
        dec_mlp=4096,
        noise_tau=0.8,
        # the latent distance, for LPIPS at weight 1 (no GAN)
        perc_coeff=1.0,
        hidden=1152,
        depth=28,
        heads=16,
        head="wide",
        head_dim=2048,
        head_depth=2,
        head_heads=16,
        # a = sqrt(16 x 16 x 768 / 4096) = 6.93
        shift=0.0,
        label_drop=0.1,
        sample_steps=50,
        cfg_scale=1.0,
        cfg_interval=[0.0, 1.0],
        steps=1_751_596,
        batch_size=1024,
        # fixed at any batch, as the official code
        lr=2e-4,
        lr_final=2e-5,
        warmup=40 / 1400,
        warmup_from_zero=False,
        decay="linear",
        decay_end=800 / 1400,
        grad_clip=1.0,
        ema=0.9995,
        bf16=False,
        log_every=100,
        sample_every=10_000,
        # 10 epochs: ceil(10 x 1,281,167 / 1024)
        ckpt_every=12_512,
    ),
}
# official
STAGE1_SCHEDULE = dict(
    warmup=1 / 16, warmup_from_zero=True, decay="cosine", decay_end=1.0, grad_clip=0.0
)
STAGE1 = {  # the decoder's schedule, over the preset (train-decoder)
    "tiny": dict(STAGE1_SCHEDULE),
    "cpu": dict(
        STAGE1_SCHEDULE,
        steps=3000,
        lr=1e-3,
        lr_final=1e-3,
        ema=0.999,
        sample_every=1000,
        ckpt_every=1000,
    ),
    "default": dict(STAGE1_SCHEDULE, steps=50_000, batch_size=256, lr=2e-4, ema=0.9978),
    # the ViT-XL decoder: 16 epochs at batch 512, ceil(16 x 1,281,167 / 512) = 40,037 steps; AdamW
    # 2e-4 (fixed at any batch) from 0 over 1 epoch, cosine to 2e-5 at the end; no clipping; EMA
    # 0.9978; a checkpoint each epoch (2,503 steps)
    "paper": dict(
        STAGE1_SCHEDULE,
        steps=40_037,
        batch_size=512,
        lr=2e-4,
        lr_final=2e-5,
        ema=0.9978,
        log_every=100,
        sample_every=2_500,
        ckpt_every=2_503,
    ),
}
DEC_KEYS = ("data", "image_size", "encoder")  # what stage 2 takes from the stage-1 run
COMMAND_PRESETS = {
    "train-decoder": {k: p | STAGE1[k] for k, p in PRESETS.items()},
    "train": {k: {f: v for f, v in p.items() if f not in DEC_KEYS} for k, p in PRESETS.items()},
}


# ------------------------------------------------------------------------------------------- method
# z = LN(E(x)): patch tokens, the final LayerNorm without affine -> [B, N, C]
def latent(encoder, x, grad=False):
    return encoder(x, affine=False, grad=grad)[1].float()


class RAEDecoder(nn.Module):
    """Stage 1: forward(x, z = LN(E(x)), encoder) -> (L, its terms); decode(z~) -> images; mu, sigma
    [N, C]: z's."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.cfg, self.net = cfg, ViTDecoder(cfg, n_tokens, c)
        self.register_buffer("mu", torch.zeros(n_tokens, c))
        self.register_buffer("sigma", torch.ones(n_tokens, c))

    def set_stats(self, z):  # z [M, N, C]: latents of training images (in CPU memory)
        self.mu.copy_(z.mean(0))
        # official: sqrt(var + eps), eps 1e-5
        self.sigma.copy_((z.var(0, unbiased=False) + 1e-5).sqrt())

    def normalize(self, z):  # z -> z~
        return (z - self.mu) / self.sigma

    def pixels(self, z):
        """Raw latent z [B, N, C] -> image [B, 3, H, W] in [-1, 1] (the net predicts
        ImageNet-normalised pixels)."""
        mean = torch.tensor(IMAGENET_MEAN, device=z.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=z.device).view(3, 1, 1)
        return 2 * (self.net(z).float() * std + mean) - 1

    def decode(self, z):  # z~ -> image
        return self.pixels(z * self.sigma + self.mu)

    def forward(self, x, z, encoder=None):
        """x [B, 3, H, W] in [-1, 1], z [B, N, C] its raw latent (also the perceptual target: x is
        encoded once)."""
        # s = tau u
        s = self.cfg.noise_tau * torch.rand(len(z), 1, 1, device=z.device) if self.training else 0
        # [B, 3, H, W]: noise augmentation s n (official encode())
        x_hat = self.pixels(z + s * torch.randn_like(z))
        loss_l1 = (x_hat - x).abs().mean() / 2  # = |x^ - x|_1 on [0, 1] images (official)
        if self.cfg.perc_coeff == 0 or encoder is None:
            return loss_l1, dict(loss_l1=loss_l1.detach())
        loss_perc = (
            (self.normalize(latent(encoder, x_hat, grad=True)) - self.normalize(z)) ** 2
        ).mean()
        return loss_l1 + self.cfg.perc_coeff * loss_perc, dict(
            loss_l1=loss_l1.detach(), loss_perc=loss_perc.detach()
        )


# t' = a t / (1 + (a - 1) t): a > 1 moves t towards the noise end (t = 1); a = 1: identity
def time_shift(t, a):
    return a * t / (1 + (a - 1) * t)


class RAE(nn.Module):
    """Stage 2. forward(z~ [B, N, C], y [B]) -> the flow-matching loss; sample(y) -> z~ (the decoder
    decodes it)."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.cfg, self.net, self.shape = cfg, DiTDH(cfg, n_tokens, c), (n_tokens, c)
        self.a = cfg.shift or math.sqrt(n_tokens * c / 4096)  # a = sqrt(m / 4096)

    def forward(self, z, y):
        cfg, (B, N, C) = self.cfg, z.shape
        # [B, N, C], drawn in the official [B, C, h, w]
        e = torch.randn(B, C, N, device=z.device).transpose(1, 2)
        # N(0, 1) as the official draws it
        n = math.sqrt(2) * torch.erfinv(2 * torch.rand(B, device=z.device) - 1)
        # logit-normal, cut, shifted
        t = time_shift(torch.sigmoid(n).clamp(max=0.999), self.a)[:, None, None]
        # null class for CFG
        y = torch.where(torch.rand(B, device=z.device) < cfg.label_drop, cfg.num_classes, y)
        x_t = (1 - t) * z + t * e
        return ((self.net(x_t, t.flatten(), y).float() - (e - z)) ** 2).mean()

    @torch.no_grad()
    def sample(self, y, *, steps=None, scale=None, interval=None, generator=None):
        """Class labels y [B] -> normalised latents z~ [B, N, C], from noise at t = 1, in true fp32
        (autocast and TF32 off; the official samples in fp32: in bf16 the released model's FID is
        reported at 5.1, not 1.51)."""
        cfg, (N, C) = self.cfg, self.shape
        # official
        x = (
            torch.randn((len(y), C, N), device=y.device, generator=generator)
            .transpose(1, 2)
            .contiguous()
        )
        scale, (lo, hi) = cfg.cfg_scale if scale is None else scale, interval or cfg.cfg_interval
        # the classes, then the null class
        y_cfg = torch.cat([y, torch.full_like(y, cfg.num_classes)])

        def v(x, t):  # v(x, t), with CFG where lo <= t <= hi; t is a float shared by the batch
            tt = torch.full((len(x),), t, device=x.device)
            if scale == 1 or not lo <= t <= hi:
                return self.net(x, tt, y).float()
            v_c, v_u = self.net(torch.cat([x, x]), torch.cat([tt, tt]), y_cfg).float().chunk(2)
            return v_u + scale * (v_c - v_u)

        with common.autocast(y.device, False):
            return sample_euler(v, x, steps or cfg.sample_steps, self.a)


def sample_euler(v, x, steps, a):
    """Euler on dx/dt = v(x, t) from t = 1 (noise) over the official grid shift(1 - linspace(0,
    0.999, steps)): steps - 1 steps; the last ends at t = shift(0.001) (0.007 at a = 6.93), and that
    x is the sample."""
    ts = time_shift(1 - torch.linspace(0, 0.999, steps), a).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * v(x, t0)
    return x


# ----------------------------------------------------------------------------------------- backbone
def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding -> [grid*grid, dim] (MAE's: half the channels for
    columns, then rows)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    out = [torch.outer(p.flatten().double(), omega) for p in (xx, yy)]  # 2 x [N, dim/4]
    return torch.cat(
        [torch.sin(out[0]), torch.cos(out[0]), torch.sin(out[1]), torch.cos(out[1])], 1
    ).float()


class Rope(nn.Module):
    """2-D RoPE (EVA's, DDT.py's): a head's first half of channels turns with the row, the second
    with the column."""

    def __init__(self, head_dim, grid):
        super().__init__()
        f = 1.0 / 10000 ** (
            torch.arange(0, head_dim // 2, 2)[: head_dim // 4].float() / (head_dim // 2)
        )
        # [g, hd/2]: angle per pair
        f = torch.outer(torch.arange(grid) / grid * grid, f).repeat_interleave(2, -1)
        # [N, hd]
        f = torch.cat(
            [f[:, None].expand(grid, grid, -1), f[None].expand(grid, grid, -1)], -1
        ).flatten(0, 1)
        self.register_buffer("freqs_cos", f.cos())  # buffers of the official checkpoints
        self.register_buffer("freqs_sin", f.sin())

    def forward(self, x):  # [B, h, N, hd]
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # the pairs' two halves, [B, h, N, hd/2] each
        return x * self.freqs_cos + torch.stack([-x2, x1], -1).flatten(-2) * self.freqs_sin


# multi-head attention of q, k, v [B, N, D] (RoPE on q and k) -> [B, N, D]
def attend(q, k, v, heads, rope=None):
    B, N, D = q.shape
    q, k, v = (a.view(B, N, heads, D // heads).transpose(1, 2) for a in (q, k, v))  # [B, h, N, hd]
    q, k = (q, k) if rope is None else (rope(q), rope(k))
    return common.attention(q, k, v).transpose(1, 2).reshape(B, N, D)  # [B, h, N, hd] -> [B, N, D]


class Block(nn.Module):
    """DDT's block: RMSNorm, attention with RoPE, SwiGLU, adaLN-zero from c [B, 1, D] (trunk) or [B,
    N, D] (head)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, hidden = heads, int(2 / 3 * int(4.0 * dim))
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        # official names
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.mlp = nn.ModuleDict(dict(w12=nn.Linear(dim, 2 * hidden), w3=nn.Linear(hidden, dim)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):  # x [B, N, D], c [B, 1 or N, D]
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, -1)  # 6 x [B, 1 or N, D]
        q, k, v = self.attn.qkv(self.norm1(x) * (1 + sc1) + sh1).chunk(3, -1)  # 3 x [B, N, D]
        x = x + g1 * self.attn.proj(attend(q, k, v, self.heads, rope))
        a, b = self.mlp.w12(self.norm2(x) * (1 + sc2) + sh2).chunk(2, -1)  # 2 x [B, N, hidden]
        return x + g2 * self.mlp.w3(F.silu(a) * b)  # SwiGLU


# a per-token Linear C -> dim, kept as the official 1 x 1 convolution (its shape)
class PatchEmbed(nn.Module):
    def __init__(self, c, dim):
        super().__init__()
        self.proj = nn.Conv2d(c, dim, 1)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, c))  # as a Linear
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # [B, N, C] -> [B, N, dim]
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


# Gaussian Fourier features of t in [0, 1] (fixed W ~ N(0, 1)) -> MLP
class TimestepEmbedder(nn.Module):
    def __init__(self, dim, n=256):
        super().__init__()
        self.register_buffer("W", torch.randn(n))  # a frozen parameter of the official checkpoints
        self.mlp = nn.Sequential(nn.Linear(2 * n, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # [B] -> [B, dim]
        a = t[:, None].float() * self.W[None] * 2 * math.pi  # [B, n]
        return self.mlp(torch.cat([a.sin(), a.cos()], 1))


class MAELayer(nn.Module):
    """ViT-MAE's pre-LN block (LayerNorm eps 1e-12, exact GELU), with Hugging Face's parameter
    names."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.heads = heads
        qkv = nn.ModuleDict(
            dict(query=nn.Linear(dim, dim), key=nn.Linear(dim, dim), value=nn.Linear(dim, dim))
        )
        self.attention = nn.ModuleDict(
            dict(attention=qkv, output=nn.ModuleDict(dict(dense=nn.Linear(dim, dim))))
        )
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(dim, mlp)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(mlp, dim)))
        self.layernorm_before = nn.LayerNorm(dim, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):  # [B, 1 + N, D]
        a, h = self.attention, self.layernorm_before(x)
        x = x + a.output.dense(
            attend(*(a.attention[n](h) for n in ("query", "key", "value")), self.heads)
        )
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ViTDecoder(nn.Module):
    """decoder.py's GeneralDecoder (its names): tokens [B, N, C] + a class token -> ViT -> q x q
    patches of pixels."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.g = math.isqrt(n_tokens)
        self.q, D, mlp = cfg.image_size // self.g, cfg.dec_dim, cfg.dec_mlp or 4 * cfg.dec_dim
        self.decoder_embed = nn.Linear(c, D)
        # [1, 1 + N, D]: the class token's is 0
        pos = torch.cat([torch.zeros(1, D), sincos_2d(self.g, D)])[None]
        self.register_buffer("decoder_pos_embed", pos)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_layers = nn.ModuleList(
            MAELayer(D, cfg.dec_heads, mlp) for _ in range(cfg.dec_depth)
        )
        self.decoder_norm = nn.LayerNorm(D, eps=1e-12)
        self.decoder_pred = nn.Linear(D, self.q * self.q * 3)

    def forward(self, z):  # [B, N, C] -> [B, 3, H, W]
        B, g, q = z.shape[0], self.g, self.q
        h = (
            torch.cat([self.trainable_cls_token.expand(B, -1, -1), self.decoder_embed(z)], 1)
            + self.decoder_pos_embed
        )
        for layer in self.decoder_layers:
            h = layer(h)  # [B, 1 + N, D]
        # B3gqgq
        x = (
            self.decoder_pred(self.decoder_norm(h))[:, 1:]
            .view(B, g, g, q, q, 3)
            .permute(0, 5, 1, 3, 2, 4)
        )
        return x.reshape(B, 3, g * q, g * q)


class DiTDH(nn.Module):
    """(x_t [B, N, C], t [B], y [B]) -> v [B, N, C]: DDT.py's DiTwDDTHead (its names), or the plain
    DiT (head none)."""

    def __init__(self, cfg, n_tokens, c, depth=None):
        super().__init__()
        D, g, self.cfg = cfg.hidden, math.isqrt(n_tokens), cfg
        self.depth = depth or (cfg.depth if cfg.head == "wide" else plain_depth(cfg, n_tokens, c))
        self.s_embedder = PatchEmbed(c, D)  # the trunk's embedding of x_t
        # [1, N, D]; a frozen parameter in DDT.py
        self.register_buffer("pos_embed", sincos_2d(g, D)[None])
        self.t_embedder = TimestepEmbedder(D)
        # last: null
        self.y_embedder = nn.ModuleDict(dict(embedding_table=nn.Embedding(cfg.num_classes + 1, D)))
        self.enc_feat_rope = Rope(D // cfg.heads, g)
        blocks = [Block(D, cfg.heads) for _ in range(self.depth)]
        Dh = cfg.head_dim if cfg.head == "wide" else D
        if cfg.head == "wide":
            self.x_embedder = PatchEmbed(c, Dh)  # the head's own embedding of x_t
            # s -> the head's width
            self.s_projector = nn.Linear(D, Dh) if D != Dh else nn.Identity()
            self.dec_feat_rope = Rope(Dh // cfg.head_heads, g)
            blocks += [Block(Dh, cfg.head_heads) for _ in range(cfg.head_depth)]
        self.blocks = nn.ModuleList(blocks)  # the trunk's, then the head's
        self.final_layer = nn.ModuleDict(
            dict(
                norm_final=nn.RMSNorm(Dh, eps=1e-6),
                linear=nn.Linear(Dh, c),
                adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(Dh, 2 * Dh)),
            )
        )
        # Linears: PyTorch's init (official)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            # adaLN-zero, zero out
            self.final_layer.linear,
        ]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y):
        t_emb = self.t_embedder(t)[:, None]  # [B, 1, D]
        # [B, 1, D]: the trunk's condition, per image
        c = F.silu(t_emb + self.y_embedder.embedding_table(y)[:, None])
        h = self.s_embedder(x) + self.pos_embed  # [B, N, D]
        for block in self.blocks[: self.depth]:
            h = block(h, c, self.enc_feat_rope)  # [B, N, D]
        if self.cfg.head == "wide":
            # [B, N, Dh]: s, the head's condition, per token
            c = self.s_projector(F.silu(t_emb + h))
            h = self.x_embedder(x)  # [B, N, Dh], no positions: RoPE
            for block in self.blocks[self.depth :]:
                h = block(h, c, self.dec_feat_rope)  # [B, N, Dh]
        # 2 x [B, 1 or N, Dh]: adaLN without a gate
        sh, sc = self.final_layer.adaLN_modulation(c).chunk(2, -1)
        return self.final_layer.linear(self.final_layer.norm_final(h) * (1 + sc) + sh)  # [B, N, C]


def plain_depth(cfg, n_tokens, c):
    """The --head none control's trunk: the wide run's depth + the blocks its head's parameters buy
    (meta device)."""

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        wide = DiTDH(replace(cfg, head="wide"), n_tokens, c)
        plain = DiTDH(replace(cfg, head="none"), n_tokens, c, depth=cfg.depth)
    return cfg.depth + max(1, round((count(wide) - count(plain)) / count(plain.blocks[0])))


# ------------------------------------------------------------------------------------- train / main
def fingerprint(encoder, images, pool):
    """A short hash of the encoder's weights, the images and the pooling: the name of the file that
    caches their latents, so a file never answers for other inputs."""
    h = hashlib.sha1(f"{tuple(images.shape)} {pool}".encode())
    h.update(images.contiguous().numpy().tobytes())
    for v in encoder.state_dict().values():
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def encode(encoder, images, shape, device, desc="latents", pool=False, cache="", write=True):
    """uint8 images [M, 3, H, W] -> their latents z [M, N, C] (shape = (N, C)), or with pool their
    mean over tokens [M, C], in CPU memory, filled chunk by chunk: one tensor of that size, never on
    the device (50,000 x 256 x 768 fp32 is 39 GB).

    cache: a folder (the decoder's run), or "" for none. The latents are read from its
    latents-HASH.pt (fingerprint()) when it is there; else they are encoded and, with write (the
    first process), saved there, so the stages and evals of one decoder encode each image set once.
    """
    path = cache and os.path.join(cache, f"latents-{fingerprint(encoder, images, pool)}.pt")
    if path and os.path.isfile(path):
        print0(f"{desc}: read from {path}")
        return torch.load(path, map_location="cpu", weights_only=True)
    z = torch.empty(len(images), *(shape[1:] if pool else shape))
    for i in tqdm(range(0, len(images), 256), desc=desc, leave=False, disable=len(images) <= 1024):
        zi = latent(encoder, common.to_float(images[i : i + 256].to(device)))
        z[i : i + 256] = (zi.mean(1) if pool else zi).cpu()
    if path and write:
        os.makedirs(cache, exist_ok=True)
        common.save_checkpoint(path, z)
    return z


class Latents:
    """The training set and its latents z = LN(E(x)) [N, C] (`shape`). cache_latents: encoded once
    into CPU memory (no augmentation), or read from `folder` (encode()), a step's rows moved to the
    device; else the frozen encoder runs every step (fp32, official)."""

    def __init__(self, cfg, encoder, d, folder=""):
        # this rank's batch
        self.cfg, self.encoder, self.d, self.bs = cfg, encoder, d, cfg.batch_size // d.world
        self.images, self.labels, cfg.num_classes = common.load_images(
            cfg.data, "train", cfg.image_size
        )
        self.shape = latent(
            encoder, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=d.device)
        ).shape[1:]
        g = math.isqrt(self.shape[0])
        if g * g != self.shape[0] or cfg.image_size % g:
            raise UsageError(
                f"{self.shape[0]} tokens: not a square grid "
                "dividing image_size (see @RES, --image-size)"
            )
        self.cache = None
        if cfg.cache_latents:  # read from, or written to, the decoder's run folder
            self.cache = encode(
                encoder, self.images, self.shape, d.device, cache=folder, write=d.master
            )

    # this rank's rows of `step` from the images or the cache -> (x or z, y)
    def rows(self, source, step, flip):
        return common.batch(
            source,
            self.labels,
            self.bs,
            self.cfg.seed,
            step,
            self.d.rank,
            flip=flip,
            # rows drawn with replacement, a function of (seed, step, rank)
            device=self.d.device,
        )

    def stage1(self, step):
        """-> (x [B, 3, H, W], z [B, N, C]): images and their latents."""
        x = self.rows(self.images, step, flip=False)[0]
        if self.cache is not None:  # the same rows of the cache: the images as they were encoded
            return x, self.rows(self.cache, step, flip=False)[0]
        # official stage 1: no flip; a bicubic resize to 1.5 x the side, a random crop back to it,
        # per image
        S, L = x.shape[-1], x.shape[-1] * 3 // 2
        # resumable
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step * 997 + self.d.rank + 1)
        ij = torch.randint(L - S + 1, (len(x), 2), generator=g).tolist()
        # [B, 3, L, L]
        x = F.interpolate(x, size=(L, L), mode="bicubic", align_corners=False).clamp(-1, 1)
        x = torch.stack([xb[:, i : i + S, j : j + S] for xb, (i, j) in zip(x, ij)])  # [B, 3, S, S]
        return x, latent(self.encoder, x)

    def stage2(self, step):
        """-> (z [B, N, C], y [B])."""
        if self.cache is not None:
            return self.rows(self.cache, step, flip=False)
        x, y = self.rows(self.images, step, flip=True)  # official stage 2: mirrored at random
        return latent(self.encoder, x), y


def lr_at(cfg, step):
    """The official schedule (utils/optim_utils.py), epochs as fractions of the run: warm-up, decay
    to lr_final."""
    w, end = round(cfg.warmup * cfg.steps), round(cfg.decay_end * cfg.steps)
    if step < w:
        return cfg.lr * ((step + 1) / w if cfg.warmup_from_zero else 1.0)
    p = min(1.0, (step - w) / max(end - w, 1))  # the decay's progress
    return cfg.lr + (cfg.lr_final - cfg.lr) * (
        p if cfg.decay == "linear" else (1 - math.cos(math.pi * p)) / 2
    )


def make_config(args, dec_cfg=None):
    """The Config of train-decoder, or of train given its decoder's config (whose DEC_KEYS it
    takes)."""
    cfg = common.configure(Config, COMMAND_PRESETS[args.cmd], args)
    if dec_cfg is not None:
        given = common.given(args, Config)
        if any(given.get(k, getattr(dec_cfg, k)) != getattr(dec_cfg, k) for k in DEC_KEYS):
            raise UsageError(f"train takes {', '.join(DEC_KEYS)} from its --decoder run")
        cfg = replace(cfg, **{k: getattr(dec_cfg, k) for k in DEC_KEYS})
    if cfg.head not in ("wide", "none") or cfg.decay not in ("linear", "cosine"):
        raise UsageError(
            f"head is wide or none, decay linear or cosine (got {cfg.head!r}, {cfg.decay!r})"
        )
    rope_ok = cfg.hidden % (4 * cfg.heads) == 0 and cfg.head_dim % (4 * cfg.head_heads) == 0
    if cfg.dec_dim % cfg.dec_heads or not rope_ok:
        raise UsageError(
            "dec_dim must split into dec_heads; hidden, head_dim into heads of 4 k channels (RoPE)"
        )
    if min(cfg.noise_tau, cfg.perc_coeff, cfg.shift, cfg.warmup, cfg.decay_end, cfg.grid) < 0:
        raise UsageError("noise_tau, perc_coeff, shift, warmup, decay_end and grid must be >= 0")
    return cfg


def fit(args, d, cfg, ckpt, model, batch, loss, grid, **extra):
    """Both stages' loop. batch(step) -> this rank's batch, a tuple made outside autocast (frozen
    encoders run in fp32); loss(net, *batch) -> (L, its terms); grid(EMA model) -> the images of a
    grid; extra: saved in the checkpoints."""
    ema = common.Ema(model)
    # official
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(
        f"{type(model).__name__}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, step {start}"
    )
    net = common.wrap(model, d, args.compile)
    log = common.Log(args.out, d, cfg, start)
    for step in log.steps(start, cfg.steps):
        # learning rate: the official warm-up, then the decay to lr_final
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        # forward (fp32 as the official, or bf16 autocast), backward, clip (official: stage 2 only),
        # update, EMA
        b = batch(step)
        with common.autocast(d.device) if cfg.bf16 else contextlib.nullcontext():
            loss_value, terms = loss(net, *b)
        opt.zero_grad(set_to_none=True)
        loss_value.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, min(cfg.ema, (1 + step) / (10 + step)))  # EMA, its decay warmed up
        # log (averaged over the processes; a NaN stops the run), sample grid (EMA), checkpoint
        done = step + 1
        log(done, loss_value, lr=lr, **terms)
        if d.master and cfg.grid and done % cfg.sample_every == 0:
            common.save_grid(grid(ema.model), os.path.join(args.out, f"samples_{done:07d}.png"))
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt, **extra)


def train_decoder(args):
    """Stage 1: the ViT decoder on the frozen encoder's raw latent."""
    d, cfg, ckpt = common.start_run(args, Config, COMMAND_PRESETS[args.cmd], make_config)
    # the data before the encoder: a bad --data (or `paper`'s imagenet without one) fails first
    common.load_images(cfg.data, "train", cfg.image_size)
    encoder = common.load_encoder(cfg.encoder, d.device)
    data = Latents(cfg, encoder, d, folder=args.out)  # its latents are cached in the run folder
    # the same initial weights on every rank (and in eval's "at initialisation")
    torch.manual_seed(cfg.seed)
    model = RAEDecoder(cfg, *data.shape).to(d.device)
    if ckpt is None:  # the latent statistics of up to 10,000 uniform training images, once
        rows = common.subset(len(data.images), 10_000)
        if data.cache is None:
            z = encode(encoder, data.images[rows], data.shape, d.device)
        else:
            z = data.cache[rows]
        model.set_stats(z)
    shown = common.subset(len(data.images), cfg.grid // 2)
    x_show = common.to_float(data.images[shown]).to(d.device)

    def grid(ema):  # the images, then their D(z)
        return torch.cat([x_show, ema.pixels(latent(encoder, x_show)).clamp(-1, 1)])

    def loss(net, x, z):
        return net(x, z, encoder)

    fit(args, d, cfg, ckpt, model, data.stage1, loss, grid)


def load_decoder(path, device, ckpt=None):
    """A stage-1 checkpoint (or a stage-2 one, which carries its decoder) -> (its Config, RAEDecoder
    in eval mode)."""
    ckpt = ckpt or common.load_checkpoint(path)
    if "decoder" in ckpt:  # a stage-2 checkpoint
        sd, cfg = ckpt["decoder"], ckpt["decoder_config"]
    else:
        sd, cfg = ckpt.get("ema"), ckpt.get("config")
    try:
        dec = RAEDecoder(Config(**cfg), *sd["mu"].shape)
        dec.load_state_dict(sd)
    except (KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"{path} is not an rae.py checkpoint ({type(e).__name__})") from None
    # frozen: decoding builds no autograd graph
    return dec.cfg, dec.to(device).eval().requires_grad_(False)


def train(args):
    """Stage 2: DiT^DH (or the plain DiT) on the normalised latent of the stage-1 run's encoder."""
    if not (args.resume or args.decoder):
        raise UsageError("train needs --decoder DIR/ckpt.pt (a train-decoder run)")
    dec_cfg, decoder = load_decoder(
        os.path.join(args.out, "ckpt.pt") if args.resume else args.decoder, "cpu"
    )
    d, cfg, ckpt = common.start_run(
        args, Config, COMMAND_PRESETS[args.cmd], lambda a: make_config(a, dec_cfg)
    )
    decoder = decoder.to(d.device)
    encoder = common.load_encoder(cfg.encoder, d.device)
    # the training latents cached in the decoder's run folder (none on a resume without it)
    folder = os.path.dirname(cfg.decoder) if os.path.isfile(cfg.decoder) else ""
    data = Latents(cfg, encoder, d, folder)
    torch.manual_seed(cfg.seed)
    model = RAE(cfg, *decoder.mu.shape).to(d.device)
    print0(
        f"{'DiT^DH' if cfg.head == 'wide' else 'plain DiT'}: "
        f"{model.net.depth} trunk blocks, a = {model.a:.2f}"
    )
    # class-balanced, with the run's sampler
    y_grid = torch.arange(cfg.grid, device=d.device) % cfg.num_classes

    def grid(ema):  # its own generator: the training RNG is untouched
        seeded = torch.Generator(d.device).manual_seed(cfg.seed)
        return decoder.decode(ema.sample(y_grid, generator=seeded)).clamp(-1, 1)

    def loss(net, z, y):  # on z~; no terms to log
        return net(decoder.normalize(z), y), {}

    fit(
        args,
        d,
        cfg,
        ckpt,
        model,
        data.stage2,
        loss,
        grid,
        decoder=decoder.state_dict(),
        decoder_config=asdict(dec_cfg),
    )  # the decoder travels with the generator


OFFICIAL = dict(
    data="imagenet",
    image_size=256,
    dec_dim=1152,
    dec_depth=28,
    dec_heads=16,
    dec_mlp=4096,
    # ViT-XL decoder, DiT^DH-XL, ImageNet 256
    hidden=1152,
    depth=28,
    heads=16,
    num_classes=1000,
)


def from_official(root, out, n_tokens=256, c=768, **sizes):
    """The released RAE in ROOT (hf download nyu-visionx/RAE-collections --local-dir ROOT: the
    ViT-XL decoder, its statistics, DiT^DH-XL's EMA; DINOv2-B with registers) -> OUT/ckpt.pt for
    `sample` and `eval`; strict loads."""
    cfg = replace(Config(), **{**OFFICIAL, **sizes})
    dec, model = RAEDecoder(cfg, n_tokens, c), RAE(cfg, n_tokens, c)
    # weights only (a training file may hold its args)

    def load(path):
        return torch.load(os.path.join(root, path), "cpu", weights_only=True)

    with torch.serialization.safe_globals([argparse.Namespace]):
        dec.net.load_state_dict(load("decoders/dinov2/wReg_base/ViTXL_n08/model.pt"))
        stats = load("stats/dinov2/wReg_base/imagenet1k/stat.pt")  # mean, var [C, h, w] -> [N, C]
        sd = load("DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt")
    dec.mu.copy_(stats["mean"].flatten(1).T)
    dec.sigma.copy_((stats["var"] + 1e-5).sqrt().flatten(1).T)
    model.net.load_state_dict(sd.get("ema", sd))
    os.makedirs(out, exist_ok=True)
    common.save_checkpoint(
        os.path.join(out, "ckpt.pt"),
        dict(
            step=0,
            config=asdict(cfg),
            ema=model.state_dict(),
            decoder=dec.state_dict(),
            decoder_config=asdict(cfg),
        ),
    )


def reconstructions(decoder, z, device):
    """D(z) of latents z [N, T, C], in chunks -> images [N, 3 * H * W] in [-1, 1], on the CPU."""

    def decode(z_chunk, first_row):
        return decoder.pixels(z_chunk).clamp(-1, 1).flatten(1)

    return common.extract(decode, z, device, bs=100, desc="reconstruct").cpu()


def load_any(args):
    """-> (dist, ckpt, the decoder's Config, decoder, the RAE of a stage-2 checkpoint or None); EMA,
    --compile."""

    def build(cfg, ck):  # a stage-2 checkpoint carries its decoder; a stage-1 one is a decoder
        n_tokens, c = ck.get("decoder", ck["ema"])["mu"].shape
        if "decoder" in ck:
            return RAE(cfg, n_tokens, c)
        return RAEDecoder(cfg, n_tokens, c)

    d, ckpt, cfg, model = common.load_run(args, Config, build, compile_net=args.compile)
    if "decoder" not in ckpt:
        return d, ckpt, cfg, model, None
    dec_cfg, decoder = load_decoder(args.ckpt, d.device, ckpt)
    if args.compile:
        decoder.net = torch.compile(decoder.net)
    return d, ckpt, dec_cfg, decoder, model


def generate(decoder, model, n, args, d):
    """n class-balanced samples, split over the processes and gathered: images [n, 3, H, W] in [-1,
    1]."""
    per = math.ceil(n / d.world)
    y = (torch.arange(per) + d.rank * per) % model.cfg.num_classes
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = [
        decoder.decode(
            model.sample(
                yb.to(d.device),
                steps=args.sample_steps,
                scale=args.cfg_scale,
                interval=args.cfg_interval,
                generator=g,
            )
        ).clamp(-1, 1)
        for yb in tqdm(y.split(args.batch), desc="sample", disable=not d.master)
    ]
    return common.gather(torch.cat(xs), n, d)


def sample_cmd(args):
    d, ckpt, dec_cfg, decoder, model = load_any(args)
    if model is None:
        raise UsageError(
            f"{args.ckpt} is a stage-1 decoder: sample needs a `train` (stage 2) checkpoint"
        )
    x = generate(decoder, model, args.n, args, d)
    if d.master:
        common.write_samples(args.out, x)


def eval_cmd(args):
    d, ckpt, dec_cfg, decoder, model = load_any(args)
    data = args.data or dec_cfg.data
    encoder = common.load_encoder(dec_cfg.encoder, d.device)
    res = dict(
        step=ckpt["step"],
        data=data,
        encoder=dec_cfg.encoder,
        fd=None,
        fd_model=args.fd_model,
        n_samples=0,
    )
    fd_net = common.FDFeatures(args.fd_model, d.device)
    if model is not None:  # every process makes its share of the samples
        x = generate(decoder, model, args.n, args, d)
        if d.master:
            res.update(
                head=model.cfg.head,
                fd=common.fd_to_train(fd_net, x, data, dec_cfg.image_size),
                fd_ref=common.fd_to_ref(fd_net, x, args.fd_ref),
                n_samples=args.n,
                sample_steps=args.sample_steps or model.cfg.sample_steps,
            )
    if not d.master:
        return
    # the decoder's reconstructions D(z) of the test images from the frozen encoder's latent,
    # trained and at init
    x_tr, y_tr, x_te, y_te = common.probe_data(data, dec_cfg.image_size)
    # with cache_latents, the latents are cached in the decoder's run folder: a second eval of it
    # encodes nothing (without, nothing is written: 5,000 test latents at 224 px are 3.9 GB)
    stage1 = args.ckpt if model is None else model.cfg.decoder
    cached = dec_cfg.cache_latents and os.path.isfile(stage1)
    folder = os.path.dirname(stage1) if cached else ""
    z_te = encode(encoder, x_te, decoder.mu.shape, d.device, cache=folder)
    x = common.to_float(x_te)
    torch.manual_seed(dec_cfg.seed)
    # train-decoder's initial weights: the floor
    init = RAEDecoder(dec_cfg, *decoder.mu.shape).to(d.device).eval()
    fd_x = fd_net.stats(x)
    for suffix, dec in (("", decoder), ("_init", init)):
        rec = reconstructions(dec, z_te, d.device).view(x.shape)  # [N, 3, H, W]
        res[f"psnr{suffix}"] = round(common.psnr(rec, x), 3)  # dB, of images in [-1, 1]
        res[f"rfd{suffix}"] = round(common.frechet_distance(*fd_net.stats(rec), *fd_x), 4)
        res.update(common.detail(rec[:1000] if data.startswith("shapes") else None, data, suffix))

    # the latent, mean-pooled over tokens [M, C]
    z_tr = encode(encoder, x_tr, decoder.mu.shape, d.device, "latent", pool=True, cache=folder)
    res.update(
        n_rec=len(x),
        probe="the encoder's latent LN(E(x)), mean-pooled",
        **common.probes(z_tr, y_tr, z_te.mean(1), y_te),
    )
    res.update(common.pixel_probes(x_tr, y_tr, x_te, y_te, data))  # the floors: pixels
    common.write_eval(args.ckpt, res)


def parser():
    """The command line: common's train, sample and eval, with this file's flags and
    train-decoder."""
    p, sub = common.make_parser(__doc__, PRESETS)
    tr, sa, ev = sub.choices["train"], sub.choices["sample"], sub.choices["eval"]
    tr.add_argument("--decoder", help="the stage-1 checkpoint (DIR/ckpt.pt of train-decoder)")
    tr.add_argument(
        "--head",
        choices=["wide", "none"],
        help="DiT^DH's wide head, or none: the plain DiT (control)",
    )
    td = common.train_flags(
        sub.add_parser("train-decoder", help="stage 1: the decoder of the frozen encoder"), PRESETS
    )
    td.add_argument(
        "--encoder", help="frozen encoder spec (default: the preset's; see common.load_encoder)"
    )
    for s in (sa, ev):
        s.add_argument(
            "--sample-steps", type=common.number(int), help="Euler grid points (default: the run's)"
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
            help="CFG on [lo, hi]",
        )
    ev.set_defaults(n=1000)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    {"train-decoder": train_decoder, "train": train, "sample": sample_cmd, "eval": eval_cmd}[
        args.cmd
    ](args)


if __name__ == "__main__":
    common.cli(main)
