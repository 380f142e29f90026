import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from conftest import Draws, assert_close32, detail_bounded

import common
import jit_xpred as J

TINY = ["--preset", "tiny", "--device", "cpu"]


def test_x_eps_v_conversions_by_hand():
    # z = t x + (1 - t) e with x = 2, e = -1, t = 0.25: z = 0.5 - 0.75 = -0.25, v = x - e = 3
    x, e, t = torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(0.25)
    z = t * x + (1 - t) * e
    assert z.item() == pytest.approx(-0.25)
    for kind, out in (("x", x), ("eps", e), ("v", torch.tensor(3.0))):
        xh, eh, vh = J.to_x_eps_v(kind, out, z, t, t_eps=0.05)
        assert (xh.item(), eh.item(), vh.item()) == pytest.approx((2.0, -1.0, 3.0)), kind
    # the clamp: at t = 0.99, 1 - t = 0.01 is clamped to 0.05, so v from x = 1, z = 0.9 is (1 - 0.9)
    # / 0.05 = 2
    v = J.to_x_eps_v("x", torch.tensor(1.0), torch.tensor(0.9), torch.tensor(0.99), 0.05)[2]
    assert v.item() == pytest.approx(2.0)
    # and t = 0.01 is clamped to 0.05 when dividing by t: eps-pred 0 at z = 0.1 gives x = (0.1 -
    # 0.99 * 0) / 0.05 = 2
    x = J.to_x_eps_v("eps", torch.tensor(0.0), torch.tensor(0.1), torch.tensor(0.01), 0.05)[0]
    assert x.item() == pytest.approx(2.0)


def test_signal_fraction_of_z_t():
    # z_t = t x + (1 - t) noise_scale e: a = t, s = (1 - t) noise_scale
    assert J.t_at_signal(0.75, 1.0) == 0.75
    # noise_scale 2: t = 2/3 gives a = s = 2/3
    assert J.t_at_signal(0.5, 2.0) == pytest.approx(2 / 3)


def test_cfg_interval_by_hand():
    assert J.in_interval(0.5, (0.1, 1.0))
    assert not J.in_interval(0.05, (0.1, 1.0))  # outside: conditional only
    # the interval is open
    assert not J.in_interval(0.1, (0.1, 1.0)) and not J.in_interval(1.0, (0.1, 1.0))
    assert J.in_interval(0.0, (0.0, 1.0))  # but lo = 0 takes t = 0 in (the official test)


def test_the_default_loss_is_algorithm_1_written_out():
    """x-prediction with the v-loss, recomputed here from the same draws: the clamped velocities of
    Alg. 1."""
    cfg = J.Config(**J.PRESETS["tiny"], P_mean=1.5, P_std=1.5)  # some 1 - t below t_eps
    model = J.JiT(cfg)
    torch.nn.init.normal_(model.net.final_layer.linear.weight, std=0.1)
    x, y = torch.rand(8, 3, 16, 16) * 2 - 1, torch.arange(8) % 10
    torch.manual_seed(3)
    loss = model(x, y)
    torch.manual_seed(3)
    y = torch.where(torch.rand(8) < cfg.label_drop, cfg.num_classes, y)
    t = torch.sigmoid(torch.randn(8) * cfg.P_std + cfg.P_mean).view(8, 1, 1, 1)
    z = t * x + (1 - t) * torch.randn_like(x) * cfg.noise_scale
    assert (1 - t).min() < cfg.t_eps
    x_pred = model.net(z, t.flatten(), y)
    v, v_pred = (x - z) / (1 - t).clamp_min(0.05), (x_pred - z) / (1 - t).clamp_min(0.05)
    torch.testing.assert_close(loss, ((v - v_pred) ** 2).mean(), rtol=0, atol=0)
    # Table 2: the same output read as eps or as v gives the velocity (z - eps) / t or v itself (t
    # clamped at t_eps)
    for kind, v_kind in (("eps", (z - x_pred) / t.clamp_min(0.05)), ("v", x_pred)):
        model.cfg.pred = kind
        torch.manual_seed(3)
        torch.testing.assert_close(model(x, y), ((v - v_kind) ** 2).mean(), rtol=1e-6, atol=0)


def test_network_starts_at_x_pred_zero_and_keeps_shapes():
    cfg = J.Config(**J.PRESETS["tiny"])
    net = J.JiTNet(cfg)
    z = torch.randn(3, 3, 16, 16)
    out = net(z, torch.rand(3), torch.tensor([0, 1, cfg.num_classes]))
    assert out.shape == z.shape and out.abs().max().item() == 0  # zero-initialised output layer
    assert net(z, torch.rand(3), torch.zeros(3, dtype=torch.long), feature_depth=2).shape == (
        3,
        cfg.hidden,
    )


def test_output_patch_lands_where_its_input_patch_was():
    """With the adaLN-zero gates closed every block is the identity, so output patch (i, j) depends
    on input patch (i, j) alone: a change inside one input patch must show up in exactly that patch
    of the output (checks the unpatchify)."""
    cfg = J.Config(**J.PRESETS["tiny"])
    net = J.JiTNet(cfg)
    torch.nn.init.normal_(net.final_layer.linear.weight)
    p = cfg.patch
    z, t, y = torch.randn(1, 3, 16, 16), torch.rand(1), torch.zeros(1, dtype=torch.long)
    z2 = z.clone()
    z2[:, :, 1 * p : 2 * p, 2 * p : 3 * p] += 1.0  # patch (row 1, column 2)
    with torch.no_grad():
        changed = (net(z2, t, y) - net(z, t, y)).abs().sum(1)[0] > 1e-6  # [H, W]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[1 * p : 2 * p, 2 * p : 3 * p] = True
    assert torch.equal(changed, expected)


def test_resume_continues_exactly(cli, logged_losses, tmp_path):
    """The same command plus --resume (and a longer --steps) continues the run bit for bit, the EMA
    included (a flag of the command line, --pred, and a --set field travel with the run)."""
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["train", *TINY, "--pred", "x", "--set", "ema=0.8", "--steps", 4, "--out", b]
    assert (
        cli(J, ["train", *TINY, "--pred", "x", "--set", "ema=0.8", "--steps", 6, "--out", a]) == 0
    )
    assert cli(J, argv) == 0
    assert cli(J, [*argv, "--resume", "--steps", 6]) == 0
    assert logged_losses(b) == logged_losses(a)  # bit-identical on CPU
    ca, cb = (
        torch.load(a / "ckpt.pt", weights_only=True),
        torch.load(b / "ckpt.pt", weights_only=True),
    )
    assert ca["step"] == cb["step"] == 6
    assert all(torch.equal(ca["ema"][k], cb["ema"][k]) for k in ca["ema"])


def test_sample_grids_only_at_multiples_of_sample_every(cli, tmp_path, monkeypatch):
    """A grid costs grid x sample_steps x 2 network calls: a run of any length draws one only at the
    multiples of sample_every (no extra one at its end; a default-preset run of 2 steps once drew 64
    images with 50 Heun steps), with the run's own sampler steps; grid=0 draws none."""
    calls, sample = [], J.JiT.sample

    def spy(self, y, **k):
        calls.append((len(y), k.get("steps")))
        return sample(self, y, **k)

    monkeypatch.setattr(J.JiT, "sample", spy)
    # sample_every 10: one grid, at 10
    assert cli(J, ["train", *TINY, "--steps", 13, "--out", tmp_path / "a"]) == 0
    assert sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".png")) == [
        "samples_0000010.png"
    ]
    assert calls == [(64, None)]  # 64 images with cfg.sample_steps (4 in tiny)
    assert (
        cli(
            J,
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
    assert cli(J, ["train", *TINY, "--steps", 10, "--set", "grid=0", "--out", tmp_path / "c"]) == 0
    assert len(calls) == 2 and not any(f.endswith(".png") for f in os.listdir(tmp_path / "c"))
    # the default preset's first GPU command: 2 steps, no grid
    assert (
        cli(
            J,
            [
                "train",
                "--preset",
                "default",
                "--data",
                "shapes:64",
                "--steps",
                2,
                "--batch-size",
                2,
                "--device",
                "cpu",
                "--set",
                "depth=2",
                "--out",
                tmp_path / "d",
            ],
        )
        == 0
    )
    assert len(calls) == 2


def test_noise_scale_follows_the_paper_unless_set():
    def config(image_size, *items):
        return J.make_config(
            argparse.Namespace(preset="tiny", image_size=image_size, set=["patch=16", *items])
        )

    # max(1, image_size / 256)
    assert config(256).noise_scale == 1.0 and config(512).noise_scale == 2.0
    assert config(512, "noise_scale=1.5").noise_scale == 1.5  # --set noise_scale wins
    assert config(32, "noise_scale=3").noise_scale == 3.0


def test_attn_fp32_is_true_fp32_under_bf16_autocast(monkeypatch):
    """--set attn_fp32=true: inside bf16 autocast (the GPU path, REPDIFF_CPU_BF16=1 on a CPU) the
    attention runs with autocast and TF32 off and returns float32; without it, the fused kernel in
    bf16 with the run's TF32 setting."""
    monkeypatch.setenv("REPDIFF_CPU_BF16", "1")
    seen, attention = [], common.attention

    def spy(q, k, v, fp32=False):
        out = attention(q, k, v, fp32)
        seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu"), out.dtype)
        )
        return out

    monkeypatch.setattr(common, "attention", spy)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        # as setup_dist sets on a GPU
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        for fp32 in (True, False):
            model = J.JiT(J.Config(**J.PRESETS["tiny"], attn_fp32=fp32))
            with common.autocast(torch.device("cpu")):
                model(torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
        assert torch.backends.cuda.matmul.allow_tf32  # put back after each fp32 region
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    # 2 blocks each
    assert seen == [(False, False, torch.float32)] * 2 + [(True, True, torch.bfloat16)] * 2


def test_released_checkpoint_snippet_runs(tmp_path, monkeypatch):
    """The docstring's snippet as written, on a checkpoint laid out as the official ones (the
    weights under model_ema1, the run's argparse.Namespace beside them), with the paper-L preset
    made small (2 sampler steps) to run in seconds."""
    assert ".cuda()" not in J.__doc__ and "weights_only=False" not in J.__doc__
    code = textwrap.dedent(J.__doc__[J.__doc__.index("    import argparse, torch") :])
    small = dict(
        hidden=32, depth=2, heads=2, in_context=4, in_context_start=1, bottleneck=8, sample_steps=2
    )
    monkeypatch.setitem(J.PRESETS, "paper-L", J.PRESETS["paper-L"] | small)
    official = J.JiT(J.Config(**J.PRESETS["paper-L"], num_classes=1000))
    torch.nn.init.normal_(official.net.final_layer.linear.weight, std=0.02)
    path = tmp_path / "checkpoint-last.pth"
    args = argparse.Namespace(
        model="JiT-L/16", img_size=256, class_num=1000, cfg=2.4, output_dir="/out"
    )
    torch.save(
        dict(model=official.state_dict(), model_ema1=official.state_dict(), epoch=599, args=args),
        path,
    )
    with pytest.raises(pickle.UnpicklingError):  # why the snippet allows argparse.Namespace
        torch.load(path, weights_only=True)
    scope = dict(PATH=str(path))
    exec(code, scope)
    assert scope["x"].shape == (8, 3, 256, 256) and scope["x"].abs().max() <= 1
    assert torch.equal(
        scope["model"].net.final_layer.linear.weight, official.net.final_layer.linear.weight
    )


def test_train_sample_eval_beats_initialisation(cli, logged_losses, tmp_path, few_probe_images):
    few_probe_images(400, 200)
    run, one = tmp_path / "run", tmp_path / "one"
    assert cli(J, ["train", *TINY, "--steps", 120, "--set", "sample_every=60", "--out", run]) == 0
    losses = logged_losses(run)
    assert np.mean(losses[-20:]) < 0.75 * np.mean(losses[:5])
    assert sorted(f for f in os.listdir(run) if f.endswith(".png")) == [
        "samples_0000060.png",
        "samples_0000120.png",
    ]
    assert (
        cli(
            J,
            [
                "sample",
                "--ckpt",
                run / "ckpt.pt",
                "--n",
                10,
                "--batch",
                4,
                "--out",
                tmp_path / "s.npz",
            ],
        )
        == 0
    )
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (10, 16, 16, 3) and arr.dtype == np.uint8
    assert len({image.tobytes() for image in arr}) == 10  # each image from its own noise
    assert os.path.isfile(tmp_path / "s.png")
    # the trained model's samples are far closer to the data than those of a model one step from its
    # initialisation
    assert cli(J, ["train", *TINY, "--steps", 1, "--out", one]) == 0
    for r in (run, one):
        assert cli(J, ["eval", "--ckpt", r / "ckpt.pt", "--n", 100]) == 0
    res, res_one = json.load(open(run / "eval.json")), json.load(open(one / "eval.json"))
    assert res["step"] == 120 and res["n_samples"] == 100 and res["fd_model"] == "pixels"
    assert res["fd"] < res_one["fd"] / 2, (res["fd"], res_one["fd"])
    # the same initialisation, the same floor
    assert res["probe_linear_init"] == res_one["probe_linear_init"]
    # the detail kept: x_pred of the test images from a third noise (at initialisation x_pred = 0,
    # a flat image: nothing)
    detail_bounded(res)
    assert res["detail_pattern_init"] == res["detail_amplitude_init"] == 0, res
    assert [f for f, _ in res["probe_linear_by_signal"]] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert all(0 <= acc <= 1 for _, acc in res["probe_linear_by_signal"])


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(J, ["train", *TINY, "--image-size", 30, "--out", tmp_path / "x"]) == 2
    assert "not divisible by the patch size" in capsys.readouterr().err
    assert cli(J, ["sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s.npz"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert cli(J, ["eval", "--ckpt", tmp_path / "bad.pt"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert cli(J, ["train", *TINY, "--data", "nope", "--out", tmp_path / "y"]) == 2
    assert "unknown --data" in capsys.readouterr().err
    # argparse: invalid choice
    assert cli(J, ["train", "--preset", "huge", "--out", tmp_path / "z"]) == 2
    # an existing run is never overwritten without --resume
    assert cli(J, ["train", *TINY, "--steps", 2, "--out", tmp_path / "r"]) == 0
    before = (tmp_path / "r" / "ckpt.pt").read_bytes()
    assert cli(J, ["train", *TINY, "--steps", 4, "--out", tmp_path / "r"]) == 2
    assert (
        "--resume" in capsys.readouterr().err
        and (tmp_path / "r" / "ckpt.pt").read_bytes() == before
    )
    # every numeric flag is checked when parsed; every bad input is one line on stderr and exit code
    # 2
    (tmp_path / "file").write_text("x")
    for argv, says in (
        (["train", *TINY, "--steps", -1, "--out", tmp_path / "a"], "--steps: -1 must be > 0"),
        (
            ["train", *TINY, "--batch-size", 0, "--out", tmp_path / "a"],
            "--batch-size: 0 must be > 0",
        ),
        (["train", *TINY, "--lr", "nan", "--out", tmp_path / "a"], "--lr"),
        (["train", *TINY, "--out", tmp_path / "file"], "is a file"),
        (["train", *TINY, "--set", "nope=1", "--out", tmp_path / "a"], "--set 'nope=1'"),
        (["train", *TINY, "--set", "ema=fast", "--out", tmp_path / "a"], "not a float"),
        (["train", *TINY, "--set", "steps=0", "--out", tmp_path / "a"], "must be positive"),
        (["train", *TINY, "--device", "tpu", "--out", tmp_path / "a"], "unknown --device"),
        (
            ["sample", "--ckpt", tmp_path / "r" / "ckpt.pt", "--n", 0, "--out", tmp_path / "s.npz"],
            "--n",
        ),
        (["sample", "--ckpt", tmp_path / "r" / "ckpt.pt", "--out", tmp_path / "s.png"], ".npz"),
        (["eval", "--ckpt", tmp_path / "r" / "ckpt.pt", "--fd-model", "vgg"], "--fd-model"),
    ):
        assert cli(J, argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(tmp_path / "a" / "ckpt.pt")
    # a checkpoint of another method file is named as such, not a traceback
    other = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    other["config"]["channels"] = 64
    torch.save(other, tmp_path / "other.pt")
    assert cli(J, ["eval", "--ckpt", tmp_path / "other.pt"]) == 2
    assert "not written by this file" in capsys.readouterr().err


def test_resume_after_a_crash_logs_each_step_once(cli, tmp_path):
    assert cli(J, ["train", *TINY, "--steps", 10, "--out", tmp_path]) == 0  # checkpoint at step 10
    # a crash after logging steps 11-13, before their checkpoint
    with open(tmp_path / "log.jsonl", "a") as f:
        f.writelines(json.dumps(dict(step=s, loss=1.0)) + "\n" for s in (11, 12, 13))
    assert cli(J, ["train", *TINY, "--steps", 14, "--out", tmp_path, "--resume"]) == 0
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == list(range(1, 15))


def test_nan_loss_stops_and_keeps_last_checkpoint(cli, tmp_path, monkeypatch, capsys):
    forward = J.JiT.forward
    monkeypatch.setattr(J.JiT, "forward", lambda self, x, y: forward(self, x, y) * float("nan"))
    # no checkpoint yet: says so
    assert cli(J, ["train", *TINY, "--steps", 10, "--out", tmp_path / "new"]) == 1
    assert "loss is nan at step 1; stopped, no checkpoint was written" in capsys.readouterr().err
    monkeypatch.setattr(J.JiT, "forward", forward)
    assert cli(J, ["train", *TINY, "--steps", 10, "--out", tmp_path]) == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(J.JiT, "forward", lambda self, x, y: forward(self, x, y) * float("nan"))
    assert cli(J, ["train", *TINY, "--steps", 20, "--out", tmp_path, "--resume"]) == 1
    assert "loss is nan at step 11; stopped, " in capsys.readouterr().err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_toy_x_prediction_survives_high_dimension():
    """Sec. 3.3 at D = 512: x-prediction lands on the spiral, eps-prediction does not (by a wide
    margin)."""
    torch.set_num_threads(2)
    d_x, _ = J.toy_run(512, "x", steps=250)  # measured: 0.15
    d_eps, _ = J.toy_run(512, "eps", steps=250)  # measured: 39
    assert d_x < 0.6 and d_eps > 5 * d_x, (d_x, d_eps)


def test_torchrun_two_cpu_processes(torchrun, tmp_path, monkeypatch):
    """The DDP path (gloo on CPU): the logged step-1 loss is the mean of the two ranks' losses, each
    recomputed here in one process from its own batch and RNG stream; rank 0 alone writes one row
    per step. Then eval: both ranks sample, rank 0 alone writes eval.json and the FD statistics (in
    a fresh cache)."""
    # 200 images: eval's probes under torchrun read them all
    r = torchrun(
        "jit_xpred.py",
        ["train", *TINY, "--data", "shapes:200", "--steps", 4, "--out", tmp_path],
        29531,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    cfg = J.Config(**torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"])
    images, labels, _ = common.load_images(cfg.data, "train", cfg.image_size)
    losses = []
    for rank in (0, 1):
        torch.manual_seed(cfg.seed)
        model = J.JiT(cfg)
        torch.manual_seed(cfg.seed * 1_000_003 + rank)  # each rank's stream (common.restore)
        x, y = common.batch(
            images, labels, cfg.batch_size // 2, cfg.seed, 0, rank, flip=True, device="cpu"
        )
        losses.append(model(x, y).item())
    assert losses[0] != losses[1]  # the ranks see different batches
    assert rows[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # "--": else
    r = torchrun(
        "--",
        [
            "jit_xpred.py",
            "eval",
            "--ckpt",
            tmp_path / "ckpt.pt",
            "--n",
            6,
            "--batch",
            2,
            # torchrun's parser takes --n for its own
            "--sample-steps",
            2,
            "--device",
            "cpu",
        ],
        29531,
        launcher=True,  # torchrun itself, whose parser would read --n
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # no .tmp
    assert [f[-4:] for f in os.listdir(tmp_path / "torch_home" / "hub" / "repdiff_fd")] == [".npz"]
    res = json.load(open(tmp_path / "eval.json"))
    # printed by rank 0 alone
    assert res["n_samples"] == 6 and r.stdout.count('"probe_linear_by_signal"') == 1


# ----------------------------------------------------------------------------- the paper's presets
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's train split


def paper_config(tmp_path, preset, *flags):
    """make_config of `train --preset PRESET FLAGS`, parsed by the shared command line."""
    parser, _ = common.make_parser(J.__doc__, J.PRESETS)
    argv = ["train", "--preset", preset, "--out", str(tmp_path / "run"), *map(str, flags)]
    return J.make_config(parser.parse_args(argv))


def test_paper_preset_is_the_official_recipe(tmp_path):
    """`--preset paper` is the official JiT-B/16 run at 256 px: the README's training command and
    its evaluation of the released checkpoint (zlong928/JiT@cbc743a: LTH14/JiT's files)."""
    expected = dict(
        # zlong928/JiT@cbc743a main_jit.py:146 (DATA_PATH/train), README.md:29 (ImageNet)
        data="imagenet",
        image_size=256,  # zlong928/JiT@cbc743a README.md:63
        noise_scale=1.0,  # zlong928/JiT@cbc743a README.md:63
        patch=16,  # zlong928/JiT@cbc743a model_jit.py:364 (JiT-B/16: README.md:60)
        hidden=768,  # zlong928/JiT@cbc743a model_jit.py:363
        depth=12,  # zlong928/JiT@cbc743a model_jit.py:363
        heads=12,  # zlong928/JiT@cbc743a model_jit.py:363
        bottleneck=128,  # zlong928/JiT@cbc743a model_jit.py:364
        in_context=32,  # zlong928/JiT@cbc743a model_jit.py:364
        in_context_start=4,  # zlong928/JiT@cbc743a model_jit.py:364
        # zlong928/JiT@cbc743a util/model_util.py:94 (model_jit.py:255 leaves theta as it is)
        rope_base=10_000.0,
        proj_dropout=0.0,  # zlong928/JiT@cbc743a README.md:61
        # zlong928/JiT@cbc743a model_jit.py:99-102 (q k^T and its softmax in fp32)
        attn_fp32=True,
        pred="x",  # zlong928/JiT@cbc743a denoiser.py:58 (the net outputs x_pred)
        loss="v",  # zlong928/JiT@cbc743a denoiser.py:59-63 (l2 on v)
        P_mean=-0.8,  # zlong928/JiT@cbc743a README.md:62
        P_std=0.8,  # zlong928/JiT@cbc743a README.md:62
        t_eps=0.05,  # zlong928/JiT@cbc743a main_jit.py:56
        label_drop=0.1,  # zlong928/JiT@cbc743a main_jit.py:57
        # zlong928/JiT@cbc743a README.md:58 (8 processes), README.md:64 (128 each): 8 x 128
        batch_size=1024,
        # zlong928/JiT@cbc743a README.md:64 (--blr 5e-5), main_jit.py:176: 5e-5 x 1024 / 256
        lr=2e-4,
        # zlong928/JiT@cbc743a README.md:65 (--epochs 600): ceil(600 x 1,281,167 / 1024)
        steps=750_684,
        # zlong928/JiT@cbc743a README.md:65 (--warmup_epochs 5): ceil(5 x 1,281,167 / 1024)
        warmup=6_256,
        weight_decay=0.0,  # zlong928/JiT@cbc743a main_jit.py:47
        # zlong928/JiT@cbc743a main_jit.py:49 (ema_decay1: sampled with, engine_jit.py:86-93)
        ema=0.9999,
        sample_steps=50,  # zlong928/JiT@cbc743a main_jit.py:71 (heun: main_jit.py:69)
        # zlong928/JiT@cbc743a README.md:111 (evaluating JiT-B; README.md:66's online eval: 2.9)
        cfg_scale=3.0,
        cfg_interval=[0.1, 1.0],  # zlong928/JiT@cbc743a README.md:111
    )
    # the arithmetic of the derived values
    assert expected["batch_size"] == 8 * 128 and expected["lr"] == 5e-5 * 1024 / 256
    assert expected["steps"] == math.ceil(600 * IMAGENET_TRAIN / 1024)
    assert expected["warmup"] == math.ceil(5 * IMAGENET_TRAIN / 1024)
    cfg = paper_config(tmp_path, "paper")
    assert {k: getattr(cfg, k) for k in expected} == expected
    # make_config keeps the preset as it is (the classes come from the data)
    assert cfg == J.Config(**J.PRESETS["paper"])


def test_paper_sizes_are_the_official_recipe(tmp_path):
    """paper-L and paper-H: the paper run with JiT-L/16's and JiT-H/16's widths, dropout and CFG
    scale; everything else (data, schedule, sampler) as paper, checked above."""
    sizes = dict(
        L=dict(
            hidden=1024,  # zlong928/JiT@cbc743a model_jit.py:371
            depth=24,  # zlong928/JiT@cbc743a model_jit.py:371
            heads=16,  # zlong928/JiT@cbc743a model_jit.py:371
            bottleneck=128,  # zlong928/JiT@cbc743a model_jit.py:372
            in_context_start=8,  # zlong928/JiT@cbc743a model_jit.py:372
            # zlong928/JiT@cbc743a main_jit.py:31 (the README trains no JiT-L: the default)
            proj_dropout=0.0,
            cfg_scale=2.4,  # zlong928/JiT@cbc743a README.md:122
        ),
        H=dict(
            hidden=1280,  # zlong928/JiT@cbc743a model_jit.py:379
            depth=32,  # zlong928/JiT@cbc743a model_jit.py:379
            heads=16,  # zlong928/JiT@cbc743a model_jit.py:379
            bottleneck=256,  # zlong928/JiT@cbc743a model_jit.py:380
            in_context_start=10,  # zlong928/JiT@cbc743a model_jit.py:380
            proj_dropout=0.2,  # zlong928/JiT@cbc743a README.md:91
            cfg_scale=2.2,  # zlong928/JiT@cbc743a README.md:133 (and README.md:96)
        ),
    )
    base = paper_config(tmp_path, "paper")
    for size, widths in sizes.items():
        assert paper_config(tmp_path, f"paper-{size}") == dataclasses.replace(base, **widths), size
    # JiT-B/32 at 512 px, --image-size 512 --set patch=32: noise scale 2.0
    # (zlong928/JiT@cbc743a README.md:78)
    b32 = paper_config(tmp_path, "paper", "--image-size", 512, "--set", "patch=32")
    assert b32.noise_scale == 2.0
    # the sizes B, L, H alone: the default's 32 px and patch 2
    sizes_only = [J.Config(**J.PRESETS[k]) for k in "BLH"]
    assert {(c.image_size, c.patch) for c in sizes_only} == {(32, 2)}


def test_paper_lr_follows_the_batch(tmp_path, capsys):
    """lr = blr x batch / 256 (zlong928/JiT@cbc743a main_jit.py:176): --batch-size alone rescales
    the paper preset's lr; --lr or --set lr= is taken as given."""
    assert paper_config(tmp_path, "paper", "--batch-size", 512).lr == pytest.approx(1e-4)
    assert "lr 0.0001" in capsys.readouterr().out
    assert paper_config(tmp_path, "paper-H", "--batch-size", 256).lr == pytest.approx(5e-5)
    assert paper_config(tmp_path, "paper", "--batch-size", 512, "--lr", 3e-4).lr == 3e-4
    assert paper_config(tmp_path, "paper", "--batch-size", 512, "--set", "lr=3e-4").lr == 3e-4
    assert paper_config(tmp_path, "paper").lr == 2e-4


def test_paper_preset_asks_for_imagenet(cli, tmp_path, capsys):
    """Without --data the paper preset stops at once, one line naming the folder it needs."""
    assert cli(J, ["train", "--preset", "paper", "--device", "cpu", "--out", tmp_path / "p"]) == 2
    err = capsys.readouterr().err
    assert "pass --data DIR" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "p")


# ------------------------------------------------------------------------ against the official code
# Fixtures made by tests/reference/make_jit.py from LTH14/JiT's model_jit.py and denoiser.py, fp32
# on a CPU (the official module does not run in float64: the maker's docstring says where). The
# official Denoiser's state dict loads unchanged into J.JiT with strict=True; the official code's
# random draws are fed to ours (Draws.feed), so no test relies on a seed reproducing them; the same
# inputs give the same numbers within conftest's assert_close32. Put-back differences that fail
# here: RoPE base 100 (test_network_matches_official), no CFG at t = 0 when lo = 0
# (test_sampler_matches_official[lo0]), the label drop drawn after t
# (test_draws_come_in_the_official_order, and the loss).
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")


def official_weights(reference, **changes):
    ref = reference("jit", "net")
    model = J.JiT(J.Config(**ref["config"], **changes))
    model.load_state_dict(ref["state_dict"], strict=True)
    return model, ref


def test_network_matches_official(reference):
    ref = reference("jit", "net")
    net = J.JiT(J.Config(**ref["config"])).net
    # what is not in our state dict: the sin-cos table (columns first) and the RoPE tables
    # (interleaved pairs; the in-context tokens first, unrotated)
    n_ctx = ref["config"]["in_context"]
    assert_close32(net.pos_embed, ref["state_dict"]["net.pos_embed"], "pos_embed")
    assert_close32(net.rope_ctx_cos, ref["rope_cos"], "RoPE cos")
    assert_close32(net.rope_ctx_sin, ref["rope_sin"], "RoPE sin")
    assert_close32(net.rope_cos, ref["rope_cos"][n_ctx:], "RoPE cos, no in-context tokens")
    model, ref = official_weights(reference)
    with torch.no_grad():
        assert_close32(model.net.t_embedder(ref["t"]), ref["t_emb"], "t embedding (raw t)")
        assert_close32(model.net(ref["z"], ref["t"], ref["y"]), ref["out"], "network output")


@pytest.mark.parametrize("run", ["plain", "dropout"])
def test_loss_matches_official_from_its_draws(reference, monkeypatch, run):
    """The official draws fed to ours (label drop, t, noise; with proj_dropout 0.2, then the masks
    of the middle blocks): the same loss and gradients. Dropout draws its mask in torch's C++
    kernel, out of Draws' reach, so both sides run make_jit.bernoulli_dropout: F.dropout's
    arithmetic, the mask drawn by Tensor.bernoulli_."""
    ref = reference("jit", "loss")
    r = ref["runs"][run]
    model, _ = official_weights(reference, proj_dropout=r["proj_dropout"])
    cfg = model.cfg
    if run == "plain":
        # our config's fields applied to the draws as the official drop_labels, sample_t and
        # forward apply them
        u, n, e = r["draws"]
        y_drop = torch.where(u < cfg.label_drop, cfg.num_classes, ref["labels"])
        assert torch.equal(y_drop, ref["y_drop"])
        assert_close32(torch.sigmoid(n * cfg.P_std + cfg.P_mean), ref["t"], "t")
        assert torch.equal(e * cfg.noise_scale, ref["e_scaled"])
    monkeypatch.syspath_prepend(REFERENCE)
    from make_jit import bernoulli_dropout

    monkeypatch.setattr(torch.nn.functional, "dropout", bernoulli_dropout)
    model.train()
    with Draws.feed(r["draws"]):
        loss = model(ref["x"], ref["labels"])
    loss.backward()
    assert_close32(loss, r["loss"], "loss")
    params = dict(model.named_parameters())
    for k, g in r["grads"].items():
        assert_close32(params[k].grad, g, k)


def assert_same_draws(ours, official):
    assert [name for name, _ in ours] == [name for name, _ in official]
    for (name, a), (_, b) in zip(ours, official):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_draws_come_in_the_official_order(reference):
    """On this machine's RNG: the official order of draws replayed from a seed (written out below,
    from denoiser.py at cbc743a), then ours recorded from the same seed: the same functions, shapes
    and values."""
    model, _ = official_weights(reference)
    x, labels = reference("jit", "loss")["x"], torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    official = [
        ("rand", torch.rand(4)),  # denoiser.py:41, drop_labels: the label drop, first
        ("randn", torch.randn(4)),  # denoiser.py:46, sample_t: t = sigmoid(P_mean + P_std n)
        ("randn_like", torch.randn_like(x)),  # denoiser.py:53, forward: the noise
    ]
    torch.manual_seed(0)
    model.train()
    with Draws.record() as ours:
        model(x, labels)
    assert_same_draws(ours, official)
    # sampling draws once: the noise at t = 0 (denoiser.py:71), before any network call
    torch.manual_seed(0)
    official = [("randn", torch.randn(3, 3, 16, 16))]
    torch.manual_seed(0)
    model.eval()
    with Draws.record() as ours:
        model.sample(torch.tensor([0, 2, 4]), steps=2, scale=2.5, interval=[0.0, 0.7])
    assert_same_draws(ours, official)


@pytest.mark.parametrize("run", ["lo0", "mid"])
def test_sampler_matches_official(reference, run):
    """4 Heun steps + 1 Euler with CFG 2.5 in (0, 0.7) (lo = 0: t = 0 is guided) and in (0.3, 1),
    from the official noise; the official returns z unclamped and clips when it writes PNGs, ours
    clamps to [-1, 1] at the end."""
    model, _ = official_weights(reference)
    ref = reference("jit", "sample")
    r = ref["runs"][run]
    model.eval()
    with Draws.feed(r["draws"]):
        out = model.sample(
            ref["y"], steps=ref["steps"], scale=ref["cfg_scale"], interval=r["interval"]
        )
    assert_close32(out, r["out"].clamp(-1, 1), "samples")


def test_released_checkpoints_load_into_our_presets(reference):
    """JiT-{B,L,H}/16 at 256 px and /32 at 512 px: the official state dicts' keys and shapes are
    ours (strict=True)."""
    for name, shapes in reference("jit", "keys")["shapes"].items():
        size, patch = name.split("-")[1].split("/")
        cfg = J.Config(
            **J.PRESETS[size],
            patch=int(patch),
            image_size=256 if patch == "16" else 512,
            num_classes=1000,
        )
        with torch.device("meta"):
            ours = {k: list(v.shape) for k, v in J.JiT(cfg).state_dict().items()}
        assert ours == shapes, name


def official_stand_ins():
    """Modules named model_jit and denoiser with the API make_jit.py uses, from jit_xpred's
    classes."""

    class JiT(J.JiTNet):  # model_jit.JiT's arguments
        def __init__(
            self,
            input_size=256,
            patch_size=16,
            in_channels=3,
            hidden_size=1024,
            depth=24,
            num_heads=16,
            mlp_ratio=4.0,
            attn_drop=0.0,
            proj_drop=0.0,
            num_classes=1000,
            bottleneck_dim=128,
            in_context_len=32,
            in_context_start=8,
        ):
            super().__init__(
                J.Config(
                    image_size=input_size,
                    patch=patch_size,
                    hidden=hidden_size,
                    depth=depth,
                    heads=num_heads,
                    proj_dropout=proj_drop,
                    num_classes=num_classes,
                    bottleneck=bottleneck_dim,
                    in_context=in_context_len,
                    in_context_start=in_context_start,
                )
            )
            rope = types.SimpleNamespace(freqs_cos=self.rope_ctx_cos, freqs_sin=self.rope_ctx_sin)
            self.feat_rope_incontext = rope

    model_jit = types.ModuleType("model_jit")
    model_jit.JiT = JiT
    # no released models: the maker adds its "test" entry, and its table of the released keys (the
    # official code's alone, no "ours" in it) comes out empty
    model_jit.JiT_models = {}

    class Denoiser(J.JiT):  # denoiser.Denoiser(args)
        def __init__(self, args):
            torch.nn.Module.__init__(self)
            self.net = model_jit.JiT_models[args.model](
                input_size=args.img_size,
                in_channels=3,
                num_classes=args.class_num,
                attn_drop=args.attn_dropout,
                proj_drop=args.proj_dropout,
            )
            self.cfg = dataclasses.replace(
                self.net.cfg,
                label_drop=args.label_drop_prob,
                P_mean=args.P_mean,
                P_std=args.P_std,
                t_eps=args.t_eps,
                noise_scale=args.noise_scale,
                sample_steps=args.num_sampling_steps,
                cfg_scale=args.cfg,
                cfg_interval=[args.interval_min, args.interval_max],
            )
            self.noise_scale = args.noise_scale

        def drop_labels(self, labels):
            drop = torch.rand(len(labels)) < self.cfg.label_drop
            return torch.where(drop, self.cfg.num_classes, labels)

        def sample_t(self, n, device=None):
            return torch.sigmoid(torch.randn(n, device=device) * self.cfg.P_std + self.cfg.P_mean)

        def generate(self, labels):
            return self.sample(labels)

    denoiser = types.ModuleType("denoiser")
    denoiser.Denoiser = Denoiser
    return model_jit, denoiser


def test_reference_maker_runs_on_stand_ins(reference, tmp_path, monkeypatch, capsys):
    """make_jit.make() and bench() with stand-ins for the official modules (no checkout needed): the
    maker's "ours" half still runs against today's jit_xpred, agrees with itself, and writes the
    fixtures with the keys the tests above read."""
    monkeypatch.syspath_prepend(REFERENCE)
    import make_jit
    import make_references

    model_jit, denoiser = official_stand_ins()
    monkeypatch.setitem(sys.modules, "model_jit", model_jit)
    monkeypatch.setitem(sys.modules, "denoiser", denoiser)
    monkeypatch.setattr(make_jit, "official", lambda method, repos, *sub: repos)
    monkeypatch.setattr(make_references, "OUT", str(tmp_path))
    make_jit.make("no checkout")
    make_jit.bench("no checkout", batch=1, repeats=1)
    out = capsys.readouterr().out
    assert "net max |ours - official|: 0.0" in out
    assert "loss plain |ours - official|: 0.0" in out
    assert "loss dropout |ours - official|: 0.0" in out
    assert "ours/official" in out
    for name in ("net", "loss", "sample", "keys"):
        made = torch.load(tmp_path / f"jit_{name}.pt", weights_only=True)
        assert made.keys() == reference("jit", name).keys(), name
