import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# FD statistics, downloads
os.environ.setdefault("TORCH_HOME", os.path.join(ROOT, ".pytest_cache", "torch_home"))
# decoded folders
os.environ.setdefault("REPDIFF_CACHE", os.path.join(ROOT, ".pytest_cache", "repdiff_cache"))
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
def few_probe_images(monkeypatch):
    """-> cap(n_train, n_test): eval's probes (common.probe_data) then read at most that many images
    of each split, for tests of eval's code path and keys rather than its figures."""
    import common

    real = common.probe_data

    def cap(n_train, n_test):
        def few(spec, size, n_tr=10_000, n_te=5_000):
            return real(spec, size, min(n_tr, n_train), min(n_te, n_test))

        monkeypatch.setattr(common, "probe_data", few)

    return cap


def read_losses(run):
    """The losses of a run folder's log.jsonl, in order."""
    import json

    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture
def logged_losses():
    return read_losses


def detail_bounded(res, suffix=""):
    """eval.json's detail figures (common.detail) of one output: each in [0, its ceiling] (the real
    test images' own `_pixels` figure; small test runs' read-outs, fitted on a few hundred images,
    have low ceilings), with the blurred images' at most that."""
    for kind in ("pattern", "amplitude"):
        key, ceiling = f"detail_{kind}{suffix}", res[f"detail_{kind}_pixels"]
        assert isinstance(res[key], float) and 0 <= res[key] <= ceiling + 0.05, (key, res[key])
        assert 0 <= res[f"detail_{kind}_blurred"] <= ceiling, res
