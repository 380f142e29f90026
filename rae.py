"""RAE: diffusion in the latent space of a frozen representation encoder (representation autoencoders).

Paper: B. Zheng, N. Ma, S. Tong, S. Xie, "Diffusion Transformers with Representation Autoencoders", 2025.
Claim: a frozen self-supervised encoder (DINOv2-B) with a trained ViT decoder is a better autoencoder for latent
diffusion than the SD-VAE: its latent is semantic, it reconstructs well (rFID 0.57), and a DiT with a shallow, wide
head (DiT^DH) trains in this wide latent to FID 1.51 at ImageNet 256 without guidance.

Stage 1 (`train-decoder`): the encoder stays frozen; the decoder D (ViT-MAE's, with a class token) trains on the raw z.
    z = LN(E(x))                 patch tokens after the final LayerNorm without its affine; class / registers dropped
    x^ = D(z + s n),  s = tau u,  u ~ U(0, 1),  n ~ N(0, I),  tau = 0.8        noise augmentation, training only
    L = |x^ - x|_1 + lambda_p |z~(x^) - z~(x)|^2     L1 on [0, 1] images; D predicts ImageNet-normalised pixels
    z~ = (z - mu) / sqrt(var + 1e-5)   per element (mu, var [N, C] of up to 10,000 training latents), for stage 2
The paper's L1 + LPIPS + an adaptive GAN (from epoch 8) becomes L1 + the distance of the frozen encoder's latents:
LPIPS needs downloaded VGG weights, and the GAN comes late. A ResNet encoder's map (a soda.py / decoupled_latent.py
export) has no LayerNorm and is taken as it is.

Stage 2 (`train --decoder DIR/ckpt.pt`): flow matching on z~ (t = 1 is noise)
    x_t = (1 - t) z~ + t e,  v = e - z~,  L = |v_theta(x_t, t, y) - v|^2
    t = shift(min(sigmoid(n), 0.999)),  n ~ N(0, 1),  shift(t) = a t / (1 + (a - 1) t),  a = sqrt(m / 4096),  m = N C
    DiT^DH: DDT blocks (adaLN-zero, RMSNorm, SwiGLU, 2-D RoPE); the trunk reads x_t (+ sin-cos positions) with
            c = silu(t_emb + y_emb), t_emb Gaussian Fourier -> s = silu(t_emb + trunk) per token; the head (2 blocks,
            2048 wide) reads its own embedding of x_t with adaLN from s, token by token
    sampler: Euler on dx/dt = v over shift(1 - linspace(0, 0.999, K)), CFG on an interval, in fp32
`--head none` is the plain DiT with as many more trunk blocks as match the head's parameters: the control for the
paper's claim that the wide head matters. a may be < 1 here (small latents; the official code asserts a >= 1).

Checked against bytetriper/RAE a4d18c4 (tests/reference/make_rae.py): DiT^DH (DDT.py), the decoder with the statistics
and the stage-1 L1 with its noise draws, the stage-2 loss with its draws (noise, t, label drop), the schedules, the
Euler sampler with CFG and its interval. The names are the official ones: the released DiT^DH-XL (ImageNet 256,
DINOv2-B; hf download nyu-visionx/RAE-collections --local-dir models) loads with strict=True (its keys tested), so
does the ViT-XL decoder if its file holds the module's keys (the official code loads it strict=False; not seen here):
    python -c "import rae; rae.from_official('models', 'runs/rae_xl')"
    python rae.py sample --ckpt runs/rae_xl/ckpt.pt --n 50000 --out runs/rae_xl/samples.npz       # 256 px
As the official training: fp32, the schedules below, clipping in stage 2 only, stage-1 images resized by 1.5 and
cropped at random (no flip), stage-2 images flipped (cached latents: neither); EMA here with common.Ema's warm-up.

Encoders (--encoder, common.load_encoder): dinov2_vitb14_reg (the paper's), a soda.py or decoupled_latent.py export,
or random-vit-s (offline); @RES sets the input size (224 by default: 16 x 16 tokens, one per 2 x 2 pixels at 32 px).

Commands (python rae.py {train-decoder,train,sample,eval} -h lists every flag):
    CPU smoke, seconds: python rae.py train-decoder --preset tiny --out runs/rae_dec_tiny --device cpu
    the claim on a CPU: python rae.py train-decoder --preset cpu --out runs/rae_dec                   # < 10 min
                        python rae.py eval --ckpt runs/rae_dec/ckpt.pt              # psnr against psnr_init, rFD
    generation on CPU:  python rae.py train --preset cpu --decoder runs/rae_dec/ckpt.pt --out runs/rae_gen
                        python rae.py eval --ckpt runs/rae_gen/ckpt.pt --n 1000     # + FD of samples
    one GPU:            python rae.py train-decoder --data cifar10 --out runs/rae_dec --compile
                        python rae.py train --decoder runs/rae_dec/ckpt.pt --out runs/rae --compile  # --head none
Expected on a CPU (`shapes`, random-vit-s@56: 4 x 4 tokens of 384; 2 cores shared with other jobs): train-decoder
7.8 min, psnr 30.1 dB against 10.1 dB at initialisation, rFD 0.028 against 56.9 (pixel features); stage 2 (1,000
steps, 15 min): DiT^DH v-loss 0.27, pixel FD 9.3 (1,000 samples), against 0.88 and 10.2 for --head none."""
import contextlib, math, os
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
    cache_latents: bool = False     # encode the training set once (no augmentation); else the encoder runs every step
    # stage 1: the decoder
    dec_dim: int = 512              # ViT decoder width (paper: ViT-XL, 28 x 1152, MLP 4096, for 256 px)
    dec_depth: int = 8
    dec_heads: int = 8
    dec_mlp: int = 0                # decoder MLP width; 0: 4 dec_dim
    noise_tau: float = 0.8          # noise augmentation s = tau U(0, 1) on z (paper: 0.8), training only
    perc_coeff: float = 1.0         # lambda_p of the encoder-feature perceptual term (paper: LPIPS at weight 1)
    # stage 2: DiT^DH
    hidden: int = 384               # trunk width (DiT^DH-S, as the official DiTDH-S config; paper's best: XL, 1152)
    depth: int = 12                 # trunk blocks
    heads: int = 6
    head: str = "wide"              # wide (DiT^DH) | none (the plain DiT of about the same size: the control)
    head_dim: int = 2048            # head width (paper: 2048 for every trunk)
    head_depth: int = 2             # head blocks (paper: 2)
    head_heads: int = 16
    shift: float = 0.0              # a of the time shift; 0: sqrt(m / 4096) from the latent dimension m (paper)
    label_drop: float = 0.1         # class dropped to the null class for CFG (paper: 0.1)
    num_classes: int = 10           # filled in from the data
    sample_steps: int = 50          # points of the Euler grid, steps - 1 steps (official: 50)
    cfg_scale: float = 1.0          # CFG scale (1: none; the paper's 1.51 is unguided)
    cfg_interval: list = field(default_factory=lambda: [0.0, 1.0])  # CFG where lo <= t <= hi (t = 1 noise; official)
    # the schedule of the command that runs (train-decoder: STAGE1 below); fractions of `steps` stand for epochs
    steps: int = 100_000            # optimiser steps
    batch_size: int = 256           # global batch size (paper: 1024 at 256 px)
    lr: float = 2e-4                # AdamW (0.9, 0.95), weight decay 0 (official)
    lr_final: float = 2e-5          # the end of the decay (official: 2e-5, both stages)
    warmup: float = 40 / 1400       # fraction of steps before the decay (official stage 2: 40 of 1400 epochs)
    warmup_from_zero: bool = False  # the warm-up rises from 0; else it holds lr (official: stage 1 yes, stage 2 no)
    decay: str = "linear"           # linear | cosine, from lr to lr_final (official: stage 2 linear, stage 1 cosine)
    decay_end: float = 800 / 1400   # fraction of steps where the decay ends (official stage 2: epoch 800 of 1400)
    grad_clip: float = 1.0          # 0: none (official: 1 in stage 2, none in stage 1)
    ema: float = 0.9995             # official: 0.9995 (stage 1: 0.9978); with common.Ema's warm-up here
    bf16: bool = False              # bf16 autocast (official default: fp32)
    log_every: int = 50             # steps between log.jsonl rows
    sample_every: int = 5_000       # steps between grids (stage 1: reconstructions; stage 2: samples)
    ckpt_every: int = 2_500         # steps between checkpoints
    seed: int = 0


PRESETS = {
    # seconds, for tests
    "tiny": dict(data="shapes:1000", image_size=16, encoder="random-vit-s@28", cache_latents=True, dec_dim=64,
                 dec_depth=1, dec_heads=2, hidden=64, depth=1, heads=2, head_dim=96, head_depth=1, head_heads=2,
                 sample_steps=4, steps=20, batch_size=16, lr=1e-3, lr_final=1e-3, ema=0.9, log_every=1,
                 sample_every=10, ckpt_every=10),
    # 2-core CPU, under 10 min a stage: 4 x 4 random-ViT tokens of a 16 px image, encoded once (the ViT is the cost);
    # the head is as wide as a token (384), the trunk is not (128): the paper's case for the wide head; the rate is
    # constant after a warm-up, as in the other files' short runs
    "cpu": dict(data="shapes:10000", image_size=16, encoder="random-vit-s@56", cache_latents=True, dec_dim=128,
                dec_depth=4, dec_heads=4, perc_coeff=0.0, hidden=128, depth=4, heads=4, head_dim=384, head_depth=2,
                head_heads=6, sample_steps=20, steps=1000, batch_size=64, lr=5e-4, lr_final=5e-4, warmup=0.1,
                warmup_from_zero=True, ema=0.999, sample_every=500, ckpt_every=500),
    # one GPU: CIFAR-10 32 px, DINOv2-B/14 with registers at 224 (16 x 16 x 768), DiT^DH-S (trunk 384, head 2048)
    "default": dict(),
}
STAGE1_SCHEDULE = dict(warmup=1 / 16, warmup_from_zero=True, decay="cosine", decay_end=1.0, grad_clip=0.0)  # official
STAGE1 = {  # the decoder's schedule, over the preset (train-decoder)
    "tiny": dict(STAGE1_SCHEDULE),
    "cpu": dict(STAGE1_SCHEDULE, steps=3000, lr=1e-3, lr_final=1e-3, ema=0.999, sample_every=1000, ckpt_every=1000),
    # perc_coeff 0 in the preset: the perceptual term's backward through the ViT triples a step
    "default": dict(STAGE1_SCHEDULE, steps=50_000, batch_size=256, lr=2e-4, ema=0.9978),
}
DEC_KEYS = ("data", "image_size", "encoder", "cache_latents")  # what stage 2 takes from the stage-1 run


# -------------------------------------------------------------------------------------------------------- backbone
def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding -> [grid*grid, dim] (MAE's: half the channels for columns, then rows)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    out = [torch.outer(p.flatten().double(), omega) for p in (xx, yy)]  # 2 x [N, dim/4]
    return torch.cat([torch.sin(out[0]), torch.cos(out[0]), torch.sin(out[1]), torch.cos(out[1])], 1).float()


class Rope(nn.Module):
    """2-D rotary position embedding (EVA's, as DDT.py): a head's first half of channels turns with the token's row,
    the second half with its column, in adjacent pairs."""

    def __init__(self, head_dim, grid):
        super().__init__()
        f = 1.0 / 10000 ** (torch.arange(0, head_dim // 2, 2)[: head_dim // 4].float() / (head_dim // 2))
        f = torch.outer(torch.arange(grid) / grid * grid, f).repeat_interleave(2, -1)  # [g, hd/2]: angle per pair
        f = torch.cat([f[:, None].expand(grid, grid, -1), f[None].expand(grid, grid, -1)], -1).flatten(0, 1)  # [N, hd]
        self.register_buffer("freqs_cos", f.cos())  # buffers of the official checkpoints
        self.register_buffer("freqs_sin", f.sin())

    def forward(self, x):  # [B, h, N, hd]
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # the pairs' two halves, [B, h, N, hd/2] each
        return x * self.freqs_cos + torch.stack([-x2, x1], -1).flatten(-2) * self.freqs_sin


def attend(q, k, v, heads, rope=None):
    """Multi-head attention of q, k, v [B, N, D] (RoPE on q and k) -> [B, N, D]."""
    B, N, D = q.shape
    q, k, v = (a.view(B, N, heads, D // heads).transpose(1, 2) for a in (q, k, v))  # [B, h, N, hd]
    q, k = (q, k) if rope is None else (rope(q), rope(k))
    return common.attention(q, k, v).transpose(1, 2).reshape(B, N, D)  # [B, h, N, hd] -> [B, N, D]


def modules(**kw):  # a container, for the official parameter names
    return nn.ModuleDict(kw)


class Block(nn.Module):
    """DDT's block: RMSNorm, attention with RoPE, SwiGLU (2/3 of 4 dim wide), adaLN-zero from c, which is one vector
    per image [B, 1, D] (the trunk) or one per token [B, N, D] (the head)."""

    def __init__(self, dim, heads, L=nn.Linear):
        super().__init__()
        self.heads, hidden = heads, int(2 / 3 * int(4.0 * dim))
        self.norm1, self.norm2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.attn = modules(qkv=L(dim, 3 * dim), proj=L(dim, dim))
        self.mlp = modules(w12=L(dim, 2 * hidden), w3=L(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), L(dim, 6 * dim))

    def forward(self, x, c, rope):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, -1)  # 6 x [B, 1 or N, D]
        x = x + g1 * self.attn.proj(attend(*self.attn.qkv(self.norm1(x) * (1 + sc1) + sh1).chunk(3, -1), self.heads,
                                           rope))
        a, b = self.mlp.w12(self.norm2(x) * (1 + sc2) + sh2).chunk(2, -1)
        return x + g2 * self.mlp.w3(F.silu(a) * b)  # SwiGLU


class PatchEmbed(nn.Module):  # a per-token Linear C -> dim, kept as the official 1 x 1 convolution (its shape)
    def __init__(self, c, dim):
        super().__init__()
        self.proj = nn.Conv2d(c, dim, 1)
        nn.init.xavier_uniform_(self.proj.weight.view(dim, c))  # as a Linear
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # [B, N, C] -> [B, N, dim]
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)


class TimestepEmbedder(nn.Module):  # Gaussian Fourier features of t in [0, 1] (fixed W ~ N(0, 1)) -> MLP
    def __init__(self, dim, n=256):
        super().__init__()
        self.register_buffer("W", torch.randn(n))  # a frozen parameter of the official checkpoints
        self.mlp = nn.Sequential(nn.Linear(2 * n, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # [B] -> [B, dim]
        a = t[:, None].float() * self.W[None] * 2 * math.pi
        return self.mlp(torch.cat([a.sin(), a.cos()], 1))


class MAELayer(nn.Module):
    """ViT-MAE's pre-LN block (LayerNorm eps 1e-12, exact GELU), with Hugging Face's parameter names."""

    def __init__(self, dim, heads, mlp, L=nn.Linear):
        super().__init__()
        self.heads = heads
        self.attention = modules(attention=modules(query=L(dim, dim), key=L(dim, dim), value=L(dim, dim)),
                                 output=modules(dense=L(dim, dim)))
        self.intermediate, self.output = modules(dense=L(dim, mlp)), modules(dense=L(mlp, dim))
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(dim, eps=1e-12), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):
        a, h = self.attention, self.layernorm_before(x)
        x = x + a.output.dense(attend(*(a.attention[n](h) for n in ("query", "key", "value")), self.heads))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ViTDecoder(nn.Module):
    """The official decoder (decoder.py's GeneralDecoder, its names): the N latent tokens [B, N, C] and a learnt class
    token -> a ViT -> q x q patches of ImageNet-normalised pixels -> [B, 3, H, W]."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.g = math.isqrt(n_tokens)
        self.q, D = cfg.image_size // self.g, cfg.dec_dim
        self.decoder_embed = nn.Linear(c, D)
        pos = torch.cat([torch.zeros(1, D), sincos_2d(self.g, D)])[None]  # [1, 1 + N, D]: the class token's is 0
        self.register_buffer("decoder_pos_embed", pos)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_layers = nn.ModuleList(MAELayer(D, cfg.dec_heads, cfg.dec_mlp or 4 * D)
                                            for _ in range(cfg.dec_depth))
        self.decoder_norm = nn.LayerNorm(D, eps=1e-12)
        self.decoder_pred = nn.Linear(D, self.q * self.q * 3)

    def forward(self, z):
        B, g, q = z.shape[0], self.g, self.q
        h = torch.cat([self.trainable_cls_token.expand(B, -1, -1), self.decoder_embed(z)], 1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            h = layer(h)
        x = self.decoder_pred(self.decoder_norm(h))[:, 1:].view(B, g, g, q, q, 3).permute(0, 5, 1, 3, 2, 4)  # B3gqgq
        return x.reshape(B, 3, g * q, g * q)


class DiTDH(nn.Module):
    """forward(x_t [B, N, C], t [B], y [B]) -> v [B, N, C]: DDT.py's DiTwDDTHead (its names; patch 1), or with
    head none the plain DiT: the trunk, then the final layer with c."""

    def __init__(self, cfg, n_tokens, c, depth=None):
        super().__init__()
        D, g, self.cfg = cfg.hidden, math.isqrt(n_tokens), cfg
        self.depth = depth or (cfg.depth if cfg.head == "wide" else plain_depth(cfg, n_tokens, c))
        self.s_embedder = PatchEmbed(c, D)  # the trunk's embedding of x_t
        self.register_buffer("pos_embed", sincos_2d(g, D)[None])  # [1, N, D]; a frozen parameter in DDT.py
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = modules(embedding_table=nn.Embedding(cfg.num_classes + 1, D))  # the last class: null
        self.enc_feat_rope = Rope(D // cfg.heads, g)
        blocks = [Block(D, cfg.heads) for _ in range(self.depth)]
        Dh = cfg.head_dim if cfg.head == "wide" else D
        if cfg.head == "wide":
            self.x_embedder = PatchEmbed(c, Dh)  # the head's own embedding of x_t
            self.s_projector = nn.Linear(D, Dh) if D != Dh else nn.Identity()  # s -> the head's width
            self.dec_feat_rope = Rope(Dh // cfg.head_heads, g)
            blocks += [Block(Dh, cfg.head_heads) for _ in range(cfg.head_depth)]
        self.blocks = nn.ModuleList(blocks)  # the trunk's, then the head's
        self.final_layer = modules(norm_final=nn.RMSNorm(Dh, eps=1e-6), linear=nn.Linear(Dh, c),
                                   adaLN_modulation=nn.Sequential(nn.SiLU(), nn.Linear(Dh, 2 * Dh)))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)  # Linears: PyTorch's init (official)
        for m in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                   self.final_layer.linear]:  # adaLN-zero, zero out
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y):
        t_emb = self.t_embedder(t)[:, None]  # [B, 1, D]
        c = F.silu(t_emb + self.y_embedder.embedding_table(y)[:, None])  # the trunk's condition, one per image
        h = self.s_embedder(x) + self.pos_embed  # [B, N, D]
        for block in self.blocks[:self.depth]:
            h = block(h, c, self.enc_feat_rope)
        if self.cfg.head == "wide":
            c = self.s_projector(F.silu(t_emb + h))  # s, the head's condition, one per token [B, N, Dh]
            h = self.x_embedder(x)  # [B, N, Dh], no positions: RoPE
            for block in self.blocks[self.depth:]:
                h = block(h, c, self.dec_feat_rope)
        f = self.final_layer  # adaLN without a gate, then a Linear
        sh, sc = f.adaLN_modulation(c).chunk(2, -1)
        return f.linear(f.norm_final(h) * (1 + sc) + sh)


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
    """Stage 1. forward(x, z, encoder) -> L (the decoder's loss, from the raw latent z); decode(z~) -> images in
    [-1, 1]. Holds the latent statistics (mu, sigma [N, C]), so a checkpoint carries everything stage 2 needs besides
    the encoder spec."""

    def __init__(self, cfg, n_tokens, c):
        super().__init__()
        self.cfg, self.net = cfg, ViTDecoder(cfg, n_tokens, c)
        self.register_buffer("mu", torch.zeros(n_tokens, c))
        self.register_buffer("sigma", torch.ones(n_tokens, c))

    def set_stats(self, z):  # z [M, N, C]: latents of training images
        self.mu.copy_(z.mean(0))
        self.sigma.copy_((z.var(0, unbiased=False) + 1e-5).sqrt())  # official: sqrt(var + eps), eps 1e-5

    def normalize(self, z):
        return (z - self.mu) / self.sigma

    def denormalize(self, z):
        return z * self.sigma + self.mu

    def pixels(self, z):
        """Raw latent z -> image in [-1, 1] (the network predicts ImageNet-normalised pixels)."""
        mean, std = (torch.tensor(v, device=z.device)[:, None, None]
                     for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))  # the encoder processor's
        return 2 * (self.net(z).float() * std + mean) - 1

    def decode(self, z):
        return self.pixels(self.denormalize(z))

    def forward(self, x, z, encoder=None):
        cfg, B = self.cfg, x.shape[0]
        if self.training:  # noise augmentation s n, s = tau u per image, on the raw z (official encode())
            z = z + cfg.noise_tau * torch.rand(B, 1, 1, device=z.device) * torch.randn_like(z)
        x_hat = self.pixels(z)
        loss_l1 = (x_hat - x).abs().mean() / 2  # = |x^ - x|_1 on [0, 1] images (official)
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
        cfg, (B, N, C) = self.cfg, z.shape
        e = torch.randn(B, C, N, device=z.device).transpose(1, 2)  # drawn in the official [B, C, h, w] layout
        n = math.sqrt(2) * torch.erfinv(2 * torch.rand(B, device=z.device) - 1)  # N(0, 1) as the official draws it
        t = time_shift(torch.sigmoid(n).clamp(max=0.999), self.a)[:, None, None]  # logit-normal, cut, shifted
        y = torch.where(torch.rand(B, device=z.device) < cfg.label_drop, cfg.num_classes, y)  # null class for CFG
        x_t = (1 - t) * z + t * e
        return ((self.net(x_t, t.flatten(), y).float() - (e - z)) ** 2).mean()

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
        cfg, (N, C) = self.cfg, self.shape
        x = torch.randn((len(y), C, N), device=y.device, generator=generator).transpose(1, 2).contiguous()  # official
        scale = cfg.cfg_scale if scale is None else scale
        v = lambda x, t: self.velocity(x, t, y, scale, interval or cfg.cfg_interval)
        return sample_euler(v, x, steps or cfg.sample_steps, self.a)


# ---------------------------------------------------------------------------------------------------------- sampler
def sample_euler(v, x, steps, a):
    """Euler on dx/dt = v(x, t) from t = 1 (noise) over the official grid shift(1 - linspace(0, 0.999, steps)) in
    float32: steps - 1 steps; the last ends at t = shift(0.001) (0.007 at a = 6.93), and that x is the sample."""
    ts = time_shift(1 - torch.linspace(0, 0.999, steps), a).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * v(x, t0)
    return x


# ---------------------------------------------------------------------------------------------------- train / main
class Latents:
    """The latents of the training images: encoded once (cache_latents: no augmentation) or by the encoder each step.
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

    def batch(self, step, bs, need_images=False, stage1=False):
        cfg, d = self.cfg, self.d
        if self.cache is None or need_images:
            aug = self.cache is None  # stage 1: resize and crop; stage 2: flip (official)
            x, y = common.batch(self.images, self.labels, bs, cfg.seed, step, d.rank, aug and not stage1, d.device)
            if aug and stage1:
                x = resize_crop(x, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 997 + d.rank + 1))
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


def resize_crop(x, g):
    """The official stage-1 augmentation: bicubic resize to 1.5 x the side, a random crop back to it, per image."""
    S, L = x.shape[-1], x.shape[-1] * 3 // 2
    x = F.interpolate(x, size=(L, L), mode="bicubic", align_corners=False).clamp(-1, 1)
    ij = torch.randint(L - S + 1, (len(x), 2), generator=g).tolist()
    return torch.stack([xb[:, i:i + S, j:j + S] for xb, (i, j) in zip(x, ij)])


DECAYS = {"linear": lambda p: p, "cosine": lambda p: (1 - math.cos(math.pi * p)) / 2}


def lr_at(cfg, step):
    """The official schedule (utils/optim_utils.py), epochs as fractions of the run: a warm-up (from 0, or holding
    lr), then a linear or cosine decay from lr to lr_final, reached at decay_end."""
    w, end = round(cfg.warmup * cfg.steps), round(cfg.decay_end * cfg.steps)
    if step < w:
        return cfg.lr * ((step + 1) / w if cfg.warmup_from_zero else 1.0)
    return cfg.lr + (cfg.lr_final - cfg.lr) * DECAYS[cfg.decay](min(1.0, (step - w) / max(end - w, 1)))


def precision(cfg, d):  # official default: fp32 (TF32 matmuls on a GPU, as common.setup_dist sets them)
    return common.autocast(d.device) if cfg.bf16 else contextlib.nullcontext()


def make_config(args, stage1=False):
    presets = {k: {**v, **STAGE1[k]} for k, v in PRESETS.items()} if stage1 else PRESETS
    cfg = common.configure(Config, presets, args)
    if cfg.head not in ("wide", "none"):
        raise UsageError(f"head is wide or none (got {cfg.head!r})")
    if cfg.dec_dim % cfg.dec_heads or cfg.hidden % (4 * cfg.heads) or cfg.head_dim % (4 * cfg.head_heads):
        raise UsageError("dec_dim must split into dec_heads; hidden, head_dim into heads of 4 k channels (RoPE)")
    if min(cfg.noise_tau, cfg.perc_coeff, cfg.shift, cfg.warmup, cfg.decay_end) < 0 or cfg.decay not in DECAYS:
        raise UsageError("noise_tau, perc_coeff, shift, warmup and decay_end must be >= 0; decay linear or cosine")
    return cfg


def check_grid(cfg, n_tokens):
    g = math.isqrt(n_tokens)
    if g * g != n_tokens or cfg.image_size % g:
        raise UsageError(f"the encoder gives {n_tokens} tokens: a square grid dividing image_size {cfg.image_size} "
                         f"is needed (change @RES of --encoder or --image-size)")


def train_decoder(args):
    """Stage 1: the ViT decoder on the frozen encoder's raw latent."""
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
        z, x, _ = data.batch(step, bs, need_images=True, stage1=True)
        with precision(cfg, d):
            return net(x, z, encoder)

    log = common.Log(args.out, d, cfg, step, common.flops_per_image(lambda: loss_of(model, 0), bs, d))
    for step in log.steps(step, cfg.steps):
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(step_model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(model, step)
        done = step + 1
        log(done, loss, lr=lr, **model.last)
        if d.master and common.due(done, cfg.sample_every, cfg.steps):  # rows: images, EMA reconstructions
            with torch.no_grad():
                rec = ema.model.pixels(latent(encoder, x_show)).clamp(-1, 1)
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
           f"params, {model.net.depth} trunk blocks, shift a = {model.a:.2f}, step {step} -> {cfg.steps}, "
           f"{d.world} x {d.device}")
    step_model = common.wrap(model, d, args.compile)
    bs = cfg.batch_size // d.world

    def loss_of(net, step):  # the flow-matching loss on this rank's batch of `step`
        z, _, y = data.batch(step, bs)
        with precision(cfg, d):
            return net(decoder.normalize(z), y)

    log = common.Log(args.out, d, cfg, step, common.flops_per_image(lambda: loss_of(model, 0), bs, d))
    for step in log.steps(step, cfg.steps):
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(step_model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
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


OFFICIAL = dict(data="imagenet", image_size=256, dec_dim=1152, dec_depth=28, dec_heads=16, dec_mlp=4096,
                hidden=1152, depth=28, heads=16, num_classes=1000)  # ViT-XL decoder, DiT^DH-XL, ImageNet 256


def from_official(root, out, n_tokens=256, c=768, **sizes):
    """The released RAE in ROOT (hf download nyu-visionx/RAE-collections --local-dir ROOT: the ViT-XL decoder, its
    statistics, DiT^DH-XL's EMA; DINOv2-B with registers) -> OUT/ckpt.pt for `sample` and `eval`; strict loads."""
    cfg, load = replace(Config(), **{**OFFICIAL, **sizes}), lambda path: torch.load(os.path.join(root, path), "cpu")
    dec, model = RAEDecoder(cfg, n_tokens, c), RAE(cfg, n_tokens, c)
    dec.net.load_state_dict(load("decoders/dinov2/wReg_base/ViTXL_n08/model.pt"))
    stats = load("stats/dinov2/wReg_base/imagenet1k/stat.pt")  # mean, var [C, h, w] -> [N, C]
    dec.mu.copy_(stats["mean"].flatten(1).T)
    dec.sigma.copy_((stats["var"] + 1e-5).sqrt().flatten(1).T)
    sd = load("DiTs/Dinov2/wReg_base/ImageNet256/DiTDH-XL/stage2_model.pt")
    model.net.load_state_dict(sd.get("ema", sd))
    os.makedirs(out, exist_ok=True)
    common.save_checkpoint(os.path.join(out, "ckpt.pt"), dict(step=0, config=asdict(cfg), ema=model.state_dict(),
                                                              decoder=dec.state_dict(), decoder_config=asdict(cfg)))


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
    fn = lambda x, i: decoder.pixels(latent(encoder, x)).clamp(-1, 1).flatten(1)
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
        s.add_argument("--sample-steps", type=common.number(int), help="Euler grid points (default: the run's)")
        s.add_argument("--cfg-scale", type=common.number(float, 0, strict=False), help="CFG scale (default: the run's)")
        s.add_argument("--cfg-interval", type=common.number(float, 0, strict=False), nargs=2,
                       help="CFG only for lo <= t <= hi (default: the run's)")
    ev.set_defaults(n=1000)
    args = p.parse_args(argv)
    {"train-decoder": train_decoder, "train": train, "sample": sample_cmd, "eval": eval_cmd}[args.cmd](args)


if __name__ == "__main__":
    common.cli(main)
