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


def commands(module):
    """The subcommands of a file's command line, read from its --help."""
    import contextlib
    import io
    import re

    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        module.main(["--help"])
    return set(re.search(r"\{([\w,-]+)\}", text.getvalue()).group(1).split(","))


def pipeline(module, stage_argv, first):
    """How a file trains the network it samples from, read from the commands it offers -> (its
    first stage's argv, run with stage_argv into the folder `first`, or None; train's command and
    its link to that stage; the extra argv of sample and eval)."""
    cmds = commands(module)
    stage, ckpt = [*stage_argv, "--out", first], first / "ckpt.pt"
    if "train-decoder" in cmds:  # rae.py: the decoder, then the DiT over its latent
        return ["train-decoder", *stage], ["train", "--decoder", ckpt], []
    if "train-rdm" in cmds:  # rcg.py: the representation model, read by sample and eval
        return ["train-rdm", *stage], ["train"], ["--rdm", ckpt]
    if "train-gen" in cmds:  # decoupled_latent.py: the autoencoder, then the DiT over it
        return ["train", *stage], ["train-gen", "--ae", ckpt], []
    return None, ["train"], []


@pytest.fixture
def torchrun():
    """-> a function (method file or "--", argv, port, launcher) that runs the file on 2 CPU
    processes (gloo). launcher=True: under torchrun itself; else the two ranks are started here
    with the environment torchrun gives them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): the same DDP path without the launcher's own start (an import of torch, seconds
    on a small CPU). -> returncode (the first nonzero), stdout and stderr of both ranks."""

    def run(module_file, argv, port, launcher=False):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        # "--": else torchrun reads the file's --n as its own
        file = [] if module_file == "--" else [module_file]
        if launcher:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
            cmd += ["--master_port", str(port), "--", *file, *map(str, argv)]
            return subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
            )
        env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port))
        ranks = [
            subprocess.Popen(
                [sys.executable, *file, *map(str, argv)],
                cwd=ROOT,
                env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        outs = [p.communicate(timeout=300) for p in ranks]
        code = next((p.returncode for p in ranks if p.returncode), 0)
        return subprocess.CompletedProcess(
            ranks[0].args, code, "".join(o for o, _ in outs), "".join(e for _, e in outs)
        )

    return run


# ----------------------------------------------------------------------- comparing with a reference
# Two tolerances, stated once. In float64 the two implementations agree to ~1e-15 relative per
# operation, so 1e-10 of the largest value shows real disagreement (a changed constant, a missing
# term) and never rounding. In float32 the same arithmetic in another order (another CPU's vector
# width, another BLAS kernel, a GPU) moves each value by a few units in the last place (2^-24 = 6e-8
# relative) per operation, compounded over a network's depth and its sums of hundreds of terms:
# elementwise tolerances then fail on the values near zero. So fp32 outputs are compared as a whole:
# the relative norm ||ours - ref|| / ||ref|| within 2e-5 (about 300 ulps), far below what a real
# difference gives (the put-back differences named in the reference tests move outputs by 1e-3 or
# more).
FP64_RTOL = 1e-10
FP32_REL_NORM = 2e-5


def assert_close64(ours, ref, msg=""):
    """float64: every value within 1e-10 of the largest |value| (relative to it)."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, f"{msg} shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    scale = max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= FP64_RTOL * scale, f"{msg} max |ours - ref| = {err:.3g} > {FP64_RTOL * scale:.3g}"


def assert_close32(ours, ref, msg="", rel=FP32_REL_NORM):
    """float32: ||ours - ref|| / ||ref|| within rel (the norm over the whole tensor; see above)."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, f"{msg} shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = (ours - ref).norm().item() / max(ref.norm().item(), 1e-30)
    assert err <= rel, f"{msg} ||ours - ref|| / ||ref|| = {err:.3g} > {rel:.3g}"


class Draws:
    """Stand in for torch's random draws: `feed` returns recorded tensors in order, `record` keeps
    what was drawn.

    Inside `with Draws.feed(tensors):` each call of torch.rand, randn, randint, rand_like,
    randn_like and Tensor.bernoulli_ / normal_ / uniform_ returns (or writes) the next recorded
    tensor, in the caller's dtype and device, and fails if its shape differs; leaving the block
    fails if a recorded draw was not used. So a test gives the official code's own noise, t and
    labels to ours, whatever this machine's random stream is. Inside `with Draws.record() as drawn:`
    the calls run as usual and `drawn` lists (function name, tensor) in call order: the draw-order
    tests compare ours with a replay of the official order on this machine's RNG."""

    FUNCS = ("rand", "randn", "randint", "rand_like", "randn_like")
    METHODS = ("bernoulli_", "normal_", "uniform_")

    def __init__(self, feed=None):
        self.queue = None if feed is None else [torch.as_tensor(t) for t in feed]
        self.drawn = []

    def _shape(self, name, args, kwargs):
        if name.endswith("_like"):
            return tuple(args[0].shape)
        if name == "randint":
            size = kwargs.get(
                "size",
                args[-1] if args and isinstance(args[-1], (tuple, list, torch.Size)) else None,
            )
            return tuple(size)
        size = kwargs.get(
            "size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args
        )
        return tuple(size)

    def _next(self, name, shape):
        assert self.queue, f"{name}{shape}: no recorded draw left"
        t = self.queue.pop(0)
        assert tuple(t.shape) == tuple(shape), (
            f"{name}: drawn shape {tuple(shape)}, recorded {tuple(t.shape)}"
        )
        return t

    def _func(self, name, real):
        def draw(*args, **kwargs):
            if self.queue is None:
                out = real(*args, **kwargs)
                self.drawn.append((name, out.detach().clone()))
                return out
            like = args[0] if name.endswith("_like") else None
            dtype = kwargs.get("dtype") or (like.dtype if like is not None else None)
            device = kwargs.get("device") or (like.device if like is not None else None)
            if dtype is None:
                dtype = torch.int64 if name == "randint" else torch.get_default_dtype()
            return (
                self._next(name, self._shape(name, args, kwargs))
                .to(dtype=dtype, device=device)
                .clone()
            )

        return draw

    def _method(self, name, real):
        def draw(tensor, *args, **kwargs):
            if self.queue is None:
                out = real(tensor, *args, **kwargs)
                self.drawn.append((name, out.detach().clone()))
                return out
            with torch.no_grad():
                return tensor.copy_(self._next(name, tuple(tensor.shape)))

        return draw

    def __enter__(self):
        self.saved = [(torch, n, getattr(torch, n)) for n in self.FUNCS]
        self.saved += [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in self.METHODS]
        for owner, n, real in self.saved:
            setattr(owner, n, (self._func if owner is torch else self._method)(n, real))
        return self.drawn

    def __exit__(self, kind, *rest):
        for owner, n, real in self.saved:
            setattr(owner, n, real)
        if kind is None and self.queue:
            raise AssertionError(f"{len(self.queue)} recorded draws were not used")

    @classmethod
    def feed(cls, tensors):
        return cls(feed=list(tensors))

    @classmethod
    def record(cls):
        return cls()


@pytest.fixture
def reference():
    """-> a function (method, name) -> the fixture tests/reference/{method}_{name}.pt, made from the
    official code by tests/reference/make_references.py (its `meta` names the repository, commit and
    versions)."""

    def load(method, name):
        return torch.load(
            os.path.join(ROOT, "tests", "reference", f"{method}_{name}.pt"), weights_only=True
        )

    return load
