"""SODA: a bottleneck diffusion model that learns a representation by generating one view from another.

Paper: D. A. Hudson, D. Zoran, M. Malinowski, A. K. Lampinen, A. Jaegle, J. L. McClelland, L. Matthey, F. Hill,
A. Lerchner, "SODA: Bottleneck Diffusion Models for Representation Learning", CVPR 2024 (no official code released).
Claim: an encoder that must tell a denoiser, through a compact latent z only, how to generate a *different* view of
the image learns a strong, linearly separable representation (the seeds' "condition as the medium" side).

    z = E(source view)  (a compact vector);  x_0 = target view (an independent crop of the same image)
    x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) e,  L = || e - eps_theta(x_t, t, z) ||^2              (Sec. 3)
    abar(t) = (2 (1 + s) / pi) arccos(sqrt(t)) - s: the inverted cosine schedule (more weight on high noise, Sec. 3.3)
    layer modulation: z = [z_0 .. z_m]; z_i modulates group i of the U-Net (down level i and its mirrored up level,
    the middle is group m) as h <- h (1 + z_s) + z_b after the time FiLM; layer masking drops groups at random and
    dropping all of them is the unconditional model for classifier-free guidance on z             (Sec. 3.2)
Sampling: DDIM from t = 1 to 0 conditioned on z of a source image, eps = (1 + w) eps(z) - w eps(no z).

The encoder is the DINOv2-layout ViT of common.py, so `export-encoder` writes a file that common.load_encoder reads:
a SODA checkpoint can serve as the frozen encoder of repa.py (--encoder enc.pt) offline.

Commands (python soda.py {train,sample,eval,export-encoder} -h lists every flag):
    CPU smoke, seconds: python soda.py train --preset tiny --out runs/soda_tiny --device cpu
    one GPU:            python soda.py train --data cifar10 --out runs/soda --compile
                        python soda.py eval --ckpt runs/soda/ckpt.pt
                        python soda.py export-encoder --ckpt runs/soda/ckpt.pt --out runs/soda/enc.pt
    torchrun:           torchrun --nproc_per_node 8 soda.py train --data cifar10 --out runs/soda --compile
Expected: the probe on z beats the same encoder at initialisation. A ResNet-18 reimplementation reports 80.0% linear /
80.4% k-NN on CIFAR-10 after 800 epochs. At toy scale on `shapes` it does not: z fills with colour, not contour
(the README's soda.py section has the measurements and why).
"""
import math, os, time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
from common import UsageError, print0


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    data: str = "cifar10"           # dataset (common.load_images)
    image_size: int = 32            # images are resized to image_size^2
    enc_patch: int = 4              # encoder ViT patch (8x8 tokens at 32 px)
    enc_dim: int = 384              # encoder width (a multiple of 64: heads = width / 64)
    enc_depth: int = 12             # encoder blocks (ViT-S)
    z_dim: int = 128                # the compact latent (FutureXiang's CIFAR setting)
    channels: int = 128             # U-Net base width
    ch_mult: list = field(default_factory=lambda: [1, 2, 2])  # width per resolution; groups = len(ch_mult) + 1
    num_res: int = 2                # residual blocks per resolution
    attn_res: list = field(default_factory=lambda: [16])      # resolutions with self-attention
    dropout: float = 0.1
    source_scale: list = field(default_factory=lambda: [0.2, 1.0])  # random-resized-crop area of the source view
    target_scale: list = field(default_factory=lambda: [0.2, 1.0])  # ... and of the independent target view
    jitter: float = 0.4             # colour jitter strength on the source (brightness, contrast, saturation)
    mask_prob: float = 0.1          # layer masking: each group loses its z_i with this probability
    z_drop: float = 0.1             # all of z dropped (the unconditional model for guidance)
    guidance: float = 0.3           # w in (1 + w) eps(z) - w eps(no z)
    schedule_s: float = 0.008       # s of the inverted cosine schedule
    sample_steps: int = 100         # DDIM steps
    steps: int = 100_000            # optimiser steps
    batch_size: int = 256           # global batch size
    lr: float = 1e-4                # AdamW (0.9, 0.95); the encoder gets 2x
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    warmup: int = 1_000             # linear warm-up steps
    ema: float = 0.9999             # EMA decay (with warm-up)
    num_classes: int = 10           # filled in from the data (only the probe uses labels)
    log_every: int = 50             # steps between log.jsonl rows
    sample_every: int = 5_000       # steps between reconstruction grids
    ckpt_every: int = 2_500         # steps between checkpoints
    seed: int = 0


PRESETS = {
    "tiny": dict(data="shapes:2000", image_size=16, enc_patch=4, enc_dim=64, enc_depth=2, z_dim=12, channels=16,
                 ch_mult=[1, 2], num_res=1, attn_res=[], dropout=0.0, sample_steps=5, steps=20, batch_size=32, lr=1e-3,
                 warmup=0, ema=0.9, log_every=1, sample_every=10, ckpt_every=10),
    "default": dict(),  # CIFAR-10 32x32: ViT-S/4 encoder, z of 128, U-Net 128 channels
}


# -------------------------------------------------------------------------------------------------------- backbone
def timestep_embedding(t, dim):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like DDPM's step index) -> [B, dim]."""
    f = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = 1000 * t[:, None].float() * f[None]
    return torch.cat([a.cos(), a.sin()], 1)


def group_norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)


class ResBlock(nn.Module):
    """Residual conv block with time FiLM, then the FiLM of its group's sub-vector z_i (zero when masked)."""

    def __init__(self, c_in, c_out, emb_dim, z_chunk, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.film = nn.Linear(emb_dim, 2 * c_out)  # t -> (scale, shift)
        self.z_film = nn.Linear(z_chunk, 2 * c_out)  # z_i -> (z_s, z_b)
        self.norm2, self.drop, self.conv2 = group_norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight); nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb, zmod):  # zmod [B, 2 C]: this block's (z_s, z_b), already masked
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, 1)  # 2 x [B, C, 1, 1]
        z_s, z_b = zmod[:, :, None, None].chunk(2, 1)  # 2 x [B, C, 1, 1]
        h = (self.norm2(h) * (1 + scale) + shift) * (1 + z_s) + z_b
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class AttnBlock(nn.Module):
    def __init__(self, ch, heads=1):
        super().__init__()
        self.heads, self.norm, self.qkv, self.proj = heads, group_norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight); nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)  # [B, h, HW, C/h]
        return x + self.proj(common.attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W))  # -> [B, C, H, W]


class UNet(nn.Module):
    """eps_theta(x_t, t, z, keep): a U-Net whose residual blocks are grouped (down level i + up level i, and the middle)
    and modulated by their own sub-vector of z. keep [B, groups] in {0, 1} masks the groups (layer masking / CFG)."""

    def __init__(self, cfg):
        super().__init__()
        ch, emb_dim, G = cfg.channels, 4 * cfg.channels, len(cfg.ch_mult) + 1
        if cfg.z_dim % G:
            raise UsageError(f"z_dim {cfg.z_dim} does not split into {G} equal sub-vectors")
        self.ch, self.groups, zc = ch, G, cfg.z_dim // G
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down, self.up, self.block_group, skips, c, res = nn.ModuleList(), nn.ModuleList(), [], [ch], ch, cfg.image_size
        for i, m in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res):
                self.down.append(nn.ModuleList([ResBlock(c, ch * m, emb_dim, zc, cfg.dropout),
                                                AttnBlock(ch * m) if res in cfg.attn_res else nn.Identity()]))
                self.block_group.append(i)
                c = ch * m
                skips.append(c)
            if i < len(cfg.ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, 2, 1))  # downsample x2
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, zc, cfg.dropout), AttnBlock(c), ResBlock(c, c, emb_dim, zc, cfg.dropout)])
        self.block_group += [G - 1, G - 1]
        for i, m in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), ch * m, emb_dim, zc, cfg.dropout),
                                              AttnBlock(ch * m) if res in cfg.attn_res else nn.Identity()]))
                self.block_group.append(i)  # mirrored: up level i shares z_i with down level i
                c = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, 1, 1)))
                res *= 2
        self.res_blocks = [l[0] for l in self.down if isinstance(l, nn.ModuleList)] + [self.mid[0], self.mid[2]] + \
                          [l[0] for l in self.up if isinstance(l, nn.ModuleList)]  # forward order, as block_group
        self.norm_out, self.conv_out = group_norm(c), nn.Conv2d(c, 3, 3, 1, 1)
        nn.init.zeros_(self.conv_out.weight); nn.init.zeros_(self.conv_out.bias)

    def z_modulation(self, z, keep):
        """-> one [B, 2C] (z_s, z_b) per residual block: block b reads only sub-vector block_group[b] of z."""
        chunks = z.chunk(self.groups, 1)  # G x [B, z_dim / G]
        return [blk.z_film(chunks[g]) * keep[:, g:g + 1] for blk, g in zip(self.res_blocks, self.block_group)]

    def forward(self, x, t, z, keep):
        emb = self.emb(timestep_embedding(t, self.ch))
        mods = iter(self.z_modulation(z, keep))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, nn.Conv2d) else layer[1](layer[0](h, emb, next(mods)))
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb, next(mods))), emb, next(mods))
        for layer in self.up:
            h = layer(h) if isinstance(layer, nn.Sequential) else layer[1](layer[0](torch.cat([h, hs.pop()], 1), emb, next(mods)))
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------------------ views
def random_crops(x, scale):
    """Per-image random resized crops (area in `scale`, aspect in [3/4, 4/3]) with horizontal flips, resampled to
    the input size, on the tensor batch (on the GPU when there is one). x [B,3,H,W] -> [B,3,H,W]."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(*scale)
    log_r = torch.empty(B, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3))
    sx, sy = (area * log_r.exp()).sqrt().clamp(max=1), (area / log_r.exp()).sqrt().clamp(max=1)  # half-extent / 1
    cx, cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - sx), (torch.rand(B, device=dev) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x, strength):
    """Random brightness, contrast and saturation per image, in [-1, 1]."""
    B, dev = x.shape[0], x.device
    f = lambda: 1 + (torch.rand(B, 1, 1, 1, device=dev) * 2 - 1) * strength
    x = (x + 1) / 2 * f()  # brightness
    x = (x - x.mean((1, 2, 3), keepdim=True)) * f() + x.mean((1, 2, 3), keepdim=True)  # contrast
    gray = x.mean(1, keepdim=True)
    x = (x - gray) * f() + gray  # saturation
    return x.clamp(0, 1) * 2 - 1


# ---------------------------------------------------------------------------------------------------------- method
def abar(t, s):
    """The inverted cosine schedule: abar(t) = (2 (1 + s) / pi) arccos(sqrt(t)) - s, abar(0) = 1, clamped near 0."""
    return ((2 * (1 + s) / math.pi) * torch.arccos(t.sqrt()) - s).clamp(1e-4, 1.0)


class SODA(nn.Module):
    """forward(x) -> denoising loss of a target view given z of a source view; encode(x) -> z; sample(z) -> images."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        g = cfg.image_size // cfg.enc_patch
        self.encoder = common.DinoViT(cfg.enc_dim, cfg.enc_depth, cfg.enc_dim // 64, cfg.enc_patch, g)
        self.head = nn.Linear(cfg.enc_dim, cfg.z_dim)  # global token -> z
        self.net = UNet(cfg)
        self.register_buffer("mean", torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def encode(self, x):
        """[-1, 1] images -> z [B, z_dim]. ImageNet normalisation, as common.FrozenEncoder does for the export."""
        return self.head(self.encoder(((x + 1) / 2 - self.mean) / self.std)[0])

    def forward(self, x, y=None):
        cfg, B = self.cfg, x.shape[0]
        source = color_jitter(random_crops(x, cfg.source_scale), cfg.jitter)
        target = random_crops(x, cfg.target_scale)
        z = self.encode(source)
        keep = (torch.rand(B, self.net.groups, device=x.device) >= cfg.mask_prob) & \
               (torch.rand(B, 1, device=x.device) >= cfg.z_drop)  # layer masking; all dropped = unconditional
        t = torch.rand(B, device=x.device)
        a = abar(t, cfg.schedule_s).view(B, 1, 1, 1)
        e = torch.randn_like(target)
        x_t = a.sqrt() * target + (1 - a).sqrt() * e
        return ((self.net(x_t, t, z, keep.float()).float() - e) ** 2).mean()

    def eps(self, x_t, t, z, w):
        """Guided noise prediction: (1 + w) eps(z) - w eps(no z)."""
        B, G = x_t.shape[0], self.net.groups
        tt = torch.full((B,), t, device=x_t.device)
        if w == 0:
            return self.net(x_t, tt, z, torch.ones(B, G, device=x_t.device)).float()
        keep = torch.cat([torch.ones(B, G), torch.zeros(B, G)]).to(x_t.device)
        e_c, e_u = self.net(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([z, z]), keep).float().chunk(2)
        return (1 + w) * e_c - w * e_u

    @torch.no_grad()
    def sample(self, z, steps=None, w=None, generator=None):
        """DDIM (eta = 0) from t = 1 to 0 with the inverted cosine schedule, conditioned on z."""
        cfg = self.cfg
        steps, w = steps or cfg.sample_steps, cfg.guidance if w is None else w
        x = torch.randn((len(z), 3, cfg.image_size, cfg.image_size), device=z.device, generator=generator)
        ts = torch.linspace(1, 0, steps + 1, device=z.device)
        with common.autocast(z.device):
            for i in range(steps):
                a, a_next = abar(ts[i], cfg.schedule_s), abar(ts[i + 1], cfg.schedule_s)
                e = self.eps(x, ts[i].item(), z, w)
                x0 = ((x - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1)
                x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e
        return x0


# ---------------------------------------------------------------------------------------------------- train / main
def make_config(args):
    cfg = Config(**PRESETS[args.preset])
    for k in ("data", "steps", "batch_size", "lr", "image_size", "seed"):
        if getattr(args, k, None) is not None:
            setattr(cfg, k, getattr(args, k))
    if cfg.image_size % cfg.enc_patch or cfg.image_size % 2 ** (len(cfg.ch_mult) - 1):
        raise UsageError(f"image size {cfg.image_size} is not divisible by the encoder patch {cfg.enc_patch} and the "
                         f"U-Net's {2 ** (len(cfg.ch_mult) - 1)}")
    return cfg


def train(args):
    d = common.setup_dist(args.device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        ckpt = common.load_checkpoint(path)
        cfg = Config(**ckpt["config"])
        cfg.steps = args.steps or cfg.steps
    elif os.path.exists(path):
        raise UsageError(f"{path} exists: pass --resume to continue it, or choose another --out")
    else:
        cfg = make_config(args)
    if cfg.batch_size % d.world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    images, labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (and in eval's "at initialisation")
    model = SODA(cfg).to(d.device)
    ema = common.Ema(model, cfg.ema)
    enc_params = list(model.encoder.parameters()) + list(model.head.parameters())
    opt = torch.optim.AdamW([{"params": model.net.parameters(), "lr_mult": 1.0}, {"params": enc_params, "lr_mult": 2.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    if args.resume:
        model.load_state_dict(ckpt["model"]); ema.model.load_state_dict(ckpt["ema"]); opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        common.set_rng_state(ckpt["rng"], d.rank, cfg.seed, step)
    else:
        torch.manual_seed(cfg.seed * 1_000_003 + d.rank)
    print0(f"SODA encoder {sum(p.numel() for p in enc_params) / 1e6:.1f}M + U-Net {sum(p.numel() for p in model.net.parameters()) / 1e6:.1f}M "
           f"params, z {cfg.z_dim} in {model.net.groups} groups, {len(images)} images of {cfg.data}, step {step} -> "
           f"{cfg.steps}, {d.world} x {d.device}")
    step_model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.world > 1 else model
    step_model = torch.compile(step_model) if args.compile else step_model
    bs = cfg.batch_size // d.world
    peak = common.peak_flops(d.device)
    if peak:  # model FLOPs of one step, counted once (nanoGPT-style MFU); the RNG is put back afterwards
        state = common.rng_state()
        x, _ = common.batch(images, labels, bs, cfg.seed, 0, d.rank, device=d.device)
        with common.autocast(d.device):
            flops_per_img = common.flops_per_call(lambda: model(x).backward()) / bs
        opt.zero_grad(set_to_none=True); common.set_rng_state(state)
    log = common.Jsonl(os.path.join(args.out, "log.jsonl"), d.master)
    x_show = images[:8].to(d.device).float() / 127.5 - 1  # fixed sources for the reconstruction grids
    loss_sum, n_sum, t0 = torch.zeros((), device=d.device), 0, time.time()
    pbar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, disable=not d.master, desc="train")
    for step in pbar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        x, _ = common.batch(images, labels, bs, cfg.seed, step, d.rank, flip=False, device=d.device)  # views flip
        with common.autocast(d.device):
            loss = step_model(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        loss_sum += loss.detach(); n_sum += 1
        done = step + 1
        save = done % cfg.ckpt_every == 0 or done == cfg.steps
        if done % cfg.log_every == 0 or save:
            if d.world > 1:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            mean_loss, dt = loss_sum.item() / n_sum, time.time() - t0
            if not math.isfinite(mean_loss):
                raise common.TrainingError(f"loss is {mean_loss} at step {done}; stopped, {path} keeps the last good "
                                           f"checkpoint")
            row = dict(step=done, loss=mean_loss, img_per_s=round(n_sum * cfg.batch_size / dt, 1), lr=lr)
            if peak:
                row["mfu"] = round(flops_per_img * row["img_per_s"] / (peak * d.world), 4)
            log(**row)
            pbar.set_postfix(loss=f"{mean_loss:.4f}", img_s=row["img_per_s"])
            loss_sum.zero_(); n_sum, t0 = 0, time.time()
        if d.master and (done % cfg.sample_every == 0 or done == cfg.steps):
            g = torch.Generator(d.device).manual_seed(cfg.seed)  # own generator: the training RNG stream is untouched
            with torch.no_grad():
                recon = ema.model.sample(ema.model.encode(x_show), generator=g)
            common.save_grid(torch.cat([x_show, recon]), os.path.join(args.out, f"samples_{done:07d}.png"))  # row 1: sources
        if d.master and save:
            common.save_checkpoint(path, dict(model=model.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                                              step=done, config=asdict(cfg), rng=common.rng_state()))


def load_for_inference(args):
    d = common.setup_dist(args.device)
    ckpt = common.load_checkpoint(args.ckpt)
    try:
        cfg = Config(**ckpt["config"])
        model = SODA(cfg).to(d.device).eval()
        model.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"{args.ckpt} is not a soda.py checkpoint ({type(e).__name__})") from None
    if getattr(args, "compile", False):
        model.net = torch.compile(model.net)
    return d, ckpt, cfg, model


@torch.no_grad()
def encode_all(model, images, device, bs=256):
    return torch.cat([model.encode(images[i:i + bs].to(device).float() / 127.5 - 1).float() for i in range(0, len(images), bs)])


@torch.no_grad()
def reconstruct(model, images, args, device):
    """Generate each image's view from its own z (source = the whole image): [N,3,H,W] in [-1, 1]."""
    g = torch.Generator(device).manual_seed(args.seed)
    out = []
    for i in tqdm(range(0, len(images), args.batch), desc="reconstruct"):
        x = images[i:i + args.batch].to(device).float() / 127.5 - 1
        out.append(model.sample(model.encode(x), args.sample_steps, args.guidance, g))
    return torch.cat(out)


def sample_cmd(args):
    if not args.out.endswith(".npz"):
        raise UsageError("--out must name an .npz file")
    d, ckpt, cfg, model = load_for_inference(args)
    src, _, _ = common.load_images(args.data or cfg.data, "test", cfg.image_size)
    x = reconstruct(model, src[:args.n], args, d.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, arr_0=common.to_uint8(x))
    k = min(32, args.n)
    pairs = torch.stack([src[:k].float() / 127.5 - 1, x[:k].cpu()], 1).flatten(0, 1)  # source, generated, ...
    common.save_grid(pairs, args.out[:-4] + ".png")
    print0(f"wrote {args.out}: views of {args.n} test images generated from their z")


def eval_cmd(args):
    d, ckpt, cfg, model = load_for_inference(args)
    data = args.data or cfg.data
    x_tr, y_tr, _ = common.load_images(data, "train", cfg.image_size)
    x_te, y_te, _ = common.load_images(data, "test", cfg.image_size)
    n_tr, n_te = min(len(x_tr), 10_000), min(len(x_te), 5_000)
    ytr, yte = y_tr[:n_tr].to(d.device), y_te[:n_te].to(d.device)
    torch.manual_seed(cfg.seed)
    init = SODA(cfg).to(d.device).eval()  # the same initialisation as the run's
    res = dict(step=ckpt["step"], data=data)
    for name, m in (("z", model), ("z_init", init)):
        f_tr, f_te = encode_all(m, x_tr[:n_tr], d.device), encode_all(m, x_te[:n_te], d.device)
        res[f"probe_linear_{name}"] = round(common.linear_probe(f_tr, ytr, f_te, yte), 4)
        res[f"probe_knn_{name}"] = round(common.knn_accuracy(f_tr, ytr, f_te, yte), 4)
    n = min(args.n, len(x_te))
    recon = reconstruct(model, x_te[:n], args, d.device)
    fd_net = common.FDFeatures(args.fd_model, d.device)
    mse = ((recon.cpu() - (x_te[:n].float() / 127.5 - 1)) ** 2).flatten(1).mean(1)
    res.update(n_reconstructed=n, psnr=round((10 * torch.log10(4 / mse)).mean().item(), 3),
               fd_reconstructions=round(common.frechet_distance(*fd_net.stats(x_te[:n]), *fd_net.stats(recon)), 4),
               fd_model=args.fd_model, guidance=cfg.guidance if args.guidance is None else args.guidance)
    with open(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "eval.json"), "w") as f:
        common.json.dump(res, f, indent=1)
    print0(common.json.dumps(res))


def export_encoder(args):
    """The EMA encoder as a DINOv2-layout state dict: common.load_encoder(PATH) reads it (at image_size)."""
    _, ckpt, cfg, model = load_for_inference(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.save_checkpoint(args.out, model.encoder.state_dict())
    print0(f"wrote {args.out}: ViT {cfg.enc_dim}x{cfg.enc_depth}, patch {cfg.enc_patch}; use --encoder {args.out}")


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    sa, ev = sub.choices["sample"], sub.choices["eval"]
    sa.add_argument("--data", help="source images: their test split (default: the run's)")
    for s in (sa, ev):
        s.add_argument("--sample-steps", type=int, help="DDIM steps (default: the run's, 100)")
        s.add_argument("--guidance", type=float, help="w of the guidance on z (default: the run's, 0.3)")
    ex = sub.add_parser("export-encoder", help="write the EMA encoder for common.load_encoder / --encoder PATH")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--device", default="cpu")
    ev.set_defaults(n=1000)  # reconstructions cost sample_steps passes each; 1,000 views are enough for PSNR
    args = p.parse_args(argv)
    {"train": train, "sample": sample_cmd, "eval": eval_cmd, "export-encoder": export_encoder}[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
