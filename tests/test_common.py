import math, os, urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def test_attention_matches_plain_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    assert torch.allclose(common.attention(q, k, v), ref, atol=1e-5)


def _blobs(n, d=32, classes=5):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g) * 4
    return centres[y] + torch.randn(n, d, generator=g), y


def test_probe_separable_and_shuffled():
    f, y = _blobs(1500)
    f_tr, y_tr, f_te, y_te = f[:1000], y[:1000], f[1000:], y[1000:]
    assert common.linear_probe(f_tr, y_tr, f_te, y_te) > 0.97
    assert common.knn_accuracy(f_tr, y_tr, f_te, y_te) > 0.97
    shuffled = y_tr[torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(0))]
    assert abs(common.linear_probe(f_tr, shuffled, f_te, y_te) - 0.2) < 0.08  # 5 classes: chance is 0.2
    assert abs(common.knn_accuracy(f_tr, shuffled, f_te, y_te) - 0.2) < 0.08


def test_frechet_distance():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (300, 3, 16, 16), dtype=np.uint8))
    fd_net = common.FDFeatures("pixels", torch.device("cpu"))
    assert abs(common.frechet_distance(*fd_net.stats(x), *fd_net.stats(x))) < 1e-6  # a set against itself
    assert torch.allclose(torch.from_numpy(fd_net.stats(x)[0]).float(), torch.from_numpy(fd_net.stats(x.float() / 127.5 - 1)[0]).float())
    # closed form for diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2
    mu1, mu2, s1, s2 = rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert common.frechet_distance(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2)) == pytest.approx(expected, rel=1e-9)
    # a full covariance: FD is invariant to a common rotation
    Q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    rot = common.frechet_distance(Q @ mu1, Q @ np.diag(s1 ** 2) @ Q.T, Q @ mu2, Q @ np.diag(s2 ** 2) @ Q.T)
    assert rot == pytest.approx(expected, rel=1e-6)


def test_shapes_deterministic_and_varied():
    a, la = common.render_shape(7, 32)
    b, lb = common.render_shape(7, 32)
    c, _ = common.render_shape(8, 32)
    assert a.dtype == np.uint8 and a.shape == (3, 32, 32) and la == lb and (a == b).all() and (a != c).any()
    labels = [common.render_shape(i, 16)[1] for i in range(500)]
    assert set(labels) == set(range(len(common.SHAPE_CLASSES)))
    x, y, k = common.load_images("shapes:500", "train", 24)
    assert x.shape == (500, 3, 24, 24) and x.dtype == torch.uint8 and k == 10
    assert torch.equal(x[3], torch.from_numpy(common.render_shape(3, 24)[0]))


def test_shapes_labels_are_learnable():
    """A small CNN learns the contour classes far above chance (10%): 72% after 600 steps at 16x16 (13 s on 2 cores)."""
    torch.manual_seed(0)
    x, y, _ = common.load_images("shapes:3000", "train", 16)
    xt, yt, _ = common.load_images("shapes:3000", "test", 16)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU()]
    net = nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
                        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for step in range(600):
        xb, yb = common.batch(x, y, 64, 0, step)
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xt.float() / 127.5 - 1).argmax(1) == yt).float().mean().item()
    assert acc > 0.5, acc


def test_batch_is_a_function_of_step():
    x, y = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous(), torch.arange(10)
    a, ya = common.batch(x, y, 8, seed=0, step=5)
    b, yb = common.batch(x, y, 8, seed=0, step=5)
    c, yc = common.batch(x, y, 8, seed=0, step=6)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(ya, yc)
    assert a.min() >= -1 and a.max() <= 1


def test_npz_and_folder_data(tmp_path):
    from PIL import Image
    imgs = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=imgs, labels=np.arange(20) % 4)
    x, y, k = common.load_images(str(tmp_path / "d.npz"), "train", 8)
    assert x.shape == (18, 3, 8, 8) and torch.equal(x[0], torch.from_numpy(imgs[0].transpose(2, 0, 1))) and k == 4
    assert common.load_images(str(tmp_path / "d.npz"), "test", 8)[0].shape[0] == 2
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / "f" / split / c)
            for i in range(3):
                Image.fromarray(imgs[i]).save(tmp_path / "f" / split / c / f"{i}.png")
    x, y, k = common.load_images(str(tmp_path / "f"), "test", 16)
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1] and k == 2


def test_bad_data_is_a_usage_error(monkeypatch):
    with pytest.raises(common.UsageError, match="unknown --data"):
        common.load_images("imagenet-nope", "train", 32)
    import torchvision.datasets

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(common.UsageError, match="--data shapes"):
        common.load_images.__wrapped__("cifar10", "train", 32)


def test_ema_update():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    ema = common.Ema(a, decay=0.9)
    expected = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    ema.update(b, step=1000)  # past the warm-up: d = 0.9
    assert torch.allclose(ema.model.weight, expected)
    ema.update(a, step=0)  # warm-up: d = 1/10
    assert torch.allclose(ema.model.weight, 0.1 * expected + 0.9 * a.weight.detach())


def test_checkpoint_roundtrip_and_errors(tmp_path):
    p = str(tmp_path / "c.pt")
    common.save_checkpoint(p, {"w": torch.ones(3), "config": {"a": 1, "iv": [0.1, 1.0]}, "rng": common.rng_state()})
    assert not os.path.exists(p + ".tmp")
    assert common.load_checkpoint(p)["config"]["iv"] == [0.1, 1.0]
    with pytest.raises(common.UsageError, match="no checkpoint"):
        common.load_checkpoint(str(tmp_path / "missing.pt"))
    open(p, "wb").write(b"not a checkpoint")
    with pytest.raises(common.UsageError, match="cannot read"):
        common.load_checkpoint(p)
