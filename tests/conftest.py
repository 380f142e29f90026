import os, subprocess, sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCH_HOME", os.path.join(ROOT, ".pytest_cache", "torch_home"))  # FD statistics, downloads
os.environ.setdefault("REPDIFF_CACHE", os.path.join(ROOT, ".pytest_cache", "repdiff_cache"))  # decoded folders
torch.set_num_threads(2)


def run_cli(module, argv):
    """Run a method file's command line in this process; -> exit code (0 when it returns)."""
    import common
    try:
        common.cli(module.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def logged_losses():
    """-> a function: run folder -> the losses of its log.jsonl, in order."""
    import json
    return lambda out: [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture
def resume_rules(capsys):
    """-> a function (module, train argv, run folder, steps, lr, old lr): on a finished run, `--resume --lr` applies
    the new lr and prints it (config and log); `--resume --batch-size 7` exits 2 with one line, ckpt.pt untouched."""
    import json

    def check(module, argv, run, steps, lr, old_lr):
        capsys.readouterr()
        assert run_cli(module, [*argv, "--resume", "--steps", steps, "--lr", lr]) == 0
        assert f"--resume: lr {old_lr} -> {lr}" in capsys.readouterr().out
        assert torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)["config"]["lr"] == lr
        assert json.loads(open(os.path.join(run, "log.jsonl")).readlines()[-1])["lr"] == lr
        before = open(os.path.join(run, "ckpt.pt"), "rb").read()
        assert run_cli(module, [*argv, "--resume", "--steps", steps + 2, "--batch-size", 7]) == 2
        err = capsys.readouterr().err
        assert "batch_size is the run's own (32)" in err and err.count("\n") == 1
        assert open(os.path.join(run, "ckpt.pt"), "rb").read() == before
    return check


@pytest.fixture
def torchrun():
    """-> a function (method file, argv, port) that runs the file under torchrun with 2 CPU processes (gloo)."""
    def run(module_file, argv, port):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        file = [] if module_file == "--" else [module_file]  # "--": else torchrun reads the file's --n as its own
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "--", *file, *map(str, argv)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return run


@pytest.fixture
def reference():
    """-> a function (method, name) -> the fixture tests/reference/{method}_{name}.pt, made from the official code by
    tests/reference/make_references.py (its `meta` names the repository, commit and versions)."""
    def load(method, name):
        return torch.load(os.path.join(ROOT, "tests", "reference", f"{method}_{name}.pt"), weights_only=True)
    return load
