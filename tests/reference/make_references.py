"""Make the fixtures in tests/reference from the official code of each method.

The official code runs here only, never in the test suite: the suite reads the fixtures this script
writes (inputs, the state dict both sides load, outputs). Run it in a separate virtual environment
that has the official code's packages (timm, einops, ...), with the official repositories checked
out at the commits below:

    python -m venv refvenv
    refvenv/bin/pip install torch torchvision timm==0.9.16 einops==0.8.1 torchdiffeq==0.2.5 \\
        transformers==4.56.2 regex omegaconf==2.3.0
    refvenv/bin/python tests/reference/make_references.py --repos DIR [jit repa rae rcg ect]
    refvenv/bin/python tests/reference/make_references.py --repos DIR --bench   # official vs ours

DIR holds one folder per repository, named as in REPOS (for example DIR/JiT, DIR/REPA). Each
method's maker is make_<method>.py beside this file: make(repos) writes its fixtures, bench(repos)
prints the side-by-side timing. Each fixture records the repository, the commit and the package
versions that made it.
"""

import argparse
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# where save() writes (the tests that run a maker with stand-ins point it at a temporary folder)
OUT = HERE
REPOS = {  # method -> (folder under --repos, repository, commit)
    "jit": (
        "JiT",
        "zlong928/JiT (LTH14/JiT's model and denoiser files, unchanged)",
        "cbc743a2ada5e9762697da2c83f8c4f8379e8c17",
    ),
    "repa": ("REPA", "sihyun-yu/REPA", "67f714503e3892f993844aab088ffc5791c92613"),
    "rae": ("RAE", "bytetriper/RAE", "a4d18c4db766419cbe7cb8c02cd9f7ceb0ec9041"),
    "rcg": ("rcg", "LTH14/rcg", "0c4433c1d7fed93ed0dc81a6bde2acfe335d3798"),
    "ect": ("ect", "locuslab/ect", "4311059770f54821d151a9b0e1f76770a5f3930e"),
    "soda": (
        "soda",
        "FutureXiang/soda (a reimplementation; SODA has no official code)",
        "79f9c0a7c93ec6afb92e3afc034abd3e16a325b7",
    ),
}


def cpu_name():
    """The processor's model name (Linux /proc/cpuinfo; else platform's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions():
    """The machine and packages that made a fixture (plain strs and ints: weights_only loads
    them)."""
    out = dict(
        python=platform.python_version(),
        torch=str(torch.__version__),
        cpu=cpu_name(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        threads=torch.get_num_threads(),
    )
    for name in ("timm", "einops", "torchdiffeq", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def official(method, repos, *sub):
    """Put the official checkout (or a folder inside it) first on sys.path; -> its path."""
    path = os.path.join(repos, REPOS[method][0], *sub)
    if not os.path.isdir(path):
        sys.exit(f"make_references.py: no checkout of {REPOS[method][1]} at {path}")
    sys.path.insert(0, path)
    return path


def save(method, name, **tensors):
    """Write tests/reference/{method}_{name}.pt: the tensors (and plain values) plus `meta`
    (repository, commit, versions). Everything is stored so that torch.load(..., weights_only=True)
    reads it."""
    folder, repo, commit = REPOS[method]
    meta = dict(repository=repo, commit=commit, versions=versions())
    path = os.path.join(OUT, f"{method}_{name}.pt")
    torch.save(dict(meta=meta, **tensors), path)
    print(f"wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path) / 1e3:.0f} kB)")


# modules
MAKERS = {
    "jit": "make_jit",
    "repa": "make_repa",
    "rae": "make_rae",
    "rcg": "make_rcg",
    "ect": "make_ect",
}


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repos", required=True, help="folder holding the official checkouts")
    p.add_argument(
        "--bench", action="store_true", help="time the official module and ours instead (CPU, fp32)"
    )
    p.add_argument(
        "methods", nargs="*", default=list(MAKERS), help=f"which ({', '.join(MAKERS)}; default all)"
    )
    args = p.parse_args()
    sys.path[:0] = [HERE, ROOT]  # the makers, and this repository's files
    torch.set_num_threads(2)
    for m in args.methods:
        if m not in MAKERS:
            sys.exit(f"make_references.py: no maker for {m!r} ({', '.join(MAKERS)})")
        maker = __import__(MAKERS[m])
        (maker.bench if args.bench else maker.make)(args.repos)


if __name__ == "__main__":
    main()
