import json, math, os

import numpy as np
import pytest
import torch

import consistency as C

TINY = ["--preset", "tiny", "--device", "cpu"]


def test_scalings_by_hand_and_boundary_condition():
    t = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in = C.scalings(t, sigma_data=0.5, t_min=0.002)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # the boundary: f(x, t_min) = x
    # t = 0.5: c_skip = 0.25 / (0.498^2 + 0.25), c_out = 0.5 * 0.498 / sqrt(0.5), c_in = 1 / sqrt(0.5)
    assert c_skip[1].item() == pytest.approx(0.25 / (0.498 ** 2 + 0.25))
    assert c_out[1].item() == pytest.approx(0.5 * 0.498 / math.sqrt(0.5))
    assert c_in[1].item() == pytest.approx(1 / math.sqrt(0.5))
    assert c_skip[2].item() == pytest.approx(0.25 / (79.998 ** 2 + 0.25))  # at t_max the network does the work
    model = C.Consistency(C.Config(**C.PRESETS["tiny"]))
    torch.nn.init.normal_(model.net.conv_out.weight)  # a network that does not output 0
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.f(x, torch.full((2,), 0.002)), x)
    assert not torch.allclose(model.f(x, torch.full((2,), 1.0)), x)


def test_ect_schedule():
    t = torch.tensor([0.01, 0.3, 1.0, 5.0, 40.0])
    assert torch.equal(C.ect_r(t, 0, q=2, k=8, b=1), torch.zeros(5))  # stage 0: plain denoising
    gaps = []
    for s in (1, 2, 3, 4, 6):
        r = C.ect_r(t, s, q=2, k=8, b=1)
        assert (r >= 0).all() and (r < t).all()
        gaps.append(t - r)
    # by hand at t = 40 (sigmoid(-40) ~ 0): stage 1 gives r = 40 (1 - 1/2) = 20
    assert C.ect_r(torch.tensor(40.0), 1, 2, 8, 1).item() == pytest.approx(20.0, abs=1e-6)
    # each stage moves r toward t: t - r never grows, and halves where r is not clamped at 0
    for a, b in zip(gaps, gaps[1:]):
        assert (b <= a).all()
    g4, g6 = gaps[3], gaps[4]
    assert torch.allclose(g6[-2:], g4[-2:] / 4, rtol=1e-5)  # two stages, q^2 = 4, for t = 5 and 40


def test_pseudo_huber_by_hand():
    a, b = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert C.pseudo_huber(a, b, c=12.0).item() == pytest.approx(13 - 12)  # sqrt(25 + 144) - 12
    assert C.pseudo_huber(a, b, c=1e-9).item() == pytest.approx(5.0)  # c -> 0: the L2 distance


def test_teacher_carries_no_gradient_and_shares_dropout():
    cfg = C.Config(**dict(C.PRESETS["tiny"], dropout=0.5))
    model = C.Consistency(cfg).train()
    torch.nn.init.normal_(model.net.conv_out.weight)
    for m in model.net.modules():  # open the zero-initialised residual branches so dropout matters
        if isinstance(m, C.ResBlock):
            torch.nn.init.normal_(m.conv2.weight, std=0.1)
    seen = []
    model.net.register_forward_hook(lambda mod, inp, out: seen.append(out.requires_grad))
    masks = []
    for m in model.net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, inp, out: masks.append((out == 0) & (inp[0] != 0)))
            break
    model(torch.randn(4, 3, 16, 16), stage=2).backward()
    assert seen == [False, True]  # teacher first, without a graph; then the student
    assert torch.equal(masks[0], masks[1]) and masks[0].any()  # the same dropout mask for both


def test_toy_one_step_lands_on_data(cli, tmp_path):
    assert cli(C, ["toy", "--toy-steps", 1500, "--out", tmp_path]) == 0
    rows = {(r["model"], r["steps"]): r["distance"] for r in json.load(open(tmp_path / "toy.json"))["results"]}
    assert rows[("trained", 1)] < rows[("init", 1)] / 3, rows
    assert rows[("trained", 2)] < rows[("init", 1)] / 3, rows
    assert os.path.isfile(tmp_path / "toy.png")


def test_train_resume_sample_eval(cli, logged_losses, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(C, ["train", *TINY, "--steps", 12, "--out", a]) == 0
    assert cli(C, ["train", *TINY, "--steps", 7, "--out", b]) == 0
    assert cli(C, ["train", *TINY, "--steps", 12, "--out", b, "--resume"]) == 0
    assert logged_losses(b) == logged_losses(a)  # bit-identical on CPU, across a stage boundary (stage_steps 5)
    assert [json.loads(l)["stage"] for l in open(a / "log.jsonl")] == [0] * 5 + [1] * 5 + [2] * 2
    for steps in (1, 2):
        out = tmp_path / f"s{steps}.npz"
        assert cli(C, ["sample", "--ckpt", b / "ckpt.pt", "--n", 6, "--sample-steps", steps, "--out", out]) == 0
        arr = np.load(out)["arr_0"]
        assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert cli(C, ["eval", "--ckpt", b / "ckpt.pt", "--n", 32]) == 0
    res = json.load(open(b / "eval.json"))
    assert res["step"] == 12 and res["fd_1step"] > 0 and res["fd_2step"] > 0 and 0 <= res["probe_linear"] <= 1


def test_bad_inputs(cli, tmp_path, capsys):
    assert cli(C, ["train", *TINY, "--image-size", 15, "--out", tmp_path / "x"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert cli(C, ["sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s.npz"]) == 2
    assert cli(C, ["sample", "--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s.png"]) == 2
    assert ".npz" in capsys.readouterr().err
