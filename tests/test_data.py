"""Data at scale: image folders decoded once into a memory-mapped cache, folders of .npy files,
ImageArray."""

import os

import numpy as np
import pytest
import torch

import common
import jit_xpred as J


def write_folder(root, n=6, size=12, classes=("a", "b"), seed=0):
    """-> the images in load order, uint8 [N,3,size,size] (class by class, files sorted)."""
    from PIL import Image

    rng, out = np.random.default_rng(seed), []
    for split in ("train", "test"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                im = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(im).save(root / split / c / f"{i:02d}.png")
                out += [im.transpose(2, 0, 1)] if split == "train" else []
    return torch.from_numpy(np.stack(out))


@pytest.fixture
def decodes(monkeypatch):
    """-> a list that records every image the cache decodes."""
    seen, read = [], common._read_image
    monkeypatch.setattr(
        common, "_read_image", lambda path, size: seen.append(path) or read(path, size)
    )
    return seen


# past load_images' in-process cache: what a new run would see
def load(spec, split="train", size=12):
    return common.load_images.__wrapped__(str(spec), split, size)


def cache_files(tmp_path):
    return sorted(f for f in os.listdir(os.environ["REPDIFF_CACHE"]) if f.endswith(".npy"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPDIFF_CACHE", str(tmp_path / "cache"))


def test_folder_is_decoded_once_then_memory_mapped(tmp_path, decodes):
    expected = write_folder(tmp_path / "f")
    x, y, k = load(tmp_path / "f")
    assert isinstance(x, common.ImageArray) and len(decodes) == 12 and k == 2
    assert torch.equal(x[torch.arange(12)], expected) and y.tolist() == [0] * 6 + [1] * 6
    x2, y2, _ = load(tmp_path / "f")  # a second start: no decoding, the same rows
    assert len(decodes) == 12 and torch.equal(x2[:], expected) and torch.equal(y2, y)
    load(tmp_path / "f", "test")  # the other split and another size are their own cache files
    load(tmp_path / "f", "train", 8)
    assert len(decodes) == 12 + 12 + 12 and len(cache_files(tmp_path)) == 3


def test_a_changed_folder_is_decoded_again(tmp_path, decodes):
    from PIL import Image

    write_folder(tmp_path / "f")
    load(tmp_path / "f")
    # a new image
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "f" / "train" / "b" / "99.png")
    x, y, _ = load(tmp_path / "f")
    assert len(decodes) == 25 and len(x) == 13 and y[-1] == 1 and x[-1].max() == 0
    # rewritten
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(
        tmp_path / "f" / "train" / "b" / "99.png"
    )
    # a different mtime, whatever the clock
    os.utime(tmp_path / "f" / "train" / "b" / "99.png", ns=(1, 1))
    x, _, _ = load(tmp_path / "f")
    assert len(decodes) == 38 and x[-1].min() == 7
    assert len(cache_files(tmp_path)) == 1  # rebuilt in place: one file per (folder, size, split)


@pytest.mark.parametrize("damage", ["truncate", "killed"])
def test_a_damaged_cache_is_rebuilt_never_read(tmp_path, decodes, damage, capsys):
    expected = write_folder(tmp_path / "f")
    load(tmp_path / "f")
    npy = os.path.join(os.environ["REPDIFF_CACHE"], cache_files(tmp_path)[0])
    if damage == "truncate":  # a copy cut short (a full disk, a killed rsync)
        os.truncate(npy, os.path.getsize(npy) - 100)
    else:  # decoding was killed (SIGKILL: no clean-up) before its file was renamed into place
        os.replace(npy, npy + ".tmp.npy")
    x, _, _ = load(tmp_path / "f")
    assert len(decodes) == 24 and torch.equal(x[:], expected)
    assert "decoding" in capsys.readouterr().err


def test_an_unreadable_image_names_itself_and_leaves_no_partial_cache(tmp_path):
    write_folder(tmp_path / "f")
    (tmp_path / "f" / "train" / "a" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(common.UsageError, match="zz.png"):
        load(tmp_path / "f")
    assert not [f for f in os.listdir(os.environ["REPDIFF_CACHE"]) if f.endswith(".npy")]


def test_npy_folder_batches_equal_in_memory_batches(tmp_path):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), rng.integers(0, 5, 50)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "train_images.npy", imgs)
    np.save(tmp_path / "d" / "train_labels.npy", labels)
    x, y, k = load(tmp_path / "d", "train", 8)
    assert (
        isinstance(x, common.ImageArray) and x.shape == (45, 3, 8, 8) and k == int(labels.max()) + 1
    )
    rows = common.split_rows(50, "train")  # no test_images.npy: the seeded 90/10 split
    ref_x, ref_y = (
        torch.from_numpy(imgs[rows].transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(labels[rows]),
    )
    for seed, step, rank in ((0, 0, 0), (0, 7, 1), (3, 2, 0)):
        a = common.batch(x, y, 16, seed, step, rank, flip=True, device="cpu")
        b = common.batch(ref_x, ref_y, 16, seed, step, rank, flip=True, device="cpu")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (
        torch.equal(x[-1], ref_x[-1])
        and torch.equal(x[2:5], ref_x[2:5])
        and torch.equal(x[3], ref_x[3])
    )
    with pytest.raises(IndexError):
        x[45]
    # another side: resized per batch exactly as an in-memory dataset is resized once
    x16 = load(tmp_path / "d", "train", 16)[0]
    assert x16.shape == (45, 3, 16, 16) and torch.equal(
        x16[[4, 0]], torch.from_numpy(common._resize(ref_x.numpy(), 16))[[4, 0]]
    )
    # its own test split, and MNIST-like single-channel images
    np.save(tmp_path / "d" / "test_images.npy", imgs[:7, :, :, :1])
    xt, yt, _ = load(tmp_path / "d", "test", 8)
    assert xt.shape == (7, 3, 8, 8) and torch.equal(xt[0][0], xt[0][2]) and yt.tolist() == [0] * 7


def test_bad_npy_folders_are_usage_errors(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.save(d / "train_images.npy", np.zeros((10, 8, 8, 3), np.float32))
    with pytest.raises(common.UsageError, match="expected uint8 images"):
        load(d)
    np.save(d / "train_images.npy", np.zeros((10, 8, 8, 3), np.uint8))
    np.save(d / "train_labels.npy", np.zeros(9, np.int64))
    with pytest.raises(common.UsageError, match="10 non-negative integer labels"):
        load(d)
    os.remove(d / "train_labels.npy")
    os.truncate(d / "train_images.npy", 500)  # a truncated copy: an error, not rows of garbage
    with pytest.raises(common.UsageError, match="cannot memory-map"):
        load(d)


def test_train_on_a_cached_folder_and_the_cache_flag(cli, tmp_path, capsys):
    write_folder(tmp_path / "f", size=16)
    cache = tmp_path / "elsewhere"
    argv = [
        "train",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--data",
        tmp_path / "f",
        "--image-size",
        16,
        "--steps",
        2,
    ]
    assert cli(J, [*argv, "--cache", cache, "--out", tmp_path / "run"]) == 0
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 1
    blocked = tmp_path / "file"
    blocked.write_text("")
    common.load_images.cache_clear()
    assert cli(J, [*argv, "--cache", blocked / "sub", "--out", tmp_path / "run2"]) == 2
    assert "--cache" in capsys.readouterr().err and not (tmp_path / "run2" / "ckpt.pt").exists()


def test_two_ranks_share_one_decode(torchrun, tmp_path):
    """torchrun, 2 CPU processes on one folder with no cache yet: the lock lets one rank decode; the
    other finds the finished file (one "decoding" line, one cache file), and both train on it."""
    write_folder(tmp_path / "f", size=16)
    argv = [
        "train",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--data",
        tmp_path / "f",
        "--image-size",
        16,
        "--steps",
        2,
        "--cache",
        tmp_path / "c",
        "--out",
        tmp_path / "run",
    ]
    r = torchrun("jit_xpred.py", argv, 29541)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        r.stderr.count("decoding") == 1
        and len([f for f in os.listdir(tmp_path / "c") if f.endswith(".npy")]) == 1
    )
    assert (tmp_path / "run" / "ckpt.pt").exists()


def test_npz_in_adms_layout(tmp_path, cli, capsys):
    """--data FILE.npz: `arr_0` uint8 [N, H, W, 3] (or [N, H, W, 1]) and optional `labels`, split
    90/10 by common.split_rows (the same rows every time, disjoint); a run trains on it; a file of
    another layout is one line and exit 2."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    path = tmp_path / "images.npz"
    np.savez(path, arr_0=images, labels=labels)
    (x_tr, y_tr, k), (x_te, y_te, _) = (load(str(path), s, 8) for s in ("train", "test"))
    rows_tr, rows_te = common.split_rows(40, "train"), common.split_rows(40, "test")
    assert (len(x_tr), len(x_te), k) == (36, 4, 4) and not set(rows_tr) & set(rows_te)
    assert torch.equal(x_tr, torch.from_numpy(images[rows_tr]).permute(0, 3, 1, 2))
    assert torch.equal(y_te, torch.from_numpy(labels[rows_te]))
    gray = tmp_path / "gray.npz"
    np.savez(gray, arr_0=images[..., :1])  # no labels: one class
    x_g, y_g, k_g = load(str(gray), "train", 8)
    assert torch.equal(x_g[:, 0], x_g[:, 2]) and k_g == 1 and int(y_g.max()) == 0
    run = ["train", "--preset", "tiny", "--image-size", 8, "--steps", 2, "--device", "cpu"]
    assert cli(J, [*run, "--data", path, "--out", tmp_path / "run"]) == 0
    bad = tmp_path / "float.npz"
    np.savez(bad, arr_0=images.astype(np.float32))
    capsys.readouterr()
    assert cli(J, [*run, "--data", bad, "--out", tmp_path / "bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected uint8 images" in err
