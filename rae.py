"""RAE: diffusion in the latent space of a frozen representation encoder (representation autoencoders).

Paper: B. Zheng, N. Ma, S. Tong, S. Xie, "Diffusion Transformers with Representation Autoencoders", 2025.
Claim: a frozen self-supervised encoder (DINOv2-B) with a trained ViT decoder is a better autoencoder for latent
diffusion than the SD-VAE: its latent is semantic, it reconstructs well (rFID 0.57), and a DiT with a shallow, wide
head (DiT^DH) trains in this wide latent to FID 1.51 at ImageNet 256 without guidance.

Stage 1, the autoencoder (`train-decoder`): the encoder stays frozen, only the decoder D trains.
    z = LN(E(x))                 patch tokens after the final LayerNorm without its affine; class / registers dropped
    z~ = (z - mu) / sigma        per element (mu, sigma [N, C]), from the training data once, kept in the checkpoint
    x^ = D(z~ + s n / sigma),  s = tau u,  u ~ U(0, 1),  n ~ N(0, I),  tau = 0.8
                             (noise augmentation, training only, on z itself as the official encode() adds it)
    L = |x^ - x|_1 + lambda_p |z~(x^) - z~(x)|^2
The paper's loss is L1 + LPIPS + an adaptive GAN from epoch 8. LPIPS needs downloaded VGG weights, so the perceptual
term here is the distance between the frozen encoder's normalised latents of the reconstruction and of the input (no
download); the GAN is not built (the paper turns it on late, and the retrained decoders users report as noisy are the
GAN's); a ResNet encoder's map (a soda.py / decoupled_latent.py export) has no LayerNorm and is taken as it is.

Stage 2, generation (`train --decoder DIR/ckpt.pt`): flow matching on z~ (t = 1 is noise)
    x_t = (1 - t) z~ + t e,  v = e - z~,  L = |v_theta(x_t, t, y) - v|^2
    t = shift(sigmoid(n)),  n ~ N(0, 1),  shift(t) = a t / (1 + (a - 1) t),  a = sqrt(m / 4096),  m = N C
    DiT^DH: a DiT trunk over the N latent tokens -> s = silu(t_emb + trunk(x_t, t, y)) per token; the head (2 blocks,
            wider than the trunk) reads a fresh embedding of x_t with adaLN from s, token by token -> v
    sampler: Euler on dx/dt = v over shift(linspace(1, 0, K + 1)), CFG on an interval, in fp32 (the official code's
            bf16 sampling moved FID from 1.51 to 5.1)
`--head none` is the plain DiT with as many more trunk blocks as match the head's parameters: the control for the
paper's claim that the wide head matters. The official DDT blocks use SwiGLU, RMSNorm and RoPE; these use the GELU
MLP, LayerNorm and sin-cos positions of the other files (a deviation for reading, not measured).

Encoders (--encoder, common.load_encoder): dinov2_vitb14_reg (the paper's; needs the released file once, from the
internet or in torch.hub's cache), a soda.py or decoupled_latent.py export, or random-vit-s (offline). @RES sets the
encoder's input size (224 by default: 16 x 16 tokens; with a 32 px image, one token per 2 x 2 pixels).

Commands (python rae.py {train-decoder,train,sample,eval} -h lists every flag):
    CPU smoke, seconds: python rae.py train-decoder --preset tiny --out runs/rae_dec_tiny --device cpu
    the claim on a CPU: python rae.py train-decoder --preset cpu --out runs/rae_dec                   # < 10 min
                        python rae.py eval --ckpt runs/rae_dec/ckpt.pt              # psnr against psnr_init, rFD
    generation on CPU:  python rae.py train --preset cpu --decoder runs/rae_dec/ckpt.pt --out runs/rae_gen
                        python rae.py eval --ckpt runs/rae_gen/ckpt.pt --n 1000     # + FD of samples
    one GPU:            python rae.py train-decoder --data cifar10 --out runs/rae_dec --compile
                        python rae.py train --decoder runs/rae_dec/ckpt.pt --out runs/rae --compile
                        python rae.py train --decoder runs/rae_dec/ckpt.pt --head none --out runs/rae_plain --compile
                        python rae.py sample --ckpt runs/rae/ckpt.pt --n 50000 --out runs/rae/samples.npz
Expected on a CPU (`shapes`, random-vit-s@56: 4 x 4 tokens of 384; train-decoder 6.0 min on 2 idle cores): psnr
29.4 dB against 7.9 dB for the decoder at initialisation, rFD 0.03 against 56.5 (pixel features). A random ViT keeps
enough of a 16 px image in 6,144 numbers to reconstruct it, stripes included. Stage 2 (1,000 steps, 9 min): DiT^DH
v-loss 0.29, pixel FD 7.4, against 0.89 and 11.8 for the plain DiT of equal parameters (--head none)."""
import math, os
from dataclasses import asdict, dataclass, field, replace

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
    encoder: str = "dinov2_vitb14_reg"  # frozen encoder (paper: DINOv2-B with registers, 224 px)
    cache_latents: bool = False     # encode the training set once (no flips); else the encoder runs every step
    # stage 1: the decoder
    dec_dim: int = 512              # ViT decoder width (paper: ViT-XL, 28 x 1152, for 256 px)
    dec_depth: int = 8
    dec_heads: int = 8
    noise_tau: float = 0.8          # noise augmentation s = tau U(0, 1) on z~ (paper: 0.8), training only
    perc_coeff: float = 1.0         # lambda_p of the encoder-feature perceptual term (paper: LPIPS at weight 1)
    # stage 2: DiT^DH
    hidden: int = 384               # trunk width (DiT-S; paper: DiT^DH-XL, 1152)
    depth: int = 12                 # trunk blocks
    heads: int = 6
    head: str = "wide"              # wide (DiT^DH) | none (the plain DiT of about the same size: the control)
    head_dim: int = 768             # head width (paper: 2048 on the 1152-wide XL trunk)
    head_depth: int = 2             # head blocks (paper: 2)
    head_heads: int = 12
    shift: float = 0.0              # a of the time shift; 0: sqrt(m / 4096) from the latent dimension m (paper)
    label_drop: float = 0.1         # class dropped to the null class for CFG (paper: 0.1)
    num_classes: int = 10           # filled in from the data
    sample_steps: int = 50          # Euler steps (paper: 50)
    cfg_scale: float = 1.0          # CFG scale (1: none; the paper's 1.51 is unguided)
    cfg_interval: list = field(default_factory=lambda: [0.0, 0.7])  # CFG where lo <= t <= hi (t = 1 noise)
    # the schedule of the command that runs (train-decoder: STAGE1 below)
    steps: int = 100_000            # optimiser steps
    batch_size: int = 256           # global batch size (paper: 1024 at 256 px)
    lr: float = 2e-4                # AdamW (0.9, 0.95), weight decay 0 (paper, stage 2; it warms up 40 epochs, then
                                    # decays linearly to 2e-5: constant here, as in the other files' short runs)
    warmup: int = 0                 # linear warm-up steps
    grad_clip: float = 1.0          # paper: 1
    ema: float = 0.9995             # paper: 0.9995 (with warm-up here)
    log_every: int = 50             # steps between log.jsonl rows
    sample_every: int = 5_000       # steps between grids (stage 1: reconstructions; stage 2: samples)
    ckpt_every: int = 2_500         # steps between checkpoints
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(data="shapes:1000", image_size=16, encoder="random-vit-s@28", cache_latents=True, dec_dim=64,
                 dec_depth=1, dec_heads=2, hidden=64, depth=1, heads=2, head_dim=96, head_depth=1, head_heads=2,
                 sample_steps=4, steps=20, batch_size=16, lr=1e-3, ema=0.9, log_every=1, sample_every=10,
                 ckpt_every=10),
    # 2-core CPU, under 10 min a stage: 4 x 4 random-ViT tokens of a 16 px image, encoded once (the ViT is the cost);
    # the head is as wide as a token (384), the trunk is not (128): the paper's case for the wide head
    "cpu": dict(data="shapes:10000", image_size=16, encoder="random-vit-s@56", cache_latents=True, dec_dim=128,
                dec_depth=4, dec_heads=4, perc_coeff=0.0, hidden=128, depth=4, heads=4, head_dim=384, head_depth=2,
                head_heads=6, sample_steps=20, steps=1000, batch_size=64, lr=5e-4, warmup=100, ema=0.999,
                sample_every=500, ckpt_every=500),
    # one GPU: CIFAR-10 32 px, DINOv2-B/14 with registers at 224 (16 x 16 x 768), DiT^DH-S
    "default": dict(),
}
STAGE1 = {  # the decoder's schedule, over the preset (train-decoder)
    "tiny": dict(),
    "cpu": dict(steps=3000, lr=1e-3, ema=0.999, sample_every=1000, ckpt_every=1000),  # 6.0 min; perc_coeff 0
    # in the preset: the perceptual term's backward through the ViT triples a step
    "default": dict(steps=50_000, batch_size=256, lr=2e-4, ema=0.999),
}
DEC_KEYS = ("data", "image_size", "encoder", "cache_latents")  # what stage 2 takes from the stage-1 run


# -------------------------------------------------------------------------------------------------------- backbone
def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding -> [grid*grid, dim] (half the channels for rows, half for columns)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    out = [torch.outer(p.flatten().float(), omega) for p in (yy, xx)]  # 2 x [N, dim/4]
    return torch.cat([torch.sin(out[0]), torch.cos(out[0]), torch.sin(out[1]), torch.cos(out[1])], 1)


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
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, hd]
        return self.proj(common.attention(q, k, v).transpose(1, 2).reshape(B, N, D))  # [B, h, N, hd] -> [B, N, D]


class Block(nn.Module):
    """Pre-LN transformer block; with `cond`, DiT's adaLN-zero from c, which is one vector per image [B, D] (the trunk)
    or one per token [B, N, D] (the head)."""

    def __init__(self, dim, heads, cond=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=not cond, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=not cond, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if cond else None

    def forward(self, x, c=None):
        if self.ada is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        m = self.ada(c)
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] if m.dim() == 2 else m).chunk(6, -1)  # 6 x [B, 1 or N, D]
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t [B] in [0, 1] -> [B, dim]
        f = torch.exp(-math.log(10000) * torch.arange(self.freq_dim // 2, device=t.device) / (self.freq_dim // 2))
        a = 1000 * t[:, None].float() * f[None]
        return self.mlp(torch.cat([a.cos(), a.sin()], 1))


class ViTDecoder(nn.Module):
    """MAE-style decoder: the N latent tokens [B, N, C] -> a ViT -> q x q pixel patches -> image [B, 3, H, W]."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.g = math.isqrt(n_tokens)
        self.q, D = cfg.image_size // self.g, cfg.dec_dim
        self.embed = nn.Linear(c, D)
        self.register_buffer("pos", sincos_2d(self.g, D)[None], persistent=False)  # [1, N, D]
        self.blocks = nn.ModuleList(Block(D, cfg.dec_heads, cond=False) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.out = nn.Linear(D, self.q * self.q * 3)

    def forward(self, z):
        B, g, q = z.shape[0], self.g, self.q
        h = self.embed(z) + self.pos
        for block in self.blocks:
            h = block(h)
        x = self.out(self.norm(h)).view(B, g, g, q, q, 3).permute(0, 5, 1, 3, 2, 4)  # [B, 3, g, q, g, q]
        return x.reshape(B, 3, g * q, g * q)


class DiTDH(nn.Module):
    """forward(x_t [B, N, C], t [B], y [B]) -> v [B, N, C]. The trunk is a DiT over the latent tokens (patch 1); the
    wide head reads a fresh embedding of x_t, with adaLN from s = silu(t_emb + trunk output), token by token."""

    def __init__(self, cfg, n_tokens, c, depth=None):
        super().__init__()
        D, self.cfg = cfg.hidden, cfg
        depth = depth or (cfg.depth if cfg.head == "wide" else plain_depth(cfg, n_tokens, c))
        self.x_embed = nn.Linear(c, D)
        self.register_buffer("pos", sincos_2d(math.isqrt(n_tokens), D)[None], persistent=False)  # [1, N, D]
        self.t_embed = TimestepEmbedder(D)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)  # last class = null
        self.blocks = nn.ModuleList(Block(D, cfg.heads) for _ in range(depth))
        Dh = cfg.head_dim if cfg.head == "wide" else D
        if cfg.head == "wide":
            self.head_embed = nn.Linear(c, Dh)  # the head's own embedding of x_t
            self.register_buffer("head_pos", sincos_2d(math.isqrt(n_tokens), Dh)[None], persistent=False)
            self.head_cond = nn.Linear(D, Dh)  # s -> the head's width
            self.head_blocks = nn.ModuleList(Block(Dh, cfg.head_heads) for _ in range(cfg.head_depth))
        self.norm_out = nn.LayerNorm(Dh, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(Dh, 2 * Dh))
        self.out = nn.Linear(Dh, c)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for b in list(self.blocks) + list(getattr(self, "head_blocks", [])):  # adaLN-zero
            nn.init.zeros_(b.ada[-1].weight)
            nn.init.zeros_(b.ada[-1].bias)
        for m in (self.ada_out[-1], self.out):  # zero output
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y):
        t_emb = self.t_embed(t)  # [B, D]
        c = t_emb + self.y_embed(y)  # the trunk's condition, one vector per image
        h = self.x_embed(x) + self.pos  # [B, N, D]
        for block in self.blocks:
            h = block(h, c)
        if self.cfg.head == "wide":
            s = self.head_cond(F.silu(t_emb[:, None] + h))  # the head's condition, one per token [B, N, Dh]
            h = self.head_embed(x) + self.head_pos  # [B, N, Dh]
            for block in self.head_blocks:
                h = block(h, s)
            c = s
        m = self.ada_out(c)
        sh, sc = (m[:, None] if m.dim() == 2 else m).chunk(2, -1)
        return self.out(modulate(self.norm_out(h), sh, sc))


def plain_depth(cfg, n_tokens, c):
    """Trunk blocks of the `--head none` control: the wide run's depth plus as many blocks as its head's parameters
    buy (counted on the meta device: nothing is allocated)."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        wide = DiTDH(replace(cfg, head="wide"), n_tokens, c)
        plain = DiTDH(replace(cfg, head="none"), n_tokens, c, depth=cfg.depth)
    return cfg.depth + max(1, round((count(wide) - count(plain)) / count(plain.blocks[0])))


# ---------------------------------------------------------------------------------------------------------- method
def latent(encoder, x, grad=False):
    """z = LN(E(x)): the frozen encoder's patch tokens, final LayerNorm without affine -> float [B, N, C]."""
    return encoder(x, affine=False, grad=grad)[1].float()


class RAEDecoder(nn.Module):
    """Stage 1. forward(x, z~, encoder) -> L (the decoder's loss); decode(z~) -> images. Holds the latent statistics
    (mu, sigma [N, C]), so a checkpoint carries everything stage 2 needs besides the encoder spec."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.cfg, self.net = cfg, ViTDecoder(cfg, n_tokens, c)
        self.register_buffer("mu", torch.zeros(n_tokens, c))
        self.register_buffer("sigma", torch.ones(n_tokens, c))

    def set_stats(self, z):  # z [M, N, C]: latents of training images
        self.mu.copy_(z.mean(0))
        self.sigma.copy_(z.std(0).clamp_min(1e-4))

    def normalize(self, z):
        return (z - self.mu) / self.sigma

    def denormalize(self, z):
        return z * self.sigma + self.mu

    def decode(self, z):
        return self.net(z)

    def forward(self, x, z, encoder=None):
        cfg, B = self.cfg, x.shape[0]
        if self.training:  # noise augmentation, s = tau u per image, on z = sigma z~ + mu (the official code's space)
            z = z + cfg.noise_tau * torch.rand(B, 1, 1, device=z.device) * torch.randn_like(z) / self.sigma
        x_hat = self.net(z).float()
        loss_l1 = (x_hat - x).abs().mean()
        self.last = dict(loss_l1=loss_l1.detach())
        if cfg.perc_coeff == 0 or encoder is None:
            return loss_l1
        with torch.no_grad():
            target = self.normalize(latent(encoder, x))
        loss_perc = ((self.normalize(latent(encoder, x_hat, grad=True)) - target) ** 2).mean()
        self.last["loss_perc"] = loss_perc.detach()
        return loss_l1 + cfg.perc_coeff * loss_perc


def time_shift(t, a):
    """t' = a t / (1 + (a - 1) t): a > 1 moves t towards the noise end (t = 1); a = 1 is the identity."""
    return a * t / (1 + (a - 1) * t)


class RAE(nn.Module):
    """Stage 2. forward(z~ [B, N, C], y) -> the flow-matching loss; sample(y) -> z~ (the stage-1 decoder decodes)."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.cfg, self.net, self.shape = cfg, DiTDH(cfg, n_tokens, c), (n_tokens, c)
        self.a = cfg.shift or math.sqrt(n_tokens * c / 4096)  # a = sqrt(m / 4096)

    def forward(self, z, y):
        cfg, B = self.cfg, z.shape[0]
        t = time_shift(torch.sigmoid(torch.randn(B, device=z.device)), self.a)  # logit-normal, then shifted
        y = torch.where(torch.rand(B, device=z.device) < cfg.label_drop, cfg.num_classes, y)  # null class for CFG
        e = torch.randn_like(z)
        x_t = (1 - t[:, None, None]) * z + t[:, None, None] * e
        return ((self.net(x_t, t, y).float() - (e - z)) ** 2).mean()

    def velocity(self, x, t, y, scale, interval):
        """v(x, t) with CFG inside lo <= t <= hi; t is a float shared by the batch."""
        B, cfg = x.shape[0], self.cfg
        tt = torch.full((B,), t, device=x.device)
        if scale != 1 and interval[0] <= t <= interval[1]:
            v = self.net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, cfg.num_classes)]))
            v_c, v_u = v.float().chunk(2)
            return v_u + scale * (v_c - v_u)
        return self.net(x, tt, y).float()

    @torch.no_grad()
    def sample(self, y, *, steps=None, scale=None, interval=None, generator=None):
        """Class labels y [B] -> normalised latents z~ [B, N, C], from noise at t = 1, in fp32."""
        cfg = self.cfg
        x = torch.randn((len(y), *self.shape), device=y.device, generator=generator)
        scale = cfg.cfg_scale if scale is None else scale
        v = lambda x, t: self.velocity(x, t, y, scale, interval or cfg.cfg_interval)
        return sample_euler(v, x, steps or cfg.sample_steps, self.a)


# ---------------------------------------------------------------------------------------------------------- sampler
def sample_euler(v, x, steps, a):
    """Euler on dx/dt = v(x, t) from t = 1 (noise) to 0 over the shifted grid shift(linspace(1, 0, steps + 1)). (The
    official grid, shift(1 - linspace(0, 0.999, steps)), stops at t = 0.007 after steps - 1 steps.)"""
    ts = time_shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64), a).tolist()
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * v(x, ts[i])
    return x


# ---------------------------------------------------------------------------------------------------- train / main
class Latents:
    """The latents of the training images: encoded once (cache_latents; then no flips) or by the encoder each step.
    batch(step) -> (z [B, N, C], x [B, 3, H, W] or None, y [B]); z is LN(E(x)), not yet normalised."""

    def __init__(self, cfg, encoder, d):
        self.cfg, self.encoder, self.d = cfg, encoder, d
        self.images, self.labels, cfg.num_classes = common.load_images(cfg.data, "train", cfg.image_size)
        self.cache = None
        check_grid(cfg, self.shape()[0])
        if cfg.cache_latents:
            fn = lambda x, i: latent(encoder, x).flatten(1)
            self.cache = common.extract(fn, self.images, d.device, desc="encode the training set").cpu()
            self.cache = self.cache.view(len(self.images), *self.shape())

    def shape(self):  # (N, C) of the latent
        with torch.no_grad():
            return latent(self.encoder, torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size,
                                                    device=self.d.device)).shape[1:]

    def batch(self, step, bs, need_images=False):
        cfg, d = self.cfg, self.d
        if self.cache is None or need_images:
            x, y = common.batch(self.images, self.labels, bs, cfg.seed, step, d.rank, self.cache is None, d.device)
        if self.cache is None:
            return latent(self.encoder, x), x, y
        z, y = common.batch(self.cache, self.labels, bs, cfg.seed, step, d.rank, flip=False, device=d.device)
        return z, (x if need_images else None), y

    def stats_sample(self, n=10_000):  # latents of up to n uniform training images, for mu and sigma
        if self.cache is not None:
            return self.cache[common.subset(len(self.cache), n)].to(self.d.device)
        fn = lambda x, i: latent(self.encoder, x).flatten(1)
        z = common.extract(fn, self.images[common.subset(len(self.images), n)], self.d.device, desc="latent stats")
        return z.view(len(z), *self.shape())


def make_config(args, stage1=False):
    presets = {k: {**v, **STAGE1[k]} for k, v in PRESETS.items()} if stage1 else PRESETS
    cfg = common.configure(Config, presets, args)
    if cfg.head not in ("wide", "none"):
        raise UsageError(f"head is wide or none (got {cfg.head!r})")
    if cfg.dec_dim % cfg.dec_heads or cfg.hidden % cfg.heads or cfg.head_dim % cfg.head_heads:
        raise UsageError("dec_dim, hidden and head_dim must be divisible by their heads")
    if min(cfg.noise_tau, cfg.perc_coeff, cfg.shift) < 0:
        raise UsageError("noise_tau, perc_coeff and shift must be >= 0")
    return cfg


def check_grid(cfg, n_tokens):
    g = math.isqrt(n_tokens)
    if g * g != n_tokens or cfg.image_size % g:
        raise UsageError(f"the encoder gives {n_tokens} tokens: a square grid dividing image_size {cfg.image_size} "
                         f"is needed (change @RES of --encoder or --image-size)")


def train_decoder(args):
    """Stage 1: the ViT decoder on the frozen encoder's normalised latent."""
    d, cfg, ckpt = common.start_run(args, Config, lambda a: make_config(a, stage1=True))
    encoder = common.load_encoder(cfg.encoder, d.device)
    data = Latents(cfg, encoder, d)
    n_tokens, c = data.shape()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (and in eval's "at initialisation")
    model = RAEDecoder(cfg, n_tokens, c).to(d.device)
    if ckpt is None:  # latent statistics, once
        model.set_stats(data.stats_sample())
    ema = common.Ema(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(f"RAE decoder {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {cfg.encoder}'s "
           f"{n_tokens} x {c} latent, {len(data.images)} images of {cfg.data}, step {step} -> {cfg.steps}, "
           f"{d.world} x {d.device}")
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world
    x_show = common.to_float(data.images[common.subset(len(data.images), 32)]).to(d.device)  # fixed, for the grids

    def loss_of(net, step):  # L1 (+ perceptual) on this rank's batch of `step`
        z, x, _ = data.batch(step, bs, need_images=True)
        with common.autocast(d.device):
            return net(x, model.normalize(z), encoder)

    log = common.Log(args.out, d, cfg, step, common.flops_per_image(lambda: loss_of(model, 0), bs, d))
    for step in log.steps(step, cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(step_model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        done = step + 1
        log(done, loss, lr=lr, **model.last)
        if d.master and common.due(done, cfg.sample_every, cfg.steps):  # rows: images, EMA reconstructions
            with torch.no_grad():
                rec = ema.model.decode(ema.model.normalize(latent(encoder, x_show))).clamp(-1, 1)
            common.save_grid(torch.cat([x_show, rec]), os.path.join(args.out, f"samples_{done:07d}.png"))
        if common.due(done, cfg.ckpt_every, cfg.steps):
            common.save_run(args.out, d, done, cfg, model, ema, opt)


def load_decoder(path, device, ckpt=None):
    """A stage-1 checkpoint (or a stage-2 one, which carries its decoder) -> (its Config, RAEDecoder in eval mode)."""
    ckpt = ckpt or common.load_checkpoint(path)
    sd, cfg = (ckpt["decoder"], ckpt["decoder_config"]) if "decoder" in ckpt else (ckpt.get("ema"), ckpt.get("config"))
    if not isinstance(sd, dict) or "mu" not in sd or not isinstance(cfg, dict):
        raise UsageError(f"{path} is not an rae.py checkpoint")
    cfg = common.config_of(Config, dict(config=cfg), path)
    dec = RAEDecoder(cfg, *sd["mu"].shape)
    try:
        dec.load_state_dict(sd)
    except RuntimeError as e:
        raise UsageError(f"{path}: the decoder does not match its config ({type(e).__name__})") from None
    return cfg, dec.to(device).eval()


def train(args):
    """Stage 2: DiT^DH (or the plain DiT) on the normalised latent of the stage-1 run's encoder."""
    if not (args.resume or args.decoder):
        raise UsageError("train needs --decoder DIR/ckpt.pt (a train-decoder run)")
    dec_cfg, decoder = load_decoder(os.path.join(args.out, "ckpt.pt") if args.resume else args.decoder, "cpu")
    # the stage-1 run's data and encoder, this run's generator and schedule
    gen_config = lambda a: replace(make_config(a), **{k: getattr(dec_cfg, k) for k in DEC_KEYS})
    d, cfg, ckpt = common.start_run(args, Config, gen_config)
    decoder = decoder.to(d.device)
    encoder = common.load_encoder(cfg.encoder, d.device)
    data = Latents(cfg, encoder, d)
    torch.manual_seed(cfg.seed)
    model = RAE(cfg, *decoder.mu.shape).to(d.device)
    ema = common.Ema(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = common.restore(ckpt, d, cfg.seed, model, ema, opt)
    print0(f"{'DiT^DH' if cfg.head == 'wide' else 'plain DiT'} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
           f"params, {len(model.net.blocks)} trunk blocks, shift a = {model.a:.2f}, step {step} -> {cfg.steps}, "
           f"{d.world} x {d.device}")
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world

    def loss_of(net, step):  # the flow-matching loss on this rank's batch of `step`
        z, _, y = data.batch(step, bs)
        with common.autocast(d.device):
            return net(decoder.normalize(z), y)

    log = common.Log(args.out, d, cfg, step, common.flops_per_image(lambda: loss_of(model, 0), bs, d))
    for step in log.steps(step, cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(step_model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        done = step + 1
        log(done, loss, lr=lr)
        if d.master and common.due(done, cfg.sample_every, cfg.steps):
            g = torch.Generator(d.device).manual_seed(cfg.seed)  # own generator: the training RNG stream is untouched
            y = torch.arange(min(64, 8 * cfg.num_classes), device=d.device) % cfg.num_classes
            x = decoder.decode(ema.model.sample(y, generator=g)).clamp(-1, 1)
            common.save_grid(x, os.path.join(args.out, f"samples_{done:07d}.png"))
        if common.due(done, cfg.ckpt_every, cfg.steps):  # the decoder travels with the generator
            common.save_run(args.out, d, done, cfg, model, ema, opt, decoder=decoder.state_dict(),
                            decoder_config=asdict(dec_cfg))


def load_any(args):
    """A stage-1 or stage-2 checkpoint -> (dist, ckpt, decoder cfg, decoder, RAE or None)."""
    d = common.setup_dist(args.device)
    ckpt = common.load_checkpoint(args.ckpt)
    dec_cfg, decoder = load_decoder(args.ckpt, d.device, ckpt)
    if "decoder" not in ckpt:
        return d, ckpt, dec_cfg, decoder, None
    model = RAE(common.config_of(Config, ckpt, args.ckpt), *decoder.mu.shape)
    try:
        model.load_state_dict(ckpt["ema"])
    except (KeyError, RuntimeError) as e:
        raise UsageError(f"{args.ckpt} is not an rae.py checkpoint ({type(e).__name__})") from None
    return d, ckpt, dec_cfg, decoder, model.to(d.device).eval()


def generate(decoder, model, n, args, d):
    """n class-balanced samples, split over the processes and gathered: images [n, 3, H, W] in [-1, 1]."""
    per = math.ceil(n / d.world)
    y = (torch.arange(per) + d.rank * per) % model.cfg.num_classes
    g = torch.Generator(d.device).manual_seed(args.seed * 1000 + d.rank)
    xs = [decoder.decode(model.sample(yb.to(d.device), steps=args.sample_steps, scale=args.cfg_scale,
                                      interval=args.cfg_interval, generator=g)).clamp(-1, 1)
          for yb in tqdm(y.split(args.batch), desc="sample", disable=not d.master)]
    return common.gather(torch.cat(xs), n, d)


def sample_cmd(args):
    d, ckpt, dec_cfg, decoder, model = load_any(args)
    if model is None:
        raise UsageError(f"{args.ckpt} is a stage-1 decoder: sample needs a `train` (stage 2) checkpoint")
    x = generate(decoder, model, args.n, args, d)
    if d.master:
        common.write_samples(args.out, x)


@torch.no_grad()
def reconstruct(decoder, encoder, images, device):
    """uint8 images -> their reconstructions D(z~(x)) in [-1, 1] (on the CPU)."""
    fn = lambda x, i: decoder.decode(decoder.normalize(latent(encoder, x))).clamp(-1, 1).flatten(1)
    return common.extract(fn, images, device, bs=100, desc="reconstruct").cpu().view(len(images), *images.shape[1:])


def psnr(a, b):  # mean PSNR (dB) of images in [-1, 1]
    return round((10 * torch.log10(4 / ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10))).mean().item(), 3)


def eval_cmd(args):
    d, ckpt, dec_cfg, decoder, model = load_any(args)
    data = args.data or dec_cfg.data
    encoder = common.load_encoder(dec_cfg.encoder, d.device)
    res = dict(step=ckpt["step"], data=data, encoder=dec_cfg.encoder, fd=None, fd_model=args.fd_model, n_samples=0)
    fd_net = common.FDFeatures(args.fd_model, d.device)
    if model is not None:
        x = generate(decoder, model, args.n, args, d)
    if not d.master:
        return
    if model is not None:
        res.update(head=model.cfg.head, fd=common.fd_to_train(fd_net, x, data, dec_cfg.image_size), n_samples=args.n,
                   sample_steps=args.sample_steps or model.cfg.sample_steps)
    x_tr, y_tr, x_te, y_te = common.probe_data(data, dec_cfg.image_size)
    torch.manual_seed(dec_cfg.seed)
    init = RAEDecoder(dec_cfg, *decoder.mu.shape).to(d.device).eval()  # train-decoder's initial weights: the floor
    init.load_state_dict({**init.state_dict(), "mu": decoder.mu, "sigma": decoder.sigma})
    x = common.to_float(x_te)
    rec, rec_init = reconstruct(decoder, encoder, x_te, d.device), reconstruct(init, encoder, x_te, d.device)
    res.update(psnr=psnr(rec, x), psnr_init=psnr(rec_init, x), n_rec=len(x),
               rfd=round(common.frechet_distance(*fd_net.stats(rec), *fd_net.stats(x)), 4),
               rfd_init=round(common.frechet_distance(*fd_net.stats(rec_init), *fd_net.stats(x)), 4))
    enc = lambda x, i: latent(encoder, x).mean(1)  # the latent, mean-pooled over tokens
    res.update(probe="the encoder's latent LN(E(x)), mean-pooled", **common.probes(
        common.extract(enc, x_tr, d.device, desc="latent"), y_tr, common.extract(enc, x_te, d.device), y_te, "", data))
    res.update(common.pixel_probes(x_tr, y_tr, x_te, y_te, data, d.device))  # the floor: pixels
    common.write_eval(args.ckpt, res)


def main(argv=None):
    p, sub = common.make_parser(__doc__, PRESETS)
    tr, sa, ev = sub.choices["train"], sub.choices["sample"], sub.choices["eval"]
    tr.add_argument("--decoder", help="the stage-1 checkpoint (DIR/ckpt.pt of train-decoder)")
    tr.add_argument("--head", choices=["wide", "none"], help="DiT^DH's wide head, or none: the plain DiT (control)")
    td = common.train_flags(sub.add_parser("train-decoder", help="stage 1: the ViT decoder of the frozen encoder"),
                            PRESETS)
    td.add_argument("--encoder", help="frozen encoder spec (default: the preset's; see common.load_encoder)")
    for s in (sa, ev):
        s.add_argument("--sample-steps", type=common.number(int), help="Euler steps (default: the run's)")
        s.add_argument("--cfg-scale", type=common.number(float, 0, strict=False), help="CFG scale (default: the run's)")
        s.add_argument("--cfg-interval", type=common.number(float, 0, strict=False), nargs=2,
                       help="CFG only for lo <= t <= hi (default 0 0.7)")
    ev.set_defaults(n=1000)
    args = p.parse_args(argv)
    {"train-decoder": train_decoder, "train": train, "sample": sample_cmd, "eval": eval_cmd}[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
