"""SODA: a bottleneck diffusion model that learns a representation by generating another view.

D. A. Hudson, D. Zoran, M. Malinowski, A. K. Lampinen, A. Jaegle, J. L. McClelland, L. Matthey,
F. Hill, A. Lerchner, "SODA: Bottleneck Diffusion Models for Representation Learning", CVPR 2024
(no official code; the reference is FutureXiang/soda, a public CIFAR reimplementation).

Claim: an encoder that must tell a denoiser, through a compact latent z only, how to generate a
*different* view of the image learns a strong, linearly separable representation.

    z = E(source view),   x_0 = the target view (an independent crop of the same image)
    x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) e,   L = ||e - eps_theta(x_t, t, z)||^2    (Sec. 3)
    abar(t) = (2 (1 + s) / pi) arccos(sqrt(t)) - s      the inverted cosine schedule (Sec. 3.3)
    z = [z_0 .. z_m]: z_i modulates group i of the U-Net as h <- h (1 + z_s) + z_b,
        (z_s, z_b) = Linear(SiLU(z_i)); layer masking drops groups at random        (Sec. 3.2)
    sampling: DDIM from t = 1 to 0,  eps = (1 + w) eps(z) - w eps(no z),  x0 clamped to [-1, 1]

With t uniform, 81% of the samples fall at abar in [0.2, 0.8] (cosine: 41%): training on mid noise,
where a view's structure is decided. Group i is down level i and its mirrored up level; the middle
is group m; dropping every group is the unconditional model that guidance needs.

Commands (python soda.py {train,sample,eval,export-encoder} -h lists every flag):

    python soda.py train --preset cpu --out runs/soda_cpu --device cpu     # shapes: CPU, 8 min
    python soda.py eval --ckpt runs/soda_cpu/ckpt.pt --device cpu
    python soda.py train --data cifar10 --out runs/soda --compile          # one GPU
    torchrun --nproc_per_node 4 soda.py train --preset paper --out runs/soda_paper  # 80.0 / 80.4
    python soda.py sample --ckpt runs/soda/ckpt.pt --n 10000 --out runs/soda/views.npz
    python soda.py eval --ckpt runs/soda/ckpt.pt --n 10000 --fd-model inception
    python soda.py export-encoder --ckpt runs/soda/ckpt.pt --out runs/soda/enc.pt

Expected: the probe on z beats the same encoder at initialisation. FutureXiang/soda reports 80.0%
linear / 80.4% kNN on CIFAR-10 after 800 epochs on 4 GPUs; `--preset paper` is that run (78,125
steps at 512; PRESETS says what differs), whose eval.json figures to set beside them are
probe_linear_l2 and probe_knn_uniform. On `shapes` with the cpu preset (2-core CPU, 8 min): 0.173
linear against 0.124 at initialisation. `sample` and `eval` generate a view of each test image
from its own z. eval.json: `fd` of the views; `psnr`, their fidelity to the source
image (`psnr_crop`: what an independent crop scores, a perfect novel-view model's figure);
`probe_*`, the probes of z (`*_l2` on z / ||z||, `probe_knn_uniform` with 20 equal votes);
`detail_pattern`, `detail_amplitude` (on `shapes`), the stripes kept in x_0 estimated from a
third noise in the image itself, given its own z (a view with the source's crop and no flip: a
generated view is another crop, whose stripes are not the source's); `probe_linear_by_signal`, the
denoiser's own features (the U-Net's middle on x_t, z dropped) from 10% to 90% signal in x_t.

The encoder is the paper's ResNet (common.ResNet) or, with --set encoder=vit, the ViT of common.py;
`export-encoder` writes a file common.load_encoder reads, so a SODA run serves as the frozen encoder
of repa.py, rae.py or rcg.py (--encoder enc.pt). No weights were released.

Deliberate differences from FutureXiang/soda (the paper's choices first):
- the inverted cosine schedule (its CIFAR config: linear betas 1e-4..0.02);
- one sub-vector per group with layer masking (it feeds all of z to every block);
- both FiLMs as h (1 + s) + b, so that a masked sub-vector means no modulation;
- our views (there RandAugment on both views and noise on the source; crops over 0.08-1, as in
  `--preset paper`); t into the sinusoids as 1000 t; eps re-derived from the clamped x0 only with
  recompute_eps (on in `--preset paper`); GroupNorm of 32 groups at the output; zero-initialised
  output convolutions; the EMA's warm-up (1 + n) / (10 + n) (there 1 - (1 + n)^(-2/3)); bf16 (fp16
  there).
"""

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
    encoder: str = "resnet"  # E: "resnet" (the paper's) or "vit"
    res_width: int = 64  # ResNet width and blocks per stage (resnet18: 64, 2 2 2 2), the CIFAR stem
    res_layers: list = field(default_factory=lambda: [2, 2, 2, 2])
    enc_patch: int = 4  # ViT encoder: patch (8x8 tokens at 32 px)
    enc_dim: int = 384  # ViT encoder: width (a multiple of 64: heads = width / 64)
    enc_depth: int = 12  # ViT encoder: blocks (ViT-S)
    z_dim: int = 128  # the compact latent (FutureXiang's), split over the groups: 26 26 26 25 25
    channels: int = 128  # U-Net base width
    # width at 32 .. 4 px (FutureXiang's); groups: 5
    ch_mult: list = field(default_factory=lambda: [1, 2, 2, 2])
    num_res: int = 2  # residual blocks per resolution
    attn_res: list = field(default_factory=lambda: [16])  # resolutions with self-attention
    dropout: float = 0.1  # in each residual block, before its second conv (FutureXiang's 0.1)
    # crop area of the source view (FutureXiang: 0.08)
    source_scale: list = field(default_factory=lambda: [0.2, 1.0])
    # ... and of the independent target view
    target_scale: list = field(default_factory=lambda: [0.2, 1.0])
    jitter: float = 0.4  # colour jitter strength on the source (brightness, contrast, saturation)
    gray: float = 0.2  # P(source made grayscale)
    # Gaussian blur sigma of the source (pixels at 32 px),
    blur: list = field(default_factory=lambda: [0.1, 2.0])
    blur_prob: float = 0.5  # applied with this probability (SimCLR's recipe)
    # layer masking: each group loses its z_i with this probability (FutureXiang: none)
    mask_prob: float = 0.1
    z_drop: float = 0.1  # all of z dropped (the unconditional model for guidance)
    guidance: float = 0.3  # w in (1 + w) eps(z) - w eps(no z)
    # s of the paper's inverted cosine schedule (FutureXiang's CIFAR: linear betas)
    schedule_s: float = 0.008
    sample_steps: int = 100  # DDIM steps
    # DDIM: eps re-derived from the clamped x0 (GLIDE; diffusers' use_clipped_model_output;
    # FutureXiang's). Off: 21% of pixels saturated, FD 15.4 vs 10.1 (README)
    recompute_eps: bool = False
    steps: int = 78_000  # optimiser steps: 800 epochs of CIFAR-10 at 512 (FutureXiang's 800 epochs)
    batch_size: int = 512  # global batch size (FutureXiang's 4 GPUs x 128, with SyncBatchNorm)
    # the U-Net's AdamW (0.9, 0.95) lr: FutureXiang's 1e-4 per process of 128 x 4 processes;
    # --batch-size scales it linearly (lr x batch / the preset's batch), as its world size does
    lr: float = 4e-4
    enc_lr_ratio: float = 2.0  # the encoder's lr / the U-Net's (FutureXiang's lrate_ratio)
    weight_decay: float = 0.05  # AdamW's (FutureXiang's 0.05)
    grad_clip: float = 1.0  # max global gradient norm (FutureXiang's 1)
    warmup: int = 2_000  # linear warm-up steps (about 20 epochs at 512, FutureXiang's warm_epoch)
    ema: float = 0.9999  # EMA decay (with warm-up)
    num_classes: int = 10  # filled in from the data (only the probe uses labels)
    log_every: int = 50  # steps between log.jsonl rows
    sample_every: int = 5_000  # steps between sample grids
    grid: int = 64  # views in the sample grids, each beside its source (0: none)
    ckpt_every: int = 2_500  # steps between checkpoints
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(
        data="shapes:500",
        image_size=16,
        res_width=8,
        res_layers=[1, 1],
        enc_dim=64,
        enc_depth=2,
        z_dim=12,
        channels=16,
        ch_mult=[1, 2],
        num_res=1,
        attn_res=[],
        dropout=0.0,
        sample_steps=5,
        steps=20,
        batch_size=32,
        lr=1e-3,
        warmup=0,
        ema=0.9,
        log_every=1,
        sample_every=10,
        ckpt_every=10,
    ),
    # shapes on a 2-core CPU in under 10 minutes: a ResNet of width 32 and one block per stage
    # (resnet18 is too slow there), z of 48 in 3 groups, the tiny U-Net at 16 px
    "cpu": dict(
        data="shapes:10000",
        image_size=16,
        res_width=32,
        res_layers=[1, 1, 1, 1],
        z_dim=48,
        channels=16,
        ch_mult=[1, 2],
        num_res=1,
        attn_res=[],
        dropout=0.0,
        sample_steps=50,
        steps=4000,
        batch_size=32,
        lr=1e-3,
        warmup=100,
        ema=0.999,
        log_every=50,
        sample_every=500,
        ckpt_every=500,
    ),
    # one GPU: CIFAR-10 32x32, resnet18 encoder (CIFAR stem), z of 128, U-Net of 128 channels
    "default": dict(),
    # FutureXiang/soda's CIFAR-10 run (the paper released no code; its README, Main results:
    # 80.0% linear / 80.4% kNN probe of z after 800 epochs), `python -m torch.distributed.launch
    # --nproc_per_node=4 train.py --config config/cifar10.yaml --use_amp`: resnet18 with the
    # CIFAR stem -> z of 128; the DDPM U-Net 128 x [1, 2, 2, 2], 2 blocks a level, attention at
    # 16 px, dropout 0.1; z dropped for 10% of the rows; batch 4 x 128 = 512; AdamW (0.9, 0.95),
    # weight decay 0.05, lr 4 x 1e-4 for the U-Net and twice that for the encoder, 20 epochs of
    # warm-up then constant, clipping at 1; EMA 0.9999; crops over 0.08-1 with flips on both
    # views; DDIM 100 steps at w = 0.3 with eps re-derived from the clamped x0. 800 epochs:
    # ceil(800 x 50,000 / 512) = 78,125 steps (its loader: 98 a process and epoch, 78,400);
    # 20 epochs: ceil(20 x 50,000 / 512) = 1,954 steps. What differs:
    # - the paper's inverted cosine schedule (s = 0.008) with t uniform in [0, 1]: its config
    #   trains linear betas 1e-4..0.02 over 1,000 steps, which this file cannot express (what
    #   that costs the probe is unmeasured);
    # - the views: RandAugment (p 0.65) on both views and Gaussian noise (0.1 after the
    #   normalisation) on the source there; here the source's colour jitter, grayscale and blur
    #   stand in for them and the target is only cropped and flipped (crops with p 0.95 there);
    # - z reaches the U-Net as 5 sub-vectors, one per group of blocks (all of z in every block
    #   there); layer masking off, as there;
    # - bf16 autocast (fp16 with a GradScaler there); the warm-up linear per step (a staircase
    #   per epoch there); the EMA's decay warms up as (1 + n) / (10 + n), 0.99988 by the end
    #   (ema-pytorch's 1 - (1 + n)^(-2/3) there, 0.99945 by the end);
    # - the probes of eval.json (probe_linear_l2, probe_knn_uniform) on 10,000 / 5,000 images;
    #   the full splits there, its linear probe 15 epochs of Adam on augmented images;
    # - the deliberate differences of the module docstring (FiLMs, t's scale, GroupNorm, inits).
    "paper": dict(
        data="cifar10",
        image_size=32,
        encoder="resnet",
        res_width=64,
        res_layers=[2, 2, 2, 2],
        z_dim=128,
        channels=128,
        ch_mult=[1, 2, 2, 2],
        num_res=2,
        attn_res=[16],
        dropout=0.1,
        source_scale=[0.08, 1.0],
        target_scale=[0.08, 1.0],
        jitter=0.4,
        gray=0.2,
        blur=[0.1, 2.0],
        blur_prob=0.5,
        mask_prob=0.0,
        z_drop=0.1,
        guidance=0.3,
        schedule_s=0.008,
        sample_steps=100,
        recompute_eps=True,
        steps=78_125,
        batch_size=512,
        lr=4e-4,
        enc_lr_ratio=2.0,
        weight_decay=0.05,
        grad_clip=1.0,
        warmup=1_954,
        ema=0.9999,
    ),
}


# ------------------------------------------------------------------------------------------- method
class SODA(nn.Module):
    """forward(x) -> denoising loss of a target view given z of a source view; encode(x) -> z;
    sample(z) -> images."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.encoder == "resnet":
            self.encoder = common.ResNet(cfg.res_width, cfg.res_layers, cifar_stem=True)
        else:
            g = cfg.image_size // cfg.enc_patch
            self.encoder = common.DinoViT(
                cfg.enc_dim, cfg.enc_depth, cfg.enc_dim // 64, cfg.enc_patch, g
            )
        # pooled feature / global token -> z (resnet18's fc)
        self.head = nn.Linear(self.encoder.dim, cfg.z_dim)
        self.net = UNet(cfg)
        self.register_buffer(
            "mean", torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )

    def encode(self, x):
        """[-1, 1] images -> z [B, z_dim]. ImageNet normalisation, as common.FrozenEncoder does for
        the export."""
        return self.head(self.encoder(((x + 1) / 2 - self.mean) / self.std)[0])

    def forward(self, x):
        """x [B,3,H,W] in [-1, 1] -> the loss of eps_theta on a target view, given z of a source
        view (Sec. 3)."""
        cfg, B = self.cfg, x.shape[0]
        source = source_view(x, cfg)  # [B,3,H,W]: crop, flip, colour jitter, grayscale, blur
        target = random_crops(x, cfg.target_scale)  # [B,3,H,W]: x_0, an independent crop
        z = self.encode(source)  # [B, z_dim]
        # [B, G]: layer masking; none kept: unconditional
        layers_kept = torch.rand(B, self.net.groups, device=x.device) >= cfg.mask_prob
        keep = layers_kept & (torch.rand(B, 1, device=x.device) >= cfg.z_drop)
        t = torch.rand(B, device=x.device)
        a = abar(t, cfg.schedule_s).view(B, 1, 1, 1)
        e = torch.randn_like(target)
        x_t = a.sqrt() * target + (1 - a).sqrt() * e  # [B,3,H,W]
        return ((self.net(x_t, t, z, keep.float()).float() - e) ** 2).mean()

    def eps(self, x_t, t, z, w):
        """Guided noise prediction at t (a float): (1 + w) eps(z) - w eps(no z), the two in one
        batch."""
        B, G, dev = x_t.shape[0], self.net.groups, x_t.device
        tt = torch.full((B,), t, device=dev)
        if w == 0:
            return self.net(x_t, tt, z, torch.ones(B, G, device=dev)).float()
        # [2B, G]: z, then no z
        keep = torch.cat([torch.ones(B, G, device=dev), torch.zeros(B, G, device=dev)])
        e = self.net(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([z, z]), keep)
        e_c, e_u = e.float().chunk(2)
        return (1 + w) * e_c - w * e_u

    @torch.no_grad()
    def sample(self, z, *, steps=None, w=None, generator=None):
        """DDIM (eta = 0) from t = 1 to 0 with the inverted cosine schedule, conditioned on z [B,
        z_dim]. The schedule is Python floats, computed once: the loop never waits on the device."""
        cfg = self.cfg
        steps, w = steps or cfg.sample_steps, cfg.guidance if w is None else w
        t = [1 - i / steps for i in range(steps + 1)]
        # abar(t_i), on the CPU, once
        a = abar(torch.tensor(t, dtype=torch.float64), cfg.schedule_s).tolist()
        x = torch.randn(
            (len(z), 3, cfg.image_size, cfg.image_size), device=z.device, generator=generator
        )
        with common.autocast(z.device):
            for i in range(steps):
                e = self.eps(x, t[i], z, w)
                x0 = ((x - math.sqrt(1 - a[i]) * e) / math.sqrt(a[i])).clamp(-1, 1)
                if cfg.recompute_eps:
                    # the noise consistent with the clamped x0
                    e = (x - math.sqrt(a[i]) * x0) / math.sqrt(1 - a[i])
                x = math.sqrt(a[i + 1]) * x0 + math.sqrt(1 - a[i + 1]) * e
        return x0


def abar(t, s):
    """The inverted cosine schedule: abar(t) = (2 (1 + s) / pi) arccos(sqrt(t)) - s, abar(0) = 1,
    clamped near 0."""
    return ((2 * (1 + s) / math.pi) * torch.arccos(t.sqrt()) - s).clamp(1e-4, 1.0)


def random_crops(x, scale):
    """Per-image random resized crops (area in `scale`, aspect in [3/4, 4/3]) with horizontal flips,
    resampled to the input size, on the tensor batch (on the GPU when there is one). x [B,3,H,W] ->
    [B,3,H,W]."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*scale)
    log_r = torch.empty(B, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3))
    # half-extent / 1
    sx, sy = (area * log_r.exp()).sqrt().clamp(max=1), (area / log_r.exp()).sqrt().clamp(max=1)
    cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - sx)
    cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0)
    # [B, 2, 3]: the affine map from output to input coordinates
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [B, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def source_view(x, cfg):
    """The encoder's view: a random resized crop with a flip, colour jitter (brightness, contrast,
    saturation), random grayscale and random Gaussian blur, on the tensor batch. [-1, 1] -> [-1,
    1]."""
    B, dev = x.shape[0], x.device
    x = (random_crops(x, cfg.source_scale) + 1) / 2

    def jitter():  # a factor per image, uniform in [1 - jitter, 1 + jitter]
        return 1 + (torch.rand(B, 1, 1, 1, device=dev) * 2 - 1) * cfg.jitter

    x = x * jitter()  # brightness
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * jitter() + mean  # contrast
    gray = x.mean(1, keepdim=True)
    x = (x - gray) * jitter() + gray  # saturation
    x = torch.where(
        torch.rand(B, 1, 1, 1, device=dev) < cfg.gray, x.mean(1, keepdim=True).expand_as(x), x
    )
    # [B], in pixels at this size
    sigma = torch.empty(B, device=dev).uniform_(*cfg.blur) * x.shape[-1] / 32
    # its bound: no read of the device
    blurred = common.gaussian_blur(x, sigma, cfg.blur[1] * x.shape[-1] / 32)
    x = torch.where(torch.rand(B, 1, 1, 1, device=dev) < cfg.blur_prob, blurred, x)
    return x.clamp(0, 1) * 2 - 1


# ----------------------------------------------------------------------------------------- backbone
def timestep_embedding(t, dim):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like DDPM's step index) -> [B, dim]."""
    f = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = 1000 * t[:, None].float() * f[None]
    return torch.cat([a.cos(), a.sin()], 1)


def group_norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)


class ResBlock(nn.Module):
    """Residual conv block with time FiLM, then the FiLM of its group's sub-vector z_group (none
    when masked), each read through a SiLU (ADM's emb_layers; FutureXiang's time_emb and z_emb);
    then self-attention where it has it."""

    def __init__(self, c_in, c_out, emb_dim, z_sizes, group, dropout, attn=False):
        super().__init__()
        # the sub-vector z_group that modulates this block (down level i and up level i: i)
        self.group = group
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.film = nn.Linear(emb_dim, 2 * c_out)  # SiLU(emb(t)) -> (scale, shift)
        self.z_film = nn.Linear(z_sizes[group], 2 * c_out)  # SiLU(z_group) -> (z_s, z_b)
        self.norm2 = group_norm(c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = AttnBlock(c_out) if attn else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    # x [B,C_in,H,W], emb [B,E], zs: z_0 .. z_m, keep [B, G] in {0, 1}
    def forward(self, x, emb, zs, keep):
        h = self.conv1(F.silu(self.norm1(x)))  # [B,C,H,W]
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, 1)  # 2 x [B, C, 1, 1]
        # [B, 2C]: zero when masked
        zmod = self.z_film(F.silu(zs[self.group])) * keep[:, self.group, None]
        z_s, z_b = zmod[:, :, None, None].chunk(2, 1)  # 2 x [B, C, 1, 1]
        h = (self.norm2(h) * (1 + scale) + shift) * (1 + z_s) + z_b
        return self.attn(self.skip(x) + self.conv2(self.drop(F.silu(h))))


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions. q, k, v come from a Linear on the tokens, so each is
    contiguous in its last dimension, as the fused (flash / memory-efficient) kernels of
    scaled_dot_product_attention need."""

    def __init__(self, ch, heads=1):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        qkv = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads)  # [B, HW, 3, h, C/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, h, HW, C/h], stride 1 in C/h
        # [B, h, HW, C/h] -> [B, HW, C]
        out = common.attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(out).transpose(1, 2).reshape(B, C, H, W)  # [B, HW, C] -> [B, C, H, W]


class UNet(nn.Module):
    """eps_theta(x_t, t, z, keep): a U-Net whose residual blocks are grouped (down level i with up
    level i; the middle), each modulated by its group's sub-vector of z. keep [B, groups] in {0, 1}
    masks groups (masking / CFG)."""

    def __init__(self, cfg):
        super().__init__()
        # make_config checks z_dim >= G
        ch, emb_dim, G = cfg.channels, 4 * cfg.channels, len(cfg.ch_mult) + 1
        self.ch, self.groups = ch, G
        # sub-vector sizes, as evenly as goes
        self.z_sizes = [len(c) for c in torch.arange(cfg.z_dim).tensor_split(G)]

        def block(c_in, c_out, group, attn):
            return ResBlock(c_in, c_out, emb_dim, self.z_sizes, group, cfg.dropout, attn)

        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        # ResBlocks of group i at level i, then a downsampling conv, in forward order
        self.down = nn.ModuleList()
        skips = [ch]  # channels of each skip connection the up path will concatenate
        c, res = ch, cfg.image_size
        for i, m in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res):
                self.down.append(block(c, ch * m, i, res in cfg.attn_res))
                c = ch * m
                skips.append(c)
            if i < len(cfg.ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, 2, 1))  # downsample x2
                skips.append(c)
                res //= 2
        # group m, attention between
        self.mid = nn.ModuleList([block(c, c, G - 1, True), block(c, c, G - 1, False)])
        # ResBlocks of group i at level i (mirrored), then upsampling, in forward order
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res + 1):
                self.up.append(block(c + skips.pop(), ch * m, i, res in cfg.attn_res))
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
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, z, keep, bottleneck=False):
        """x_t [B,3,H,W], t [B], z [B, z_dim], keep [B, G] -> eps [B,3,H,W]; bottleneck: the
        middle's output averaged over the positions [B, C] instead."""
        emb = self.emb(timestep_embedding(t, self.ch))  # [B, 4 ch]
        # z_0 .. z_m: G x [B, z_sizes[g]]; a block reads zs[block.group]
        zs = z.tensor_split(self.groups, 1)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, zs, keep) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb, zs, keep)
        if bottleneck:
            return h.mean((2, 3))  # [B, C]
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], 1), emb, zs, keep)  # with its skip
            else:
                h = layer(h)  # upsample x2
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------- train / main
def make_config(args):
    cfg = common.configure(Config, PRESETS, args)
    # FutureXiang's lr is 1e-4 x its processes at 128 each: linear in the global batch
    cfg = common.scale_lr(cfg, args, Config, PRESETS)
    sizes = (
        "res_width",
        "enc_patch",
        "enc_dim",
        "enc_depth",
        "z_dim",
        "channels",
        "num_res",
        "sample_steps",
        "log_every",
        "sample_every",
        "ckpt_every",
    )
    if min(getattr(cfg, k) for k in sizes) <= 0 or not cfg.res_layers or min(cfg.res_layers) <= 0:
        raise UsageError(f"{', '.join(sizes)} and res_layers must be positive")
    if cfg.grid < 0:
        raise UsageError(f"grid ({cfg.grid}) must be >= 0")
    if cfg.encoder not in ("resnet", "vit"):
        raise UsageError(f"encoder {cfg.encoder!r}: resnet or vit")
    if cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
        raise UsageError(
            f"image size {cfg.image_size} is not divisible by the U-Net's "
            f"{2 ** (len(cfg.ch_mult) - 1)}"
        )
    if cfg.encoder == "vit" and (cfg.image_size % cfg.enc_patch or cfg.enc_dim % 64):
        raise UsageError(
            f"ViT encoder: the image size ({cfg.image_size}) must be divisible by the patch "
            f"({cfg.enc_patch}) and enc_dim ({cfg.enc_dim}) a multiple of 64"
        )
    if cfg.z_dim < len(cfg.ch_mult) + 1:
        raise UsageError(f"z_dim ({cfg.z_dim}) must be at least the {len(cfg.ch_mult) + 1} groups")
    return cfg


def make_optimizer(model, cfg):
    """AdamW (0.9, 0.95) over the U-Net at lr and the encoder (with its head) at enc_lr_ratio x lr:
    lr_mult."""
    enc = list(model.encoder.parameters()) + list(model.head.parameters())
    groups = [
        {"params": list(model.net.parameters()), "lr": cfg.lr, "lr_mult": 1.0},
        {"params": enc, "lr": cfg.lr * cfg.enc_lr_ratio, "lr_mult": cfg.enc_lr_ratio},
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)


def train(args):
    d, cfg, ckpt = common.start_run(args, Config, PRESETS, make_config)
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    # the same initial weights on every rank (and in eval's "at initialisation")
    torch.manual_seed(cfg.seed)
    model = SODA(cfg).to(d.device)
    ema = common.Ema(model)
    opt = make_optimizer(model, cfg)
    start = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    n_net, n_enc = (sum(p.numel() for p in g["params"]) / 1e6 for g in opt.param_groups)
    print0(
        f"SODA encoder {n_enc:.1f}M + U-Net {n_net:.1f}M params, z {cfg.z_dim} in "
        f"{model.net.groups} groups, "
        f"{len(images)} images of {cfg.data}, step {start} -> {cfg.steps}, {d.world} x {d.device}"
    )
    # DDP with SyncBatchNorm on GPUs (FutureXiang's), compiled
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world
    # the grids' sources
    x_show = common.to_float(images[common.subset(len(images), cfg.grid)]).to(d.device)
    log = common.Log(args.out, d, cfg, start)
    for step in log.steps(start, cfg.steps):
        # learning rate: linear warm-up, then constant; the encoder at enc_lr_ratio x
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        # forward (the views are made inside), backward, clip, update, EMA
        # this rank's rows, drawn with replacement
        x, _ = common.batch(
            images, labels, bs, cfg.seed, step, d.rank, flip=False, device=d.device
        )  # no flip here: the views flip
        with common.autocast(d.device):
            loss = step_model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, min(cfg.ema, (1 + step) / (10 + step)))  # EMA, its decay warmed up
        # log (averaged over the processes; a NaN stops the run), sample grid, checkpoint
        done = step + 1
        log(done, loss, lr=lr)
        if d.master and cfg.grid and done % cfg.sample_every == 0:
            # own generator: the training RNG stream is untouched
            g = torch.Generator(d.device).manual_seed(cfg.seed)
            with torch.no_grad():
                # the run's sample_steps
                views = ema.model.sample(ema.model.encode(x_show), generator=g)
            common.save_grid(
                side_by_side(x_show, views), os.path.join(args.out, f"samples_{done:07d}.png")
            )
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt)


# [k,3,H,W] twice -> [2k,3,H,W]: source, its view, source, its view, ...
def side_by_side(src, views):
    # [k,2,3,H,W] -> [2k,3,H,W]
    return torch.stack([src.float().cpu(), views.float().cpu()], 1).flatten(0, 1)


def load(args):
    return common.load_run(args, Config, lambda cfg, ckpt: SODA(cfg), compile_net=args.compile)


def sources(spec, size, n):
    """n test images of `spec`, drawn uniformly (common.subset); past the split's size it starts
    over -> uint8. The same draw as common.probe_data's test subset: its first rows are that
    subset's first rows."""
    x_te = common.load_images(spec, "test", size)[0]
    return x_te[common.subset(len(x_te), len(x_te)).repeat(math.ceil(n / len(x_te)))[:n]]


@torch.no_grad()
def generate(model, src, args, d):
    """A view of each source image generated from its own z (the whole image is the source), split
    over the processes and gathered: uint8 [n,3,H,W] -> [n,3,H,W] in [-1, 1] (on every rank)."""
    per = math.ceil(len(src) / d.world)
    rows = (torch.arange(per) + d.rank * per) % len(src)
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = []
    for r in tqdm(rows.split(args.batch), desc="generate views", disable=not d.master):
        z = model.encode(common.to_float(src[r].to(d.device)))
        xs.append(model.sample(z, steps=args.sample_steps, w=args.guidance, generator=g))
    return common.gather(torch.cat(xs), len(src), d)


def t_at_signal(signal, schedule_s):
    """The t at which x_t = sqrt(abar) x + sqrt(1 - abar) e holds the fraction `signal` of signal,
    sqrt(abar) / (sqrt(abar) + sqrt(1 - abar)) (common.PROBE_SIGNALS): abar = r^2 / (1 + r^2) with
    r = signal / (1 - signal), then abar(t) inverted: t = cos^2((abar + s) pi / (2 (1 + s)))."""
    r = signal / (1 - signal)
    a = r**2 / (1 + r**2)
    s = schedule_s
    return math.cos((a + s) * math.pi / (2 * (1 + s))) ** 2


def noised(x, a, seed):
    """The evals' x_t = sqrt(abar) x + sqrt(1 - abar) e of a chunk of images x [B, 3, H, W], e drawn
    from a generator seeded by `seed` (the chunk's first row): same chunks, same noise."""
    g = torch.Generator(x.device).manual_seed(seed)
    return math.sqrt(a) * x + math.sqrt(1 - a) * torch.randn(x.shape, device=x.device, generator=g)


def bottleneck(model, images, t, device):
    """The unconditional denoiser's features: the U-Net's middle (averaged over the positions) on
    x_t of the images with z dropped, outside autocast like z's probe, each chunk's noise seeded by
    its first row -> [N, C]."""
    a = abar(torch.tensor(t, dtype=torch.float64), model.cfg.schedule_s).item()

    def fn(x, i):  # x [B,3,H,W] -> [B, C]
        B = len(x)
        x_t = noised(x, a, i)
        tt = torch.full((B,), t, device=device)
        # z dropped: a zero z, and no group kept
        z, keep = x.new_zeros(B, model.cfg.z_dim), x.new_zeros(B, model.net.groups)
        return model.net(x_t, tt, z, keep, bottleneck=True)

    return common.extract(fn, images, device, desc=f"bottleneck at t={t}")


def clean_estimate(model, images, t, device):
    """The denoiser's estimate of x_0 from x_t of the images themselves at t (the source's own crop,
    no flip: the view the stripes can be read against), given each image's own z, every group
    kept, no guidance: (x_t - sqrt(1 - abar) eps) / sqrt(abar), clamped -> [N, 3, H, W]."""
    a = abar(torch.tensor(t, dtype=torch.float64), model.cfg.schedule_s).item()

    def fn(x, i):  # x [B,3,H,W] -> [B,3,H,W]
        x_t = noised(x, a, i)
        eps = model.eps(x_t, t, model.encode(x), 0)
        return ((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)

    return common.extract(fn, images, device, desc="x_0 estimates")


def sample_cmd(args):
    d, ckpt, cfg, model = load(args)
    src = sources(args.data or cfg.data, cfg.image_size, args.n)
    x = generate(model, src, args, d)
    if d.master:
        # 32 pairs at most
        common.write_samples(args.out, x, grid=side_by_side(common.to_float(src[:32]), x[:32]))


def eval_cmd(args):
    d, ckpt, cfg, model = load(args)
    data, dev = args.data or cfg.data, d.device
    fd_net = common.FDFeatures(args.fd_model, dev)
    src = sources(data, cfg.image_size, args.n)
    x = generate(model, src, args, d)
    if not d.master:
        return
    x_src = common.to_float(src)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        # what a perfect novel-view model would generate
        crops = random_crops(x_src, cfg.target_scale)
    x_tr, y_tr, x_te, y_te = common.probe_data(data, cfg.image_size)
    # beside the features (the probes below run on the device)
    y_tr, y_te = y_tr.to(dev), y_te.to(dev)
    torch.manual_seed(cfg.seed)
    init = SODA(cfg).to(dev).eval()  # the same encoder at initialisation: the probe's floor
    res = dict(
        step=ckpt["step"],
        data=data,
        fd=common.fd_to_train(fd_net, x, data, cfg.image_size),
        fd_ref=common.fd_to_ref(fd_net, x, args.fd_ref),
        fd_model=args.fd_model,
        n_samples=args.n,
        probe="z, the encoder's compact latent",
        probe_by_signal="the U-Net's middle on x_t, z dropped",
        psnr=round(common.psnr(x.cpu(), x_src), 3),
        psnr_crop=round(common.psnr(crops, x_src), 3),
        n_sources=min(args.n, len(common.load_images(data, "test", cfg.image_size)[0])),
        sample_steps=args.sample_steps or cfg.sample_steps,
        guidance=cfg.guidance if args.guidance is None else args.guidance,
        detail=(
            f"x_0 estimated from x_t of the image itself at signal {common.DETAIL_SIGNAL:.3g} "
            "and its own z (the source's crop, no flip)"
        ),
    )
    for suffix, net in (("", model), ("_init", init)):
        x_made = None
        if data.startswith("shapes"):
            x_made = clean_estimate(
                net, x_te[:1000], t_at_signal(common.DETAIL_SIGNAL, cfg.schedule_s), dev
            )
        res.update(common.detail(x_made, data, suffix))
        f_tr, f_te = (encode_all(net, xs, dev) for xs in (x_tr, x_te))
        res.update(common.probes(f_tr, y_tr, f_te, y_te, suffix))
        l2 = common.linear_probe(F.normalize(f_tr), y_tr, F.normalize(f_te), y_te)  # z / ||z||
        # 20 equal votes, FutureXiang's test.py
        knn = common.knn_accuracy(f_tr, y_tr, f_te, y_te, T=float("inf"))
        res.update(
            {f"probe_linear{suffix}_l2": round(l2, 4), f"probe_knn{suffix}_uniform": round(knn, 4)}
        )
    res.update(common.pixel_probes(x_tr, y_tr, x_te, y_te, data))  # the floors: pixels
    x_tr, y_tr, x_te, y_te = common.probe_data(data, cfg.image_size, 5_000, 2_000)

    def probe(signal):
        t = t_at_signal(signal, cfg.schedule_s)
        f_tr, f_te = bottleneck(model, x_tr, t, dev), bottleneck(model, x_te, t, dev)
        return common.linear_probe(f_tr, y_tr.to(dev), f_te, y_te.to(dev))

    by_signal = [[f, round(probe(f), 4)] for f in common.PROBE_SIGNALS]
    res["probe_linear_by_signal"] = by_signal
    common.write_eval(args.ckpt, res)


def encode_all(model, images, device):
    """z of uint8 images [N, 3, H, W], in chunks -> [N, z_dim]."""

    def encode(x, first_row):
        return model.encode(x)

    return common.extract(encode, images, device, desc="encode")


def export_encoder(args):
    """The EMA encoder as a state dict common.load_encoder(PATH) reads: torchvision's ResNet layout
    (at the images' size) or DINOv2's ViT layout (at image_size)."""
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder; name the file to write")
    _, ckpt, cfg, model = load(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.save_checkpoint(args.out, model.encoder.state_dict())
    print0(f"wrote {args.out}, the {cfg.encoder} encoder: use --encoder {args.out}")


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    sa, ev = sub.choices["sample"], sub.choices["eval"]
    sa.add_argument("--data", help="source images: their test split (default: the run's)")
    sa.add_argument("--cache", type=common.cache_flag, help="where image folders are decoded to")
    for s in (sa, ev):
        s.add_argument(
            "--sample-steps", type=common.number(int), help="DDIM steps (default: the run's, 100)"
        )
        s.add_argument(
            "--guidance",
            type=common.number(float, 0, strict=False),
            help="w of the guidance on z (default: the run's, 0.3)",
        )
    # each view costs sample_steps passes; 1,000 are enough for PSNR and a rough FD
    ev.set_defaults(n=1000)
    ex = sub.add_parser(
        "export-encoder", help="write the EMA encoder for common.load_encoder / --encoder PATH"
    )
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True, type=common.out_file)
    ex.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    # common.load_run reads args.compile; nothing runs the network here
    ex.set_defaults(compile=False)
    args = p.parse_args(argv)
    {"train": train, "sample": sample_cmd, "eval": eval_cmd, "export-encoder": export_encoder}[
        args.cmd
    ](args)


if __name__ == "__main__":
    common.cli(main)
