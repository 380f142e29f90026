"""The contract every method file keeps, tested the same way for each: the seven files here, and any
file named in $REPDIFF_FILES (comma-separated paths), so that a copy of a method file is tested
before it is changed:

    cp jit_xpred.py myidea.py
    REPDIFF_FILES=myidea.py python -m pytest -q tests/test_contract.py -k myidea

Each test id carries the file's name. The contract: `train --preset tiny` writes ckpt.pt (model,
EMA, optimizer, step, config, RNG), log.jsonl and a sample grid; the same command plus `--resume`
continues exactly; `--resume --lr` applies and prints the new lr, `--resume --batch-size` is
refused; `sample` writes an .npz of uint8 [N, H, W, 3]; `eval` writes eval.json with the keys every
file shares; bad input is one line on stderr and exit code 2, the run's checkpoint untouched;
two DDP processes (torchrun's environment) train every stage.

How a file trains the network it samples from follows from the commands it offers
(conftest.pipeline): a file with `train-decoder` (rae.py) trains its first stage before `train
--decoder`, one with `train-rdm` (rcg.py) trains the representation model that `sample` and `eval`
read with `--rdm`, and one with `train-gen` (decoupled_latent.py) samples from `train-gen --ae` over
the autoencoder that its `train` makes.
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, pipeline, read_losses, run_cli

import common

METHOD_FILES = [
    "jit_xpred.py",
    "consistency.py",
    "repa.py",
    "soda.py",
    "rae.py",
    "rcg.py",
    "decoupled_latent.py",
]
EXTRA = [f.strip() for f in os.environ.get("REPDIFF_FILES", "").split(",") if f.strip()]
FILES = METHOD_FILES + [f for f in EXTRA if f not in METHOD_FILES]
# A tiny run: a row in log.jsonl each step, a grid of 4 images at step 2, a checkpoint at the end.
TINY = ["--preset", "tiny", "--device", "cpu", "--set", "log_every=1", "--set", "sample_every=2"]
TINY += ["--set", "grid=4"]
SHARED_KEYS = {"step", "data", "fd", "fd_ref", "fd_model", "n_samples", "probe_linear", "probe_knn"}
SHARED_KEYS |= {"probe_linear_pixels", "probe_knn_pixels"}


def load(path):
    """Import a method file by its path, under its own name (a copy is a module of its own)."""
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"contract_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__file__ = path
    return module


@pytest.fixture(
    scope="module", params=FILES, ids=lambda f: os.path.splitext(os.path.basename(f))[0]
)
def trained(request, tmp_path_factory):
    """A file's tiny run of 4 steps -> dict(module, folder, train argv, sample/eval argv, run
    folder)."""
    module = load(request.param)
    folder = tmp_path_factory.mktemp(module.__name__)
    first_stage, train, extra = pipeline(module, [*TINY, "--steps", 2], folder / "first_stage")
    assert first_stage is None or run_cli(module, first_stage) == 0
    run = folder / "a"
    assert run_cli(module, [*train, *TINY, "--steps", 4, "--out", run]) == 0
    return dict(
        module=module,
        folder=folder,
        train=train,
        extra=extra,
        run=run,
        index=FILES.index(request.param),
    )


def test_train_writes_checkpoint_log_and_grid(trained):
    run = trained["run"]
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert {"model", "ema", "opt", "step", "config", "rng"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["config"]["steps"] == 4
    rows = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # the EMA is not the model: it moved towards it from the initial weights
    assert any(
        not torch.equal(ckpt["model"][k], v)
        for k, v in ckpt["ema"].items()
        if v.is_floating_point()
    )
    grids = sorted(f for f in os.listdir(run) if f.endswith(".png"))
    assert grids == ["samples_0000002.png", "samples_0000004.png"]


def test_resume_continues_exactly(trained):
    """2 steps, then the same command + --resume to 4: the same losses as 4 steps in one go."""
    module, b = trained["module"], trained["folder"] / "b"
    argv = [*trained["train"], *TINY, "--out", b]
    assert run_cli(module, [*argv, "--steps", 2]) == 0
    assert run_cli(module, [*argv, "--steps", 4, "--resume"]) == 0
    assert read_losses(b) == read_losses(trained["run"])


def test_resume_changes_the_lr_and_refuses_the_batch_size(trained, capsys):
    """A 1-step run resumed to 3 steps twice: with --lr halved (printed, saved, and the step's lr is
    another than without it, whatever the file's schedule) and as it was; then --batch-size is
    refused, the checkpoint untouched."""
    module, c, same = trained["module"], trained["folder"] / "c", trained["folder"] / "c_same"
    argv = [*trained["train"], *TINY, "--out", c]
    assert run_cli(module, [*argv, "--steps", 1]) == 0
    shutil.copytree(c, same)
    old_lr = torch.load(c / "ckpt.pt", weights_only=True)["config"]["lr"]
    capsys.readouterr()
    assert run_cli(module, [*argv, "--steps", 3, "--resume", "--lr", old_lr / 2]) == 0
    assert f"--resume: lr {old_lr} -> {old_lr / 2}" in capsys.readouterr().out
    assert torch.load(c / "ckpt.pt", weights_only=True)["config"]["lr"] == old_lr / 2
    assert run_cli(module, [*trained["train"], *TINY, "--out", same, "--steps", 3, "--resume"]) == 0
    step2 = [json.loads(open(run / "log.jsonl").readlines()[1]) for run in (c, same)]
    assert step2[0]["step"] == 2 and step2[0]["lr"] != step2[1]["lr"]
    before = (c / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert run_cli(module, [*argv, "--steps", 4, "--resume", "--batch-size", 7]) == 2
    err = capsys.readouterr().err
    assert "batch_size is the run's own" in err and err.count("\n") == 1
    assert (c / "ckpt.pt").read_bytes() == before


def test_sample_writes_uint8_nhwc(trained):
    module, out = trained["module"], trained["folder"] / "samples" / "s.npz"
    argv = ["sample", "--ckpt", trained["run"] / "ckpt.pt", "--n", 5, "--device", "cpu"]
    assert run_cli(module, [*argv, *trained["extra"], "--out", out]) == 0
    arr = np.load(out)["arr_0"]
    size = torch.load(trained["run"] / "ckpt.pt", weights_only=True)["config"]["image_size"]
    assert arr.dtype == np.uint8 and arr.shape == (5, size, size, 3)
    assert (out.parent / "s.png").exists()


def test_eval_writes_the_shared_keys(trained, few_probe_images):
    """eval's code path with its probes on 200 / 100 images (the keys are the contract, not the
    figures)."""
    module, run = trained["module"], trained["run"]
    few_probe_images(200, 100)
    # --fd-ref: a reference .npz in ADM's layout holding the training images themselves
    cfg = torch.load(run / "ckpt.pt", weights_only=True)["config"]
    images = common.load_images(cfg["data"], "train", cfg["image_size"])[0]
    ref = run / "ref.npz"
    np.savez(ref, arr_0=images.permute(0, 2, 3, 1).numpy())
    argv = ["eval", "--ckpt", run / "ckpt.pt", "--n", 20, "--device", "cpu", *trained["extra"]]
    assert run_cli(module, [*argv, "--fd-ref", ref]) == 0
    res = json.load(open(run / "eval.json"))
    assert SHARED_KEYS <= set(res), SHARED_KEYS - set(res)
    assert res["step"] == 4 and res["n_samples"] == 20 and res["fd_model"] == "pixels"
    assert np.isfinite(res["fd"]) and res["fd"] > 0
    # the same images as the train split: the same FD
    assert res["fd_ref"] == res["fd"]
    for key in [k for k in res if k.startswith("probe_") and not k.startswith("probe_linear_by")]:
        if isinstance(res[key], float):
            assert 0 <= res[key] <= 1, key
    # every floor is named after what it is the floor of
    for key in [k for k in res if k.endswith(("_init", "_pixels"))]:
        assert key.rsplit("_", 1)[0] in res, key


def bad_inputs(trained, tmp):
    """-> [argv]: each must end with exit code 2 and one line on stderr."""
    train, extra, run = [*trained["train"], *TINY], trained["extra"], trained["run"]
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    other = tmp / "other.pt"
    torch.save({"model": {}, "config": {}}, other)
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    eval_dir = tmp / "eval_is_a_folder"
    (eval_dir / "eval.json").mkdir(parents=True)
    (eval_dir / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes())
    new = tmp / "new"
    sample = ["sample", "--ckpt", run / "ckpt.pt", "--n", 2, "--device", "cpu", *extra]
    cases = [
        [*train, "--preset", "no-such-preset", "--out", new],
        [*train, "--steps", 0, "--out", new],
        [*train, "--lr", -1, "--out", new],
        [*train, "--batch-size", "many", "--out", new],
        [*train, "--set", "no_such_field=1", "--out", new],
        [*train, "--set", "steps=many", "--out", new],
        [*train, "--data", "no-such-data", "--out", new],
        [*train, "--device", "tpu", "--out", new],
        [*train, "--out", run],  # a run is never overwritten
        [*train, "--out", tmp / "empty", "--resume"],  # nothing to resume
        [*train, "--out", a_file],  # a file, not a folder
        [*train, "--out", a_file / "run"],  # cannot be created
        [*train, "--cache", a_file / "cache", "--out", new],  # the decode cache cannot be written
        [*sample, "--out", tmp / "s.png"],  # not an .npz
        [*sample, "--out", a_file / "s.npz"],  # cannot be written
        ["sample", "--ckpt", tmp / "none.pt", "--out", tmp / "s.npz", *extra],
        ["sample", "--ckpt", garbage, "--out", tmp / "s.npz", *extra],
        [*sample[:4], 0, "--out", tmp / "s.npz"],  # --n 0
        ["eval", "--ckpt", other, *extra],  # another file's checkpoint
        # eval.json cannot be written
        ["eval", "--ckpt", eval_dir / "ckpt.pt", "--device", "cpu", *extra],
        ["eval", "--ckpt", run / "ckpt.pt", "--fd-model", "no-such-net", *extra],
    ]
    if not torch.cuda.is_available():
        cases.append([*train, "--device", "cuda", "--out", new])
    return cases


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
    module, run = trained["module"], trained["run"]
    before = (run / "ckpt.pt").read_bytes()
    for argv in bad_inputs(trained, tmp_path):
        capsys.readouterr()
        assert run_cli(module, argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert (run / "ckpt.pt").read_bytes() == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "s.npz").exists()


def test_torchrun_two_processes(trained, torchrun, tmp_path):
    """DDP on two CPU processes (gloo), every stage the file trains: both ranks train (every
    parameter gets a gradient, else DDP stops at the second step), rank 0 writes the run. (test_jit
    checks the logged loss against both ranks' own and runs eval there: both ranks sample, rank 0
    writes.)"""
    module = trained["module"]
    if module.__file__ == os.path.join(ROOT, "jit_xpred.py"):
        pytest.skip("test_jit.test_torchrun_two_cpu_processes runs it, with its losses and eval")
    first_stage, train, _ = pipeline(module, [*TINY, "--steps", 2], tmp_path / "first_stage")
    port = 29600 + 4 * trained["index"]
    # on 64 images: each process encodes the data set, where a file has a frozen encoder
    runs = [[*first_stage, "--data", "shapes:64"]] if first_stage else []
    small = ["--data", "shapes:64", "--steps", 2, "--batch-size", 4]
    runs.append([*train, *TINY, *small, "--out", tmp_path / "ddp"])
    for i, argv in enumerate(runs):
        # "--" before the file: else torchrun's own parser reads the file's --n as an abbreviation
        # of its options
        r = torchrun("--", [module.__file__, *argv], port + i)
        assert r.returncode == 0, r.stderr[-2000:]
        run = argv[argv.index("--out") + 1]
        steps = int(argv[argv.index("--steps") + 1])
        assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == list(
            range(1, steps + 1)
        )
        assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == steps
