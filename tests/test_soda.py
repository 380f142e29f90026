import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import detail_bounded

import common
import soda as S

TINY = ["--preset", "tiny", "--device", "cpu"]


def _model(**kw):
    torch.manual_seed(0)
    m = S.SODA(S.Config(**dict(S.PRESETS["tiny"], **kw)))
    # give every block a non-trivial z-FiLM, and open the zero-initialised layers
    for blk in blocks(m):
        torch.nn.init.normal_(blk.z_film.weight)
        torch.nn.init.normal_(blk.conv2.weight, std=0.1)
    torch.nn.init.normal_(m.net.conv_out.weight, std=0.1)
    return m


def batchnorms(m):  # the encoder's BatchNorm layers (SyncBatchNorm included)
    return [b for b in m.encoder.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]


def blocks(m):  # the U-Net's residual blocks in forward order (down, middle, up)
    return [b for b in m.net.modules() if isinstance(b, S.ResBlock)]


def test_each_sub_vector_reaches_only_its_layers():
    m = _model()
    G = m.net.groups
    # tiny: ch_mult [1, 2], one block a level: down 0, down 1, the middle pair, up 1 (x2), up 0
    # (x2): mirrored groups
    assert G == 3 and [blk.group for blk in blocks(m)] == [0, 1, 2, 2, 1, 1, 0, 0]
    seen = {}  # the (z_s, z_b) each block's z-FiLM computes in a forward pass
    for blk in blocks(m):
        blk.z_film.register_forward_hook(
            lambda mod, inp, out: seen.setdefault(id(mod), []).append(out.clone())
        )
    z, keep, x_t, t = torch.randn(2, 12), torch.ones(2, G), torch.randn(2, 3, 16, 16), torch.rand(2)
    m.net(x_t, t, z, keep)
    for g in range(G):
        z2 = z.clone()
        z2[:, g * 4 : (g + 1) * 4] += 1.0  # change sub-vector g only
        m.net(x_t, t, z2, keep)
        for blk in blocks(m):
            assert (not torch.equal(seen[id(blk.z_film)][0], seen[id(blk.z_film)][-1])) == (
                blk.group == g
            ), g


def test_layer_masking_and_guidance():
    """A block whose group is masked (keep 0) does not see z at all; with every group masked the
    U-Net is the unconditional model, and eps mixes the two as (1 + w) eps(z) - w eps(no z)."""
    m = _model().eval()
    z, G = torch.randn(2, 12), m.net.groups
    keep = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    calls = []  # each block's inputs and output in one forward pass
    for blk in blocks(m):
        blk.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp, out)))
    m.net(torch.randn(2, 3, 16, 16), torch.rand(2), z, keep)
    other = torch.randn(2, 12).tensor_split(G, 1)  # another z
    for blk, (x, emb, _zs, k), out in calls[: len(blocks(m))]:
        same = (blk(x, emb, other, k) == out).flatten(1).all(1)  # [B]: the row did not see z
        assert same.tolist() == [keep[0, blk.group] == 0, True], blk.group
    x_t, w = torch.randn(2, 3, 16, 16), 0.3
    tt = torch.full((2,), 0.5)
    e_c, e_u = m.net(x_t, tt, z, torch.ones(2, G)), m.net(x_t, tt, z, torch.zeros(2, G))
    assert not torch.allclose(e_c, e_u)
    assert torch.allclose(m.eps(x_t, 0.5, z, w), (1 + w) * e_c - w * e_u, atol=1e-5)
    assert torch.allclose(m.eps(x_t, 0.5, z, 0.0), e_c, atol=1e-6)


def test_films_read_t_and_z_through_silu():
    """One block by hand: h = GN(conv1(SiLU(GN(x)))) (1 + s) + b with (s, b) = W SiLU(emb) + c, then
    h (1 + z_s) + z_b with (z_s, z_b) = W_z SiLU(z_group) + c_z (zero for a masked group); out =
    skip(x) + conv2(SiLU(h)). This equals FutureXiang's block (t_s h + t_b, then z_s h + z_b, each
    Linear after a SiLU) with 1 moved into the scale biases."""
    m = _model()

    def silu(v):
        return v * torch.sigmoid(v)

    z, keep = torch.randn(2, 12), torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    blk = blocks(m)[1]  # down level 1: 16 -> 32 channels, a 1x1 skip, group 1
    assert blk.group == 1
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 64)
    h = blk.conv1(silu(blk.norm1(x)))
    s, b = (silu(emb) @ blk.film.weight.T + blk.film.bias)[:, :, None, None].chunk(2, 1)
    # z_1, masked in row 0
    mod = (silu(z[:, 4:8]) @ blk.z_film.weight.T + blk.z_film.bias) * keep[:, 1:2]
    z_s, z_b = mod[:, :, None, None].chunk(2, 1)
    h = (blk.norm2(h) * (1 + s) + b) * (1 + z_s) + z_b
    torch.testing.assert_close(
        blk(x, emb, z.tensor_split(3, 1), keep), blk.skip(x) + blk.conv2(silu(h))
    )


def test_attention_feeds_sdpa_q_k_v_contiguous_in_their_last_dimension(monkeypatch):
    """The fused kernels of scaled_dot_product_attention (flash, memory-efficient) need stride 1 in
    the head dimension; q, k, v once came out of a transposed view (stride H*W there), which sends a
    GPU to the math path. The block by hand: x + proj(softmax(q k^T / sqrt(d)) v) over the
    positions."""
    blk = S.AttnBlock(32, heads=2)
    torch.nn.init.normal_(blk.proj.weight, std=0.1)
    seen, attention = [], common.attention
    monkeypatch.setattr(
        common, "attention", lambda q, k, v: seen.append((q, k, v)) or attention(q, k, v)
    )
    x = torch.randn(2, 32, 4, 4)
    out = blk(x)
    assert all(a.shape == (2, 2, 16, 16) and a.stride(-1) == 1 for a in seen[0])
    tok = blk.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    # [B, h, HW, d]
    q, k, v = (blk.qkv(tok).view(2, 16, 3, 2, 16)[:, :, i].transpose(1, 2) for i in range(3))
    a = torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v
    by_hand = x + blk.proj(a.transpose(1, 2).reshape(2, 16, 32)).transpose(1, 2).reshape(
        2, 32, 4, 4
    )
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=1e-5)


def test_default_preset_is_the_reimplementation_recipe():
    """The default (one-GPU CIFAR-10) preset: FutureXiang/soda's config/cifar10.yaml on its 4
    processes: U-Net ch_mult 1 2 2 2, z of 128 (here in 5 groups as evenly as goes), batch 4 x 128,
    lr 4 x 1e-4 for the U-Net and twice that for the encoder (with its head), AdamW (0.9, 0.95),
    weight decay 0.05, 800 epochs with 20 of warm-up."""
    cfg = S.make_config(
        common.make_parser(S.__doc__, S.PRESETS)[0].parse_args(["train", "--out", "x"])
    )
    assert (cfg.data, cfg.image_size, cfg.channels, cfg.ch_mult, cfg.num_res, cfg.attn_res) == (
        "cifar10",
        32,
        128,
        [1, 2, 2, 2],
        2,
        [16],
    )
    assert (cfg.encoder, cfg.res_width, cfg.res_layers, cfg.z_dim, cfg.dropout, cfg.z_drop) == (
        "resnet",
        64,
        [2, 2, 2, 2],
        128,
        0.1,
        0.1,
    )
    assert (cfg.guidance, cfg.sample_steps, cfg.grad_clip, cfg.ema, cfg.batch_size) == (
        0.3,
        100,
        1.0,
        0.9999,
        512,
    )
    assert cfg.steps * cfg.batch_size / 50_000 == pytest.approx(800, rel=0.01)
    assert cfg.warmup * cfg.batch_size / 50_000 == pytest.approx(20, rel=0.03)
    torch.manual_seed(0)
    model = S.SODA(cfg)
    assert model.net.groups == 5 and model.net.z_sizes == [26, 26, 26, 25, 25]
    assert [blk.z_film.in_features for blk in blocks(model)] == [
        [26, 26, 26, 25, 25][blk.group] for blk in blocks(model)
    ]
    opt = S.make_optimizer(model, cfg)
    enc = {id(p) for p in list(model.encoder.parameters()) + list(model.head.parameters())}
    net, encoder = opt.param_groups
    assert {id(p) for p in encoder["params"]} == enc and {id(p) for p in net["params"]} == {
        id(p) for p in model.net.parameters()
    }
    assert (net["lr"], encoder["lr"]) == (pytest.approx(4e-4), pytest.approx(8e-4))
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.05 for g in opt.param_groups)


def test_paper_preset_is_the_official_recipe(tmp_path):
    """`--preset paper` against FutureXiang/soda's CIFAR-10 run (config/cifar10.yaml under
    train.py on the README's 4 processes), value by value; then the lr follows --batch-size."""
    expected = dict(
        data="cifar10",  # FutureXiang/soda@79f9c0a config/cifar10.yaml:2 (dataset: 'cifar10')
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:11 (image_shape: [3, 32, 32])
        image_size=32,
        encoder="resnet",  # FutureXiang/soda@79f9c0a config/cifar10.yaml:6 (arch: 'resnet18')
        # FutureXiang/soda@79f9c0a model/encoder.py:12-13 (torchvision's resnet18: width 64,
        # blocks 2 2 2 2; the CIFAR stem, config/cifar10.yaml:8)
        res_width=64,
        res_layers=[2, 2, 2, 2],  # FutureXiang/soda@79f9c0a model/encoder.py:12-13 (resnet18)
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:7 (feature_dim: 128; z_channels, :18)
        z_dim=128,
        channels=128,  # FutureXiang/soda@79f9c0a config/cifar10.yaml:12 (n_channels: 128)
        ch_mult=[1, 2, 2, 2],  # FutureXiang/soda@79f9c0a config/cifar10.yaml:13 (ch_mults)
        num_res=2,  # FutureXiang/soda@79f9c0a config/cifar10.yaml:16 (n_blocks: 2)
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:14 (is_attn: [False, True, False, False]:
        # the 16 px level)
        attn_res=[16],
        dropout=0.1,  # FutureXiang/soda@79f9c0a config/cifar10.yaml:15 (dropout: 0.1)
        # FutureXiang/soda@79f9c0a datasets.py:132 (RandomResizedCrop(RES): torchvision's scale
        # (0.08, 1.0))
        source_scale=[0.08, 1.0],
        # FutureXiang/soda@79f9c0a datasets.py:145 (the same crop for the target)
        target_scale=[0.08, 1.0],
        # stand-ins, as the default preset, for FutureXiang/soda@79f9c0a datasets.py:135-137
        # (RandAugment, p 0.65), which this file lacks: SimCLR's colour jitter, grayscale, blur
        jitter=0.4,
        gray=0.2,  # stand-in for FutureXiang/soda@79f9c0a datasets.py:135-137 (RandAugment)
        blur=[0.1, 2.0],  # stand-in for FutureXiang/soda@79f9c0a datasets.py:135-137
        blur_prob=0.5,  # stand-in for FutureXiang/soda@79f9c0a datasets.py:135-137
        # FutureXiang/soda@79f9c0a README.md:39 (layer masking a TODO: all of z in every block,
        # model/decoder.py:67-69)
        mask_prob=0.0,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:24 (drop_prob: 0.1; model/SODA.py:150)
        z_drop=0.1,
        # FutureXiang/soda@79f9c0a model/SODA.py:163 (guide_w=0.3, as train.py:141 calls it)
        guidance=0.3,
        # FutureXiang/soda@79f9c0a model/SODA.py:37 (inverted_cosine_beta_schedule, s = 0.008:
        # the option commented out at config/cifar10.yaml:22; its :21 trains linear betas)
        schedule_s=0.008,
        # FutureXiang/soda@79f9c0a model/SODA.py:163 (ddim_sample steps=100, eta=0.0)
        sample_steps=100,
        # FutureXiang/soda@79f9c0a model/SODA.py:225-227 (x0 clipped to [-1, 1], eps re-derived)
        recompute_eps=True,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:36 (n_epoch: 800):
        # ceil(800 x 50,000 / 512) = 78,125
        steps=78_125,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:27 (batch_size: 128, a process) x
        # README.md:54 (--nproc_per_node=4)
        batch_size=512,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:28 (lrate: 1.0e-4) x train.py:65-67 (the
        # world size, 4)
        lr=4e-4,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:29 (lrate_ratio: 2; train.py:68, :83)
        enc_lr_ratio=2.0,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:32 (weight_decay: 0.05)
        weight_decay=0.05,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:34 (grad_clip_norm: 1; train.py:103)
        grad_clip=1.0,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:37 (warm_epoch: 20; train.py:82):
        # ceil(20 x 50,000 / 512) = 1,954
        warmup=1_954,
        # FutureXiang/soda@79f9c0a config/cifar10.yaml:39 (ema: 0.9999; each step, train.py:44)
        ema=0.9999,
    )
    cfg = S.Config(**S.PRESETS["paper"])
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert cfg.steps == math.ceil(800 * 50_000 / 512) and cfg.warmup == math.ceil(20 * 50_000 / 512)
    # everything else is the run's bookkeeping (and the ViT's sizes), as the default's
    default = S.Config()
    rest = {f for f in vars(cfg) if f not in expected}
    assert {f: getattr(cfg, f) for f in rest} == {f: getattr(default, f) for f in rest}
    # AdamW (0.9, 0.95): FutureXiang/soda@79f9c0a config/cifar10.yaml:30-33; the encoder at
    # twice the U-Net's lr
    model = torch.nn.Module()
    model.encoder, model.head, model.net = (torch.nn.Linear(2, 2) for _ in range(3))
    net, enc = S.make_optimizer(model, cfg).param_groups
    assert (net["lr"], enc["lr"]) == (pytest.approx(4e-4), pytest.approx(8e-4))
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.05 for g in (net, enc))
    # the lr follows the batch: 1e-4 a process of 128 (train.py:65-67), unless --lr is given
    parser = common.make_parser(S.__doc__, S.PRESETS)[0]
    for batch, lr in (("512", 4e-4), ("128", 1e-4), ("1024", 8e-4)):
        argv = ["train", "--preset", "paper", "--batch-size", batch, "--out", str(tmp_path)]
        cfg = S.make_config(parser.parse_args(argv))
        assert (cfg.batch_size, cfg.lr) == (int(batch), pytest.approx(lr))
    argv = ["train", "--preset", "paper", "--batch-size", "128", "--lr", "3e-4"]
    cfg = S.make_config(parser.parse_args([*argv, "--out", str(tmp_path)]))
    assert (cfg.batch_size, cfg.lr) == (128, 3e-4)


def test_views_differ_but_come_from_one_image():
    torch.manual_seed(0)
    x = -torch.ones(2, 3, 16, 16)
    # image 0 lives in the red channel, image 1 in the green one
    x[0, 0] = torch.rand(16, 16) * 2 - 1
    x[1, 1] = torch.rand(16, 16) * 2 - 1
    a, b = S.random_crops(x, [0.2, 1.0]), S.random_crops(x, [0.2, 1.0])
    for v in (a, b):  # every view is made of its own image only
        assert torch.allclose(v[0, 1:], torch.full_like(v[0, 1:], -1.0))
        assert torch.allclose(v[1, [0, 2]], torch.full_like(v[1, [0, 2]], -1.0))
    assert not torch.allclose(a, b) and not torch.allclose(a, x)  # and two views differ
    cfg = S.Config(**S.PRESETS["tiny"])
    j = S.source_view(x, cfg)
    assert j.shape == x.shape and j.min() >= -1 and j.max() <= 1 and not torch.allclose(j, x)
    # grayscale alone
    cfg.source_scale, cfg.jitter, cfg.gray, cfg.blur_prob = [1.0, 1.0], 0.0, 1.0, 0.0
    torch.manual_seed(1)
    g = S.source_view(x, cfg)
    torch.manual_seed(1)  # the crop is drawn first: the same crop
    crop = S.random_crops(x, cfg.source_scale)
    # every channel is the mean
    assert torch.allclose(g, crop.mean(1, keepdim=True).expand_as(g), atol=1e-6)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(S.random_crops(flat, [0.2, 1.0]), flat)


def test_inverted_cosine_schedule():
    t = torch.tensor([0.0, 0.5, 1.0])
    a = S.abar(t, 0.008)
    # clamped at t = 1
    assert a[0].item() == pytest.approx(1.0) and a[2].item() == pytest.approx(1e-4)
    # = 0.496
    assert a[1].item() == pytest.approx(2 * 1.008 / np.pi * np.arccos(np.sqrt(0.5)) - 0.008)


def test_ddim_clamps_x0_and_optionally_recomputes_eps():
    """Two DDIM steps by hand with a constant eps prediction that drives x0 out of [-1, 1]: x0 is
    clamped, and the step to t_next uses the model's eps or, with recompute_eps, the noise
    consistent with the clamped x0, eps' = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    for recompute in (False, True):
        m = _model(recompute_eps=recompute)
        m.eps = lambda x_t, t, z, w: torch.full_like(x_t, -0.5)
        out = m.sample(
            torch.zeros(2, m.cfg.z_dim), steps=2, generator=torch.Generator().manual_seed(0)
        )
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        for t, t_next in ((1.0, 0.5), (0.5, 0.0)):
            a, a_next = (
                S.abar(torch.tensor(t), m.cfg.schedule_s),
                S.abar(torch.tensor(t_next), m.cfg.schedule_s),
            )
            x0 = ((x + 0.5 * (1 - a).sqrt()) / a.sqrt()).clamp(-1, 1)
            e = (x - a.sqrt() * x0) / (1 - a).sqrt() if recompute else torch.full_like(x, -0.5)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e
        assert (x0.abs() == 1).float().mean() > 0.05  # the clamp was active
        assert torch.allclose(out, x0, atol=1e-5), recompute


def test_sampler_never_waits_on_the_device():
    """DDIM's schedule is Python floats computed once, and every tensor of the loop is made on z's
    device: on the meta device (where .item() raises) the sampler runs, and the only CPU work is the
    schedule's, the same for 2 and 5 steps. It once read t back with .item() and built the guidance
    mask on the CPU at every step."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class CpuOps(TorchDispatchMode):  # records the ops whose outputs land on the CPU
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ops.extend(
                str(func)
                for o in tree_leaves(out)
                if isinstance(o, torch.Tensor) and o.device.type == "cpu"
            )
            return out

    m, counts = _model().eval().to("meta"), []
    for steps in (2, 5):
        ops = []
        with CpuOps():
            x = m.sample(torch.zeros(2, 12, device="meta"), steps=steps)
        assert x.device.type == "meta" and x.shape == (2, 3, 16, 16)
        counts.append(len(ops))
    assert counts[0] == counts[1] <= 8, counts


def test_every_parameter_takes_part_in_the_loss():
    """DDP (find_unused_parameters off) stops at step 2 on a parameter without a gradient; the
    released ViT layout's mask_token is a buffer for this reason. Dropping all of z (z_drop = 1)
    still reaches every parameter."""
    for kw in ({}, dict(z_drop=1.0, mask_prob=1.0), dict(attn_res=[8])):
        m = _model(**kw)
        m(torch.rand(4, 3, 16, 16) * 2 - 1).backward()
        assert [n for n, p in m.named_parameters() if p.grad is None] == [], kw


def test_the_encoder_gets_sync_batchnorm_under_cuda_ddp(monkeypatch):
    """On GPUs each process's BatchNorm would see its own 128 of FutureXiang's 512: common.wrap
    converts the ResNet's BatchNorm layers to SyncBatchNorm (a global batch's statistics), in place,
    keeping the parameters the optimiser and the EMA hold; on CPU processes (gloo) it keeps
    BatchNorm. DDP itself is stubbed: no process group here."""
    from types import SimpleNamespace

    monkeypatch.setattr(
        torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids: model
    )
    for dev, norm in (("cuda:0", torch.nn.SyncBatchNorm), ("cpu", torch.nn.BatchNorm2d)):
        m = _model()
        params, ema, n = list(m.parameters()), common.Ema(m), len(batchnorms(m))
        step_model = common.wrap(m, SimpleNamespace(world=2, device=torch.device(dev)))
        assert n > 0 and [type(b) for b in batchnorms(step_model)] == [norm] * n, dev
        assert step_model is m and all(a is b for a, b in zip(params, m.parameters(), strict=True))
        # the EMA (plain BatchNorm) matches key for key
        assert list(ema.model.state_dict()) == list(m.state_dict())


def test_sample_grids_only_at_multiples_of_sample_every(cli, tmp_path, monkeypatch):
    """A grid costs grid x sample_steps x 2 network calls: a run draws one only at the multiples of
    sample_every (none at an end that is not one), with the run's own DDIM steps; grid=0 draws
    none."""
    calls, sample = [], S.SODA.sample

    def spy(self, z, **k):
        calls.append((len(z), k.get("steps")))
        return sample(self, z, **k)

    monkeypatch.setattr(S.SODA, "sample", spy)
    # sample_every 10: one grid, at 10
    assert cli(S, ["train", *TINY, "--steps", 13, "--out", tmp_path / "a"]) == 0
    assert sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".png")) == [
        "samples_0000010.png"
    ]
    assert calls == [(64, None)]  # 64 views (each beside its source) with cfg.sample_steps
    assert (
        cli(
            S,
            [
                "train",
                *TINY,
                "--steps",
                3,
                "--set",
                "grid=8",
                "--set",
                "sample_every=3",
                "--out",
                tmp_path / "b",
            ],
        )
        == 0
    )
    assert calls[1:] == [(8, None)]
    assert cli(S, ["train", *TINY, "--steps", 10, "--set", "grid=0", "--out", tmp_path / "c"]) == 0
    assert len(calls) == 2 and not any(f.endswith(".png") for f in os.listdir(tmp_path / "c"))


def test_sample_and_export(cli, tmp_path):
    a = tmp_path / "a"
    assert cli(S, ["train", *TINY, "--steps", 3, "--out", a]) == 0
    assert (
        cli(
            S,
            [
                "sample",
                "--ckpt",
                a / "ckpt.pt",
                "--n",
                6,
                "--batch",
                4,
                "--sample-steps",
                3,
                "--out",
                tmp_path / "s.npz",
            ],
        )
        == 0
    )
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8 and arr.std() > 0
    assert os.path.isfile(tmp_path / "s.png")
    # the sources: a uniform subset of the test split, starting over past its end; its first rows
    # are probe_data's
    x_te = common.load_images("shapes:2000", "test", 16)[0]
    src = S.sources("shapes:2000", 16, len(x_te) + 5)
    assert torch.equal(src[:6], x_te[common.subset(len(x_te), 6)]) and torch.equal(
        src[-5:], src[:5]
    )
    assert torch.equal(src[: len(x_te)], common.probe_data("shapes:2000", 16)[2])
    # export -> common.load_encoder gives the trained encoder's global token
    assert cli(S, ["export-encoder", "--ckpt", a / "ckpt.pt", "--out", tmp_path / "enc.pt"]) == 0
    enc = common.load_encoder(str(tmp_path / "enc.pt"))
    ckpt = torch.load(a / "ckpt.pt", weights_only=True)
    # BatchNorm: running statistics, as the frozen encoder
    model = S.SODA(S.Config(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["ema"])
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        g_ref = model.encoder(((x + 1) / 2 - model.mean) / model.std)[0]
    # the ResNet layout
    assert enc.resolution is None and torch.allclose(enc(x)[0], g_ref, atol=1e-4)
    v = tmp_path / "vit"  # the ViT option exports the DINOv2 layout, read at the run's image size
    assert cli(S, ["train", *TINY, "--steps", 2, "--set", "encoder=vit", "--out", v]) == 0
    assert cli(S, ["export-encoder", "--ckpt", v / "ckpt.pt", "--out", v / "enc.pt"]) == 0
    enc = common.load_encoder(str(v / "enc.pt"))
    assert (
        isinstance(enc.net, common.DinoViT)
        and enc.resolution == 16
        and enc(x)[1].shape == (3, 16, 64)
    )


def test_eval_of_a_trained_model_beats_its_start(cli, tmp_path, few_probe_images):
    """A few tens of steps make the generated views closer to their sources (PSNR) and to the data
    (FD) than one step, where the zero-initialised U-Net still predicts eps = 0 and the views are
    saturated noise."""
    few_probe_images(400, 200)
    res = {}
    for steps in (1, 60):
        out = tmp_path / str(steps)
        assert (
            cli(S, ["train", *TINY, "--steps", steps, "--set", "sample_every=1000", "--out", out])
            == 0
        )
        assert cli(S, ["eval", "--ckpt", out / "ckpt.pt", "--n", 64]) == 0
        res[steps] = json.load(open(out / "eval.json"))
    start, trained = res[1], res[60]
    assert trained["step"] == 60 and trained["n_samples"] == 64 and trained["fd_model"] == "pixels"
    assert trained["probe"] == "z, the encoder's compact latent"
    assert trained["psnr"] > start["psnr"] + 1.0, (trained["psnr"], start["psnr"])
    assert trained["fd"] < 0.9 * start["fd"], (trained["fd"], start["fd"])
    # the floor is the same network at initialisation, whatever the run's length
    assert (trained["probe_linear_init"], trained["probe_knn_init"]) == (
        start["probe_linear_init"],
        start["probe_knn_init"],
    )
    assert all(
        0.0 <= trained[k] <= 1.0
        for k in (
            "probe_linear",
            "probe_knn",
            "probe_linear_init",
            "probe_knn_init",
            "probe_linear_l2",
            "probe_linear_init_l2",
            "probe_knn_uniform",
            "probe_knn_init_uniform",
        )
    )
    # data and seed alone
    assert trained["psnr_crop"] == start["psnr_crop"] and 5 < trained["psnr_crop"] < 40
    # the stripes kept in x_0 estimated from the test images with a third noise: bounded by 0 and
    # the images' own
    for res in (start, trained):
        detail_bounded(res)
        detail_bounded(res, "_init")
    assert [f for f, _ in trained["probe_linear_by_signal"]] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert all(0.0 <= acc <= 1.0 for _, acc in trained["probe_linear_by_signal"])


@pytest.mark.parametrize("signal", [0.1, 0.5, 0.9])
def test_signal_fraction_inverts_the_schedule(signal):
    # abar(t) at the t found: sqrt(abar) / (sqrt(abar) + sqrt(1 - abar)) is the signal asked for
    t = S.t_at_signal(signal, 0.008)
    a = S.abar(torch.tensor(t, dtype=torch.float64), 0.008).item()
    assert a**0.5 / (a**0.5 + (1 - a) ** 0.5) == pytest.approx(signal, abs=1e-9)
    # half signal: abar = 1/2, at t = cos^2((1/2 + s) pi / (2 (1 + s)))
    assert S.t_at_signal(0.5, 0.0) == pytest.approx(0.5)


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(S, ["train", *TINY, "--image-size", 17, "--out", tmp_path / "x"]) == 2
    assert "not divisible by the U-Net's 2" in capsys.readouterr().err
    assert (
        cli(
            S, ["train", *TINY, "--image-size", 18, "--set", "encoder=vit", "--out", tmp_path / "x"]
        )
        == 2
    )
    assert "divisible by the patch (4)" in capsys.readouterr().err
    assert cli(S, ["train", *TINY, "--set", "encoder=conv", "--out", tmp_path / "x"]) == 2
    assert "resnet or vit" in capsys.readouterr().err
    # fewer dims than the 3 groups
    assert cli(S, ["train", *TINY, "--set", "z_dim=2", "--out", tmp_path / "x"]) == 2
    assert "z_dim (2) must be at least the 3 groups" in capsys.readouterr().err
    assert cli(S, ["train", *TINY, "--set", "grid=-1", "--out", tmp_path / "x"]) == 2
    assert "grid (-1) must be >= 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
    assert (
        cli(S, ["sample", "--ckpt", tmp_path / "none.pt", "--n", 0, "--out", tmp_path / "s.npz"])
        == 2
    )
    assert "--n" in capsys.readouterr().err
    assert (
        cli(S, ["export-encoder", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "e.pt"]) == 2
    )
    assert "no checkpoint" in capsys.readouterr().err


def test_z_carries_what_the_denoiser_uses():
    """The bottleneck works: on 16 images of 8 x 8, z from the encoder lowers the denoising loss
    against no z (all groups masked; measured 0.74 of it at 300 steps, 0.62 at 600). (The
    class-probe gain is measured by the cpu preset, 8 minutes: see the README.)"""
    cfg = S.Config(
        **dict(
            S.PRESETS["tiny"],
            data="shapes:16",
            image_size=8,
            z_dim=48,
            source_scale=[1.0, 1.0],
            target_scale=[1.0, 1.0],
            jitter=0.0,
            gray=0.0,
            blur_prob=0.0,
        )
    )
    images, labels, _ = common.load_images(cfg.data, "train", cfg.image_size)
    torch.manual_seed(0)
    m = S.SODA(cfg)
    enc = list(m.encoder.parameters()) + list(m.head.parameters())
    opt = torch.optim.AdamW(
        [{"params": m.net.parameters(), "lr": 1e-3}, {"params": enc, "lr": 2e-3}],
        betas=(0.9, 0.95),
        weight_decay=0.05,
    )  # as train(): the encoder at 2x
    for step in range(300):
        loss = m(common.batch(images, labels, 32, 0, step, 0, flip=False, device="cpu")[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, B = common.to_float(images), len(images)
    t = torch.full((B,), 0.9)
    a = S.abar(t, cfg.schedule_s).view(B, 1, 1, 1)
    e = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    x_t = a.sqrt() * x + (1 - a).sqrt() * e
    with torch.no_grad():
        z = m.encode(x)
        with_z, without_z = (
            ((m.net(x_t, t, z, torch.full((B, 3), k)) - e) ** 2).mean().item() for k in (1.0, 0.0)
        )
    assert with_z < 0.9 * without_z, (with_z, without_z)
