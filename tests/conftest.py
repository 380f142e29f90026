import os, sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
