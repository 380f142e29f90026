import argparse
import math
import os
import urllib.error

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


def test_probes_do_not_depend_on_the_global_seed():
    f, y = _blobs(600, d=64, classes=10)
    # a hard, noisy probe
    f = f + 12 * torch.randn(f.shape, generator=torch.Generator().manual_seed(1))
    accs = set()
    for seed in range(3):
        torch.manual_seed(seed)
        accs.add(common.linear_probe(f[:400], y[:400], f[400:], y[400:], epochs=20))
    assert len(accs) == 1


def test_knn_weights_votes_by_similarity():
    # two neighbours of class 0 at similarity 0.6, one of class 1 at similarity 1: a majority vote
    # says 0, DINO's exp(sim / 0.07) weights say 1 (exp(1/0.07) > 2 exp(0.6/0.07))
    f_tr = torch.tensor([[0.6, 0.8], [0.6, -0.8], [1.0, 0.0]])
    y_tr = torch.tensor([0, 0, 1])
    assert (
        common.knn_accuracy(f_tr, y_tr, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), k=3) == 1.0
    )
    assert (
        common.knn_accuracy(f_tr, y_tr, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), k=3, T=100.0)
        == 0.0
    )


def test_probe_separable_and_shuffled():
    f, y = _blobs(1500)
    f_tr, y_tr, f_te, y_te = f[:1000], y[:1000], f[1000:], y[1000:]
    assert common.linear_probe(f_tr, y_tr, f_te, y_te) > 0.97
    assert common.knn_accuracy(f_tr, y_tr, f_te, y_te) > 0.97
    shuffled = y_tr[torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(0))]
    # 5 classes: chance is 0.2
    assert abs(common.linear_probe(f_tr, shuffled, f_te, y_te) - 0.2) < 0.08
    assert abs(common.knn_accuracy(f_tr, shuffled, f_te, y_te) - 0.2) < 0.08


def test_frechet_distance():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (300, 3, 16, 16), dtype=np.uint8))
    fd_net = common.FDFeatures("pixels", torch.device("cpu"))
    # a set against itself
    assert abs(common.frechet_distance(*fd_net.stats(x), *fd_net.stats(x))) < 1e-6
    mean_uint8, mean_float = fd_net.stats(x)[0], fd_net.stats(x.float() / 127.5 - 1)[0]
    assert torch.allclose(
        torch.from_numpy(mean_uint8).float(), torch.from_numpy(mean_float).float()
    )
    # pixels@S: SxS average pools; at the image's size, the pixels themselves
    full = common.FDFeatures("pixels@16", torch.device("cpu")).features(x)
    assert full.shape == (300, 768) and torch.equal(full, common.to_float(x).flatten(1).double())
    assert fd_net.features(x).shape == (300, 192)
    for bad in ("pixels@0", "pixels@x", "pixel"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.fd_model(bad)
    # closed form for diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2
    mu1, mu2, s1, s2 = (
        rng.normal(size=5),
        rng.normal(size=5),
        rng.uniform(0.5, 2, 5),
        rng.uniform(0.5, 2, 5),
    )
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert common.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(
        expected, rel=1e-9
    )
    # a full covariance: FD is invariant to a common rotation
    Q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    rot = common.frechet_distance(
        Q @ mu1, Q @ np.diag(s1**2) @ Q.T, Q @ mu2, Q @ np.diag(s2**2) @ Q.T
    )
    assert rot == pytest.approx(expected, rel=1e-6)


def test_shapes_deterministic_and_varied():
    a, la = common.render_shape(7, 32)
    b, lb = common.render_shape(7, 32)
    c, _ = common.render_shape(8, 32)
    assert (
        a.dtype == np.uint8
        and a.shape == (3, 32, 32)
        and la == lb
        and (a == b).all()
        and (a != c).any()
    )
    labels = [common.render_shape(i, 16)[1] for i in range(500)]
    assert set(labels) == set(range(len(common.SHAPE_CLASSES)))
    x, y, k = common.load_images("shapes:500", "train", 24)
    assert x.shape == (500, 3, 24, 24) and x.dtype == torch.uint8 and k == 10
    assert torch.equal(x[3], torch.from_numpy(common.render_shape(3, 24)[0]))


def test_shapes_labels_are_learnable():
    """A small CNN learns the contour classes far above chance (10%) in 200 steps at 16x16."""
    torch.manual_seed(0)
    x, y, _ = common.load_images("shapes:3000", "train", 16)
    xt, yt, _ = common.load_images("shapes:3000", "test", 16)

    def block(i, o):
        return [nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU()]

    net = nn.Sequential(
        *block(3, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for step in range(200):
        xb, yb = common.batch(x, y, 64, 0, step, 0, flip=True, device="cpu")
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xt.float() / 127.5 - 1).argmax(1) == yt).float().mean().item()
    assert acc > 0.3, acc


def test_batch_is_a_function_of_step_and_rank():
    x, y = (
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous(),
        torch.arange(10),
    )
    a, ya = common.batch(x, y, 8, 0, 5, 0, flip=True, device="cpu")
    b, yb = common.batch(x, y, 8, 0, 5, 0, flip=True, device="cpu")
    c, yc = common.batch(x, y, 8, 0, 6, 0, flip=True, device="cpu")
    r1, yr1 = common.batch(x, y, 8, 0, 5, 1, flip=True, device="cpu")
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(ya, yc)
    assert not torch.equal(ya, yr1)  # two ranks draw different rows at the same step
    # the rows of the labels, in [-1, 1]
    assert torch.equal(a[:, 0, 0, 0], common.to_float(x)[ya][:, 0, 0, 0])
    # flips: a left-right asymmetric image comes back flipped in about half of the draws
    img = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    img[..., 1] = 255
    one = torch.zeros(1, dtype=torch.long)
    flipped = [
        common.batch(img, one, 64, 0, s, 0, flip=True, device="cpu")[0][:, 0, 0, 0]
        for s in range(4)
    ]
    # the left pixel is bright only when flipped
    frac = (torch.cat(flipped) > 0).float().mean().item()
    assert 0.4 < frac < 0.6, frac
    assert torch.equal(
        common.batch(img, one, 64, 0, 0, 0, flip=False, device="cpu")[0][:, 0, 0, 0],
        torch.full((64,), -1.0),
    )


def test_to_float_and_to_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    f = common.to_float(x)
    assert f.min() == -1 and f.max() == 1
    assert np.array_equal(common.to_uint8(f), x.permute(0, 2, 3, 1).numpy())


def _write_folder(root, splits, classes, n, size=8):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = os.path.join(root, split, c) if split else os.path.join(root, c)
            os.makedirs(d)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    os.path.join(d, f"{i}.png")
                )


def test_npy_split_is_seeded_and_keeps_every_class(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "train_images.npy", imgs)
    np.save(tmp_path / "d" / "train_labels.npy", np.arange(100) // 10)  # written class by class
    x, y, k = common.load_images(str(tmp_path / "d"), "train", 8)
    xt, yt, kt = common.load_images(str(tmp_path / "d"), "test", 8)
    assert len(x) == 90 and len(xt) == 10 and k == kt == 10
    assert len(set(yt.tolist())) > 3  # not the last class alone
    rows = common.split_rows(100, "train")
    assert torch.equal(x[0], torch.from_numpy(imgs[rows[0]].transpose(2, 0, 1)))
    assert torch.equal(y, torch.from_numpy(rows // 10))
    assert not set(rows) & set(common.split_rows(100, "test"))


def test_image_folders(tmp_path):
    # train/ and test/, class-sorted on disk: probe_data draws uniform subsets, so every class is in
    # them
    _write_folder(tmp_path / "f", ["train", "test"], ["a", "b", "c", "d"], 5)
    x, y, k = common.load_images(str(tmp_path / "f"), "test", 16)
    assert (
        x.shape == (20, 3, 16, 16)
        and y.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
        and k == 4
    )
    x_tr, y_tr, x_te, y_te = common.probe_data(str(tmp_path / "f"), 16, n_train=8, n_test=8)
    assert (
        len(x_tr) == len(x_te) == 8
        and len(set(y_te.tolist())) >= 3
        and len(set(y_tr.tolist())) >= 3
    )
    # a class folder missing from test/, and a hidden folder: the ids still come from train/
    _write_folder(tmp_path / "g", ["train"], ["a", "b", "c"], 2)
    _write_folder(tmp_path / "g", ["test"], [".cache", "c"], 2)
    x, y, k = common.load_images(str(tmp_path / "g"), "test", 8)
    assert y.tolist() == [2, 2] and k == 3
    # a class that train/ does not have is an error, not a silent relabelling
    _write_folder(tmp_path / "h", ["train"], ["a"], 2)
    _write_folder(tmp_path / "h", ["test"], ["z"], 2)
    with pytest.raises(common.UsageError, match="class folder 'z'"):
        common.load_images(str(tmp_path / "h"), "test", 8)
    # one folder without train/ and test/: a seeded split, the test images are not training images
    _write_folder(tmp_path / "k", [""], ["a", "b"], 20)
    x, _, _ = common.load_images(str(tmp_path / "k"), "train", 8)
    xt, _, _ = common.load_images(str(tmp_path / "k"), "test", 8)
    assert len(x) == 36 and len(xt) == 4 and not any(torch.equal(a, b) for a in xt for b in x)
    # an unreadable image names itself
    (tmp_path / "f" / "test" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(common.UsageError, match="broken.png"):
        common.load_images(str(tmp_path / "f"), "test", 12)


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
    ema = common.Ema(a)
    expected = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    ema.update(b, 0.9)
    assert torch.allclose(ema.model.weight, expected)
    ema.update(a, 0.1)
    assert torch.allclose(ema.model.weight, 0.1 * expected + 0.9 * a.weight.detach())


def test_checkpoint_roundtrip_and_errors(tmp_path):
    p = str(tmp_path / "c.pt")
    common.save_checkpoint(
        p, {"w": torch.ones(3), "config": {"a": 1, "iv": [0.1, 1.0]}, "rng": common.rng_state()}
    )
    assert not os.path.exists(p + ".tmp")
    assert common.load_checkpoint(p)["config"]["iv"] == [0.1, 1.0]
    with pytest.raises(common.UsageError, match="no checkpoint"):
        common.load_checkpoint(str(tmp_path / "missing.pt"))
    open(p, "wb").write(b"not a checkpoint")
    with pytest.raises(common.UsageError, match="cannot read"):
        common.load_checkpoint(p)


class _FakeInception(torch.nn.Module):
    """The StyleGAN2-ADA network's interface: uint8 [N,3,H,W] in, 2048-d features out with
    return_features=True."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)  # [N, 48]
        return f.repeat(1, 43)[:, :2048] if return_features else f[:, :10]


def test_standard_fid_network_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    path = tmp_path / "hub" / "checkpoints" / "inception-2015-12-05.pt"
    with pytest.raises(common.UsageError, match=f"put {common.INCEPTION_URL} at {path}"):
        common.FDFeatures("inception", torch.device("cpu"))
    # a fresh machine's hub has no checkpoints/ folder yet
    assert os.path.isdir(tmp_path / "hub" / "checkpoints")
    torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    fd_net = common.FDFeatures("inception", torch.device("cpu"))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8))
    f = fd_net.features(x)
    # [-1, 1] -> uint8 exactly
    assert f.shape == (20, 2048) and torch.equal(fd_net.features(common.to_float(x)), f)


def test_fd_reference_statistics_are_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fd_net = common.FDFeatures("pixels", torch.device("cpu"))
    x, _, _ = common.load_images("shapes:300", "train", 16)
    # the training set itself
    assert common.fd_to_train(fd_net, x, "shapes:300", 16) == pytest.approx(0, abs=1e-6)
    fake = common.to_float(x[:100]).flip(2)  # other images: a positive distance
    fd = common.fd_to_train(fd_net, fake, "shapes:300", 16)
    assert fd > 0.01 and len(os.listdir(tmp_path / "repdiff_fd")) == 1
    monkeypatch.setattr(common, "load_images", lambda *a: pytest.fail("recomputed the reference"))
    assert common.fd_to_train(fd_net, fake, "shapes:300", 16) == fd  # read from the cache
    fd_net.spec = "pixels-other"  # another network (or size, or data) has its own statistics
    with pytest.raises(pytest.fail.Exception):
        common.fd_to_train(fd_net, fake, "shapes:300", 16)


def test_configure_types_set_values_from_the_config_fields():
    import argparse
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        steps: int = 10
        batch_size: int = 4
        lr: float = 1e-3
        image_size: int = 16
        ema: float = 0.9
        flag: bool = False
        sizes: list = dataclasses.field(default_factory=lambda: [1, 2])
        data: str = "shapes"

    presets = {"tiny": dict(steps=5)}
    args = argparse.Namespace(
        preset="tiny",
        steps=None,
        lr=2e-3,
        data=None,
        out="x",
        set=["flag=true", "sizes=1,2,4", "ema=0.99", "data=mnist"],
    )
    cfg = common.configure(Cfg, presets, args)
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.sizes, cfg.ema, cfg.data) == (
        5,
        2e-3,
        True,
        [1, 2, 4],
        0.99,
        "mnist",
    )
    for bad in (["nope=1"], ["flag=maybe"], ["steps=1.5"], ["ema"]):
        with pytest.raises(common.UsageError):
            common.configure(Cfg, presets, argparse.Namespace(preset="tiny", set=bad))


def test_scale_lr_follows_the_batch_unless_the_lr_is_given(capsys):
    import argparse
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        steps: int = 10
        batch_size: int = 256
        lr: float = 5e-5
        image_size: int = 32

    presets = {"default": {}, "paper": dict(batch_size=1024, lr=2e-4)}

    def run(preset=None, batch_size=None, lr=None, set=()):
        args = argparse.Namespace(preset=preset, batch_size=batch_size, lr=lr, set=list(set))
        return common.scale_lr(common.configure(Cfg, presets, args), args, Cfg, presets).lr

    assert run() == 5e-5 and run(preset="paper") == 2e-4  # the presets' own
    # JiT's rule: 5e-5 x batch / 256
    assert run(batch_size=1024) == pytest.approx(2e-4)
    assert "x 1024 / 256" in capsys.readouterr().out
    assert run(preset="paper", batch_size=256) == pytest.approx(5e-5)
    # an lr on the command line is taken as it is
    assert run(batch_size=1024, lr=1e-4) == 1e-4
    assert run(batch_size=1024, set=["lr=3e-4"]) == 3e-4


def test_fd_to_a_reference_in_adm_format(tmp_path):
    import argparse

    fd_net = common.FDFeatures("pixels", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    ref = torch.randint(0, 256, (50, 3, 16, 16), dtype=torch.uint8, generator=g)
    mu, sigma = fd_net.stats(ref)
    expected = round(common.frechet_distance(mu, sigma, *fd_net.stats(samples)), 4)
    nhwc = ref.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "images.npz", arr_0=nhwc)
    # ADM's reference batches: 2,048-d Inception statistics beside the images; for the 192-d
    # `pixels` features the images are measured
    np.savez(tmp_path / "adm.npz", arr_0=nhwc, mu=np.zeros(2048), sigma=np.eye(2048))
    for name in ("stats.npz", "images.npz", "adm.npz"):
        path = common.fd_ref(str(tmp_path / name))
        assert common.fd_to_ref(fd_net, samples, path) == expected, name
    assert common.fd_to_ref(fd_net, samples, None) is None
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(common.UsageError, match="holds no images"):
        common.fd_to_ref(fd_net, samples, str(tmp_path / "wide.npz"))
    # the parser's type: a readable .npz with mu and sigma or arr_0
    np.savez(tmp_path / "labels.npz", labels=np.zeros(3))
    (tmp_path / "text.npz").write_text("not a zip")
    for bad in ("labels.npz", "text.npz", "missing.npz"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.fd_ref(str(tmp_path / bad))


def test_detail_read_out_sees_the_stripes_of_real_images_and_not_of_blurred_ones():
    """The detail columns' ceiling and floor: the spectral read-out recovers the stripes' pattern
    (frequency, orientation) and amplitude (x the foreground's brightness) from the raw test images
    (R^2 0.716 and 0.391 at 16 px, measured); from the same images blurred (no stripes left), from
    another image's stripes or from a flat image it recovers nothing: 0, its floor, not an
    extrapolation below it (unclipped, the blurred images read -8.3)."""
    spec = "shapes:10000"
    x_tr, y_tr, x_te, y_te = common.probe_data(spec, 16, n_train=10, n_test=2000)
    x = common.to_float(x_te)
    real = common.detail(x, spec)
    assert real["detail_pattern"] > 0.65 and real["detail_amplitude"] > 0.3, real
    nothing = {"detail_pattern": 0.0, "detail_amplitude": 0.0}
    assert common.detail(common.gaussian_blur(x, 1.5), spec) == nothing
    # each image read against its neighbour's factors
    assert common.detail(x.roll(1, 0), spec) == nothing
    assert common.detail(torch.zeros_like(x), spec) == nothing  # a flat image
    # a milder blur keeps some of the pattern, less of the amplitude
    mild = common.detail(common.gaussian_blur(x, 1.0), spec)
    assert 0 < mild["detail_pattern"] < real["detail_pattern"]
    assert mild["detail_amplitude"] < real["detail_amplitude"]
    # the suffix, and None where there is nothing to read
    assert common.detail(None, spec, "_x") == {"detail_pattern_x": None, "detail_amplitude_x": None}
    assert common.detail(x, "cifar10") == {"detail_pattern": None, "detail_amplitude": None}
    # the amplitude's target: amp x the foreground's mean brightness, by hand for one image
    p = common.shape_params(0, 1, 1)
    pattern, amplitude = common.detail_targets(spec, "test")
    assert amplitude[0, 0].item() == pytest.approx(p["amp"] * p["fg"].mean(), rel=1e-6)
    assert pattern[0].tolist() == pytest.approx(
        [p["freq"], math.cos(2 * p["ang"]), math.sin(2 * p["ang"])], rel=1e-6
    )
    floors = common.pixel_probes(x_tr, y_tr, x_te, y_te, spec)
    assert floors["detail_pattern_pixels"] == real["detail_pattern"]
    assert floors["detail_amplitude_blurred"] == 0
