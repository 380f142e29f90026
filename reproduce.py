"""One command per machine: every method file's reproduction, and the seeds' question in one table.

    python reproduce.py cpu --out runs/repro_cpu   # any machine, offline: toys, a `shapes` row each
    python reproduce.py gpu --out runs/repro_gpu   # one GPU: CIFAR-10 with FID (estimates its time)
    python reproduce.py tiny --out DIR             # every command at --preset tiny, in minutes
    python reproduce.py cpu|gpu|tiny --dry-run     # parse every command with its file's parser
    python reproduce.py bench [--preset B] [--compile]   # img/s, MFU, peak memory per train step
    python reproduce.py memory                     # each default preset's GPU memory (estimated)
    python reproduce.py bench-data --root DIR      # start, memory and batch() rate of a 1M folder
    python reproduce.py paper --dry-run            # every --preset paper: commands, 8-GPU time

A plan only calls the method files' own commands (each printed before it runs) and reads what they
write. It first trains the encoder the others align to or read (exported: decoupled_latent.py's
z_u, on gpu soda.py's z; no download), then one row per method with the paper's own comparison
beside it (the control: REPA without alignment, a plain DiT for RAE's DiT^DH, RCG without the
representation, the undivided latent, the network at initialisation), REPA's at three seeds, whose
paired differences decide `held` (paired()), and the split latent's own test (swap).
DIR/results.json has one row per method (figures, command, minutes, claim, held), DIR/table.md the
README's tables and DIR/figure.svg the probe against FD, the probe across noise levels and the swap
test. A finished row is read again, not rerun; a row that failed is run again (a training command
whose checkpoint exists resumes with the same command); --only runs some rows.

The noise axis is the same for every file: each eval.json's probe_linear_by_signal is [[signal,
accuracy], ...], where signal = a/(a+s) is the fraction of signal in the denoiser's input a*x + s*e
(0: pure noise, 1: clean).
"""

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
# dense bf16 FLOP/s
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
# training steps of each command per machine (None: the preset's own); `gpu`: ~40 minutes of one
# H100 (see estimate())
STEPS = {
    "tiny": {},
    "cpu": dict(
        dl=600,
        jit=300,
        ct=300,
        soda=1000,
        repa=400,
        rae_dec=1000,
        rae=200,
        rdm=1000,
        rcg=200,
        dl_gen=500,
    ),
    "gpu": dict(
        enc=4000,
        jit=4000,
        ct=4000,
        soda=4000,
        repa=4000,
        rae_dec=3000,
        rae=3000,
        rdm=3000,
        rcg=3000,
        dl=3000,
        dl_gen=3000,
    ),
}
# the fraction of the bf16 peak the gpu plan's estimate assumes
MFU = 0.4
# the seeds of the comparisons run as pairs at several seeds (REPA's), per machine
SEEDS = {"tiny": ["0"], "cpu": ["0", "1", "2"], "gpu": ["0", "1", "2"]}
# the one-sided 95% quantile of Student's t at k degrees of freedom (scipy.stats.t.ppf(0.95, k))
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833}
# eval.json's detail figures (common.detail): the stripes' pattern and amplitude
DETAIL = ("detail_pattern", "detail_amplitude")
# the split's own test (decoupled_latent.py eval's `swap`): each decoding of test image A
SWAPS = {
    "all": "A's z_u, z_s, z_d",
    "drop_d": "z_d dropped",
    "z_d_from_B": "z_d from B",
    "z_u_from_B": "z_u from B",
}


def figures(r, **extra):
    """What every row reports of its eval.json r: FD, the probes and the detail kept (the stripes'
    pattern and amplitude), with their floors (at initialisation, raw pixels; the detail's ceiling
    is the raw pixels', its floor the blurred images'), the probe across the signal fraction, then
    extra."""
    keys = [k + s for k in ("probe_linear", "probe_knn") for s in ("", "_init", "_pixels")]
    keys += [k + s for k in DETAIL for s in ("", "_init", "_pixels", "_blurred")]
    return {k: r.get(k) for k in ["fd", *keys, "probe_linear_by_signal"]} | extra


def read_jit_toy(r):
    """jit_xpred.py's toy.json -> the sliced W1 of each prediction target at each dimension."""
    return {f"sw_{x['pred']}_D{x['D']}": x["distance"] for x in r["results"]}


def read_consistency_toy(r):
    """consistency.py's toy.json -> the sliced W1 of each model at each number of steps."""
    return {f"sw_{x['model']}_{x['steps']}step": x["distance"] for x in r["results"]}


def read_consistency(r):
    return figures(r, fd_2step=r.get("fd_2step"))


def read_probes(r):
    """The encoder row's figures: the probes and their floors alone (its eval's FD and detail are
    the decoupled row's)."""
    return {k: v for k, v in figures(r).items() if k.startswith("probe")}


class Plan:
    """One machine's rows: each method file's commands, every run in its own folder under out.

    A row is dict(method, runs: [argv], result: the eval.json (or toy.json) the row reads, read:
    that json -> figures, claim, paper, pair: (figure, its control's figure, "lower" or "higher" is
    the paper's direction))."""

    def __init__(self, machine, out):
        self.machine = machine
        self.out = out
        if machine == "tiny":
            self.base = ["--preset", "tiny", "--device", "cpu"]
        elif machine == "cpu":
            self.base = ["--preset", "cpu"]
        else:
            self.base = ["--data", "cifar10", "--compile"]
        # the evals' samples (on gpu: FD against CIFAR-10 with Inception's features; on cpu in the
        # space of the 16 px images' own pixels, which sees the contours, not 8x8 pools)
        if machine == "tiny":
            self.ev = ["--n", "50"]
        elif machine == "cpu":
            self.ev = ["--n", "500", "--fd-model", "pixels@16"]
        else:
            self.ev = ["--n", "10000", "--fd-model", "inception"]
        self.toy = ["--toy-steps", "50"] if machine == "tiny" else []
        # the encoder trained first (the encoder row's export): repa, rae and rcg read it
        self.encoder_file = os.path.join(out, "enc.pt")
        self.encoder = ["--encoder", self.encoder_file]

    def folder(self, name, file=""):
        """A run's folder, or a file in it."""
        return os.path.join(self.out, name, file) if file else os.path.join(self.out, name)

    def ckpt(self, name):
        return self.folder(name, "ckpt.pt")

    def result(self, name):
        return self.folder(name, "eval.json")

    def train(self, file, cmd, name, key, *extra):
        """A training command at the machine's preset and STEPS[machine][key] steps."""
        n = STEPS[self.machine].get(key)
        steps = ["--steps", str(n)] if n else []
        return [file, cmd, *self.base, *steps, *extra, "--out", self.folder(name)]

    def evaluate(self, file, name, *extra):
        return [file, "eval", "--ckpt", self.ckpt(name), *self.ev, *extra]

    def export(self, file, name):
        """The trained encoder -> OUT/enc.pt, which --encoder reads."""
        return [file, "export-encoder", "--ckpt", self.ckpt(name), "--out", self.encoder_file]

    def control(self, name, key="fd"):
        """One figure of a control run's eval.json."""
        with open(self.result(name)) as f:
            return json.load(f).get(key)

    def encoder_row(self):
        """gpu: soda.py's z (the paper: 80% linear probe on CIFAR-10), exported. Else
        decoupled_latent.py's E_u (SimCLR): on `shapes` it probes higher than soda.py's z at a CPU's
        budget. Its autoencoder is the split latent's, so the generator over it is trained here and
        one eval of it serves this row (z_u's probes) and decoupled_latent.py's (everything
        else)."""
        if self.machine == "gpu":
            return dict(
                method="encoder (soda.py)",
                runs=[
                    self.train("soda.py", "train", "enc", "enc"),
                    self.evaluate("soda.py", "enc"),
                    self.export("soda.py", "enc"),
                ],
                result=self.result("enc"),
                read=figures,
                claim="z probes above the same encoder at initialisation",
                paper="SODA CIFAR-10 linear probe 80.0",
                pair=("probe_linear", "probe_linear_init", "higher"),
            )
        file = "decoupled_latent.py"
        return dict(
            method="encoder (decoupled_latent.py z_u)",
            runs=[
                self.train(file, "train", "dl", "dl"),
                self.export(file, "dl"),
                self.train(file, "train-gen", "dl_gen", "dl_gen", "--ae", self.ckpt("dl")),
                self.evaluate(file, "dl_gen"),
            ],
            result=self.result("dl_gen"),
            read=read_probes,
            claim="z_u probes above its initialisation",
            paper="SimCLR-style invariance on z_u",
            pair=("probe_linear", "probe_linear_init", "higher"),
        )

    def jit_toy_row(self):
        out = ["--out", self.folder("jit_toy")]
        return dict(
            method="jit_xpred.py (toy)",
            runs=[["jit_xpred.py", "toy", "--dims", "2", "512", *self.toy, *out]],
            result=self.folder("jit_toy", "toy.json"),
            read=read_jit_toy,
            claim=(
                "at D = 512, x-prediction samples the spiral (sliced W1), eps-prediction does not"
            ),
            paper="Fig. 2: x-pred holds at D = 512, eps/v collapse",
            pair=("sw_x_D512", "sw_eps_D512", "lower"),
        )

    def consistency_toy_row(self):
        return dict(
            method="consistency.py (toy)",
            runs=[["consistency.py", "toy", *self.toy, "--out", self.folder("ct_toy")]],
            result=self.folder("ct_toy", "toy.json"),
            read=read_consistency_toy,
            claim=(
                "1-step samples from scratch land on the data (sliced W1), "
                "far from the initialisation's"
            ),
            paper="ECT: 1- and 2-step FID 3.60 / 2.11 on CIFAR-10",
            pair=("sw_trained_1step", "sw_init_1step", "lower"),
        )

    def jit_row(self):
        return dict(
            method="jit_xpred.py",
            runs=[
                self.train("jit_xpred.py", "train", "jit", "jit"),
                self.evaluate("jit_xpred.py", "jit"),
            ],
            result=self.result("jit"),
            read=figures,
            claim=None,
            paper="JiT-B/16 ImageNet 256 FID 3.66",
            pair=None,
        )

    def consistency_row(self):
        return dict(
            method="consistency.py",
            runs=[
                self.train("consistency.py", "train", "ct", "ct"),
                self.evaluate("consistency.py", "ct"),
            ],
            result=self.result("ct"),
            read=read_consistency,
            claim=None,
            paper="ECT CIFAR-10 FID 3.60 (1 step)",
            pair=None,
        )

    def soda_row(self):
        """soda.py's own row (on gpu the encoder row is soda.py's)."""
        return dict(
            method="soda.py",
            runs=[
                self.train("soda.py", "train", "soda", "soda"),
                self.evaluate("soda.py", "soda"),
            ],
            result=self.result("soda"),
            read=figures,
            claim="z probes above the same encoder at initialisation",
            paper="SODA CIFAR-10 linear probe 80.0",
            pair=("probe_linear", "probe_linear_init", "higher"),
        )

    def repa_row(self, seed):
        """REPA against the same SiT without alignment (--proj-coeff 0), at one seed. On cpu the
        encoder reads 32 px (its map 4x4, one vector per SiT token): a target with spatial
        structure, not a 2x2 map upsampled."""
        tag = "" if seed == "0" else f"_s{seed}"
        encoder = (
            ["--encoder", self.encoder_file + "@32"] if self.machine == "cpu" else self.encoder
        )
        aligned = [*encoder, "--seed", seed]
        unaligned = [*aligned, "--proj-coeff", "0"]
        return dict(
            method="repa.py" if seed == "0" else f"repa.py (seed {seed})",
            runs=[
                self.train("repa.py", "train", f"repa{tag}", "repa", *aligned),
                self.evaluate("repa.py", f"repa{tag}"),
                self.train("repa.py", "train", f"sit{tag}", "repa", *unaligned),
                self.evaluate("repa.py", f"sit{tag}"),
            ],
            result=self.result(f"repa{tag}"),
            read=functools.partial(self.read_repa, f"sit{tag}"),
            claim="aligned to the trained encoder, the SiT's FD is lower than without alignment",
            paper="SiT-B/2 + REPA 400k FID 24.4 (no CFG); 17.5x faster",
            pair=("fd", "fd_control", "lower"),
        )

    def read_repa(self, control, r):
        return figures(
            r,
            fd_control=self.control(control),
            probe_linear_control=self.control(control, "probe_linear"),
        )

    def rae_row(self):
        """RAE's DiT^DH against a plain DiT (--head none) on the same decoder. On cpu the latent is
        the preset's random-vit-s@56 (4 x 4 tokens of 384), which its decoder reconstructs at 25 dB
        or more: the encoder row's z_u, trained to forget the stripes, reconstructs at about 13."""
        decoder = ["--decoder", self.ckpt("rae_dec")]
        encoder = [] if self.machine == "cpu" else self.encoder
        return dict(
            method="rae.py (random-vit-s@56)" if self.machine == "cpu" else "rae.py",
            runs=[
                self.train("rae.py", "train-decoder", "rae_dec", "rae_dec", *encoder),
                self.train("rae.py", "train", "rae", "rae", *decoder),
                self.evaluate("rae.py", "rae"),
                self.train("rae.py", "train", "rae_plain", "rae", *decoder, "--head", "none"),
                self.evaluate("rae.py", "rae_plain"),
            ],
            result=self.result("rae"),
            read=self.read_rae,
            claim="DiT^DH's FD is lower than a plain DiT's with as many parameters",
            paper="RAE DiT^DH-XL ImageNet 256 FID 1.51, rFID 0.57",
            pair=("fd", "fd_control", "lower"),
        )

    def read_rae(self, r):
        return figures(
            r, fd_control=self.control("rae_plain"), psnr=r["psnr"], psnr_init=r["psnr_init"]
        )

    def rcg_row(self):
        """RCG against the same pixel generator without the representation (--no-rep)."""
        return dict(
            method="rcg.py",
            runs=[
                self.train("rcg.py", "train-rdm", "rdm", "rdm", *self.encoder),
                self.train("rcg.py", "train", "rcg", "rcg", *self.encoder),
                self.evaluate("rcg.py", "rcg", "--rdm", self.ckpt("rdm")),
                self.train("rcg.py", "train", "rcg_norep", "rcg", *self.encoder, "--no-rep"),
                self.evaluate("rcg.py", "rcg_norep"),
            ],
            result=self.result("rcg"),
            read=self.read_rcg,
            claim="pixels generated from a generated representation: lower FD than without one",
            paper="RCG DiT-XL unconditional ImageNet 256 FID 4.89 (27.32 without)",
            pair=("fd", "fd_control", "lower"),
        )

    def read_rcg(self, r):
        return figures(r, fd_control=self.control("rcg_norep"), rep_fd=r.get("rep_fd"))

    def decoupled_latent_row(self):
        """The split latent (its autoencoder and generator: the encoder row's runs, on gpu trained
        here) against the undivided one (--no-decouple)."""
        file = "decoupled_latent.py"
        runs = []
        if self.machine == "gpu":
            runs += [
                self.train(file, "train", "dl", "dl"),
                self.train(file, "train-gen", "dl_gen", "dl_gen", "--ae", self.ckpt("dl")),
                self.evaluate(file, "dl_gen"),
            ]
        runs += [
            self.train(file, "train", "dl_joint", "dl", "--no-decouple"),
            self.evaluate(file, "dl_joint"),
        ]
        return dict(
            method=file,
            runs=runs,
            result=self.result("dl_gen"),
            read=self.read_decoupled_latent,
            claim="z_u of the split latent probes above the same slice of the undivided one",
            paper="the seeds' proposal (no paper)",
            pair=("probe_linear", "probe_linear_control", "higher"),
        )

    def read_decoupled_latent(self, r):
        return figures(
            r,
            probe_linear_control=self.control("dl_joint", "probe_linear"),
            probe_linear_z_d=r["parts"]["z_d"]["probe_linear"],
            probe_linear_all=r["parts"]["all"]["probe_linear"],
            psnr_all=r["psnr_all"],
            psnr_drop_d=r["psnr_drop_d"],
        )

    def swap_row(self):
        """The split's own test, read from the decoupled row's two evals: test image A decoded with
        z_d from another test image B. The claim holds if the stripes follow B (the donor of z_d)
        while the class stays with A; the undivided control should mix them."""
        return dict(
            method="decoupled_latent.py (swap)",
            runs=[],
            result=self.result("dl_gen"),
            read=self.read_swap,
            claim="decoding A with z_d from B, the stripes follow B (pattern read against B's)",
            paper="the seeds' proposal: z_d holds the detail",
            pair=("swap_pattern_B", "swap_pattern_A", "higher"),
        )

    def read_swap(self, r):
        """-> the swap figures of the split (swap) and of the control (swap_control), and the pair's
        two figures under z_d from B."""
        control = self.control("dl_joint", "swap")
        under = r["swap"]["z_d_from_B"]
        return dict(
            swap=r["swap"],
            swap_control=control,
            swap_pattern_A=under["pattern_A"],
            swap_pattern_B=under["pattern_B"],
        )


def plan(machine, out):
    """-> the rows (see Plan), in the order they run: the encoder the others align to or read, the
    toys, one row per method with its control (REPA's at several seeds), and the split's own test
    (swap)."""
    p = Plan(machine, out)
    rows = [
        p.encoder_row(),
        p.jit_toy_row(),
        p.consistency_toy_row(),
        p.jit_row(),
        p.consistency_row(),
    ]
    # on gpu the encoder row is soda.py's
    if machine != "gpu":
        rows.append(p.soda_row())
    # REPA's pair at several seeds: judged by its paired differences
    rows += [p.repa_row(seed) for seed in SEEDS[machine]]
    rows += [p.rae_row(), p.rcg_row(), p.decoupled_latent_row(), p.swap_row()]
    return rows


# The papers' own runs: each file's `--preset paper` (and `paper-<size>`), with the number the paper
# reports for it. --data is the user's: ImageNet (train/<class>/, val/<class>/) or, for REPA, the
# folder of its sd-vae latents (repa.py's docstring). `count`: the flags that stand in, when the
# FLOPs are counted here, for what this machine lacks (DINOv2: a random ViT of its width and
# depth; latents: pixels of the latents' size).
RANDOM_VIT_B = ["--encoder", "random-vit-b@224"]


def paper_plan(imagenet, latents, out):
    def run(file, cmd, preset, name, *extra):
        return [file, cmd, "--preset", preset, *extra, "--out", os.path.join(out, name)]

    def jit_row(preset, size, fid):
        name = "jit_" + size.split("-")[1].replace("/", "").lower()
        return dict(
            method=f"jit_xpred.py ({size})",
            runs=[run("jit_xpred.py", "train", preset, name, "--data", imagenet)],
            paper=f"{size} ImageNet 256 FID {fid}",
            preset=preset,
        )

    def repa_row(preset, size, fid):
        latent_size = ["--set", "latents=false", "--set", "channels=3", "--image-size", "32"]
        name = "repa_" + size.split("-")[1].replace("/", "").lower()
        return dict(
            method=f"repa.py ({size})",
            runs=[run("repa.py", "train", preset, name, "--data", latents)],
            paper=f"{size} + REPA ImageNet 256 FID {fid}",
            preset=preset,
            count={"train": [*RANDOM_VIT_B, *latent_size]},
        )

    rae_dec = os.path.join(out, "rae_decoder", "ckpt.pt")
    return [
        jit_row("paper", "JiT-B/16", "3.66 (600 epochs, CFG)"),
        jit_row("paper-L", "JiT-L/16", "2.36 (600 epochs, CFG)"),
        jit_row("paper-H", "JiT-H/16", "1.86 (600 epochs, CFG)"),
        dict(
            method="consistency.py (ECT, ECM)",
            runs=[run("consistency.py", "train", "paper", "ect")],
            paper="ECT CIFAR-10 FID 3.86 / 2.15 (1 / 2 steps, 200k steps from an EDM checkpoint)",
            preset="paper",
        ),
        repa_row("paper", "SiT-XL/2", "1.42 (4M steps, CFG 1.8)"),
        repa_row("paper-B", "SiT-B/2", "24.4 (400k steps, no CFG)"),
        dict(
            method="soda.py",
            runs=[run("soda.py", "train", "paper", "soda")],
            paper="SODA CIFAR-10 linear probe 80.0, kNN 80.4 (800 epochs)",
            preset="paper",
        ),
        dict(
            method="rae.py (DiT^DH-XL)",
            runs=[
                run("rae.py", "train-decoder", "paper", "rae_decoder", "--data", imagenet),
                run("rae.py", "train", "paper", "rae", "--decoder", rae_dec),
            ],
            paper="RAE DiT^DH-XL ImageNet 256 FID 1.51 (no guidance), decoder rFID 0.57",
            preset="paper",
            count={"train-decoder": RANDOM_VIT_B},
        ),
        dict(
            method="rcg.py (DiT-XL)",
            runs=[
                run("rcg.py", "train-rdm", "paper", "rcg_rdm", "--data", imagenet),
                run("rcg.py", "train", "paper", "rcg", "--data", imagenet),
            ],
            paper="RCG DiT-XL unconditional ImageNet 256 FID 4.89 (27.32 without RCG)",
            preset="paper",
            count={"train-rdm": RANDOM_VIT_B, "train": RANDOM_VIT_B},
        ),
    ]


def paper_dry_run(args):
    """Each paper run's commands (torchrun on --gpus processes), and its training time on that
    many H100s at MFU of their bf16 peak, from the FLOPs of its own step counted here."""
    out = args.out
    rows = paper_plan(args.imagenet, args.latents, out)
    if args.only:
        rows = [r for r in rows if r["method"].split(" ")[0] in args.only.split(",")]
    bad = [f"{' '.join(a)}: {e}" for r in rows for a in r["runs"] if (e := parses(a))]
    if bad:
        print("error: " + "\n       ".join(bad), file=sys.stderr)
        sys.exit(2)
    torchrun = f"torchrun --nproc_per_node {args.gpus}"
    for row in rows:
        print(f"{row['method']}: {row['paper']} (--preset {row['preset']})")
        for argv in row["runs"]:
            print(f"    {torchrun} {' '.join(argv)}")
    if args.no_estimate:
        return
    print("counting each run's FLOPs per step on this machine (minutes)...", flush=True)
    total = 0
    for e in estimates(rows, out, args.gpus):
        total += e["minutes"]
        print(json.dumps(e), flush=True)
    print(
        f"estimate: {total / 60:.0f} hours of training on {args.gpus} H100s at {MFU:.0%} of their "
        "bf16 peak, plus the evals' sampling"
    )


def difference(row):
    """A comparison's margin in the paper's direction: control - ours where lower is better, else
    ours - control; FD relative to the pair's mean, the other figures as they are -> float, or None
    when a figure is missing."""
    key, ctrl, better = row["pair"]
    a, b = row.get(key), row.get(ctrl)
    if a is None or b is None:
        return None
    margin = (b - a) if better == "lower" else (a - b)
    return margin / ((a + b) / 2) if key == "fd" else margin


def kind(key):
    """The kind of figure a pair compares: fd, probe or another."""
    return "fd" if key == "fd" else "probe" if key.startswith("probe") else key


def seeds_of(rows, name):
    """The rows of one comparison run at several seeds: NAME and NAME (seed k)."""
    return [r for r in rows if r["method"] == name or r["method"].startswith(f"{name} (seed ")]


def mean_se(ds):
    """-> (mean, standard deviation, standard error) of two or more numbers."""
    n = len(ds)
    mean = sum(ds) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in ds) / (n - 1))
    return mean, sd, sd / math.sqrt(n)


def paired(rows):
    """The comparisons run at several seeds, judged as pairs: per comparison (its first row's
    method) the paired differences d_k = difference() at each seed k, their mean, standard
    deviation and standard error, t = mean / se and the one-sided 95% quantile T95[n - 1] it must
    pass. For the noise of a pair run once, the same of the probe (probe_linear against
    probe_linear_control) where those rows have it: {method: {kind: dict(...)}}."""
    out = {}
    probe = ("probe_linear", "probe_linear_control", "higher")
    for name in {r["method"].split(" (seed ")[0] for r in rows if "(seed " in r["method"]}:
        group = [r for r in seeds_of(rows, name) if r.get("pair") and "error" not in r]
        stats = {}
        for pair in [r["pair"] for r in group[:1]] + [probe]:
            ds = [difference(dict(r, pair=pair)) for r in group]
            ds = [d for d in ds if d is not None]
            if len(ds) < 2 or kind(pair[0]) in stats:
                continue
            mean, sd, se = mean_se(ds)
            stats[kind(pair[0])] = dict(
                seeds=len(ds),
                differences=[round(d, 4) for d in ds],
                mean=round(mean, 4),
                sd=round(sd, 4),
                se=round(se, 4),
                t=round(mean / max(se, 1e-12), 2),
                t95=T95[len(ds) - 1],
            )
        if stats:
            out[name] = stats
    return out


def held(row, stats):
    """A comparison run at several seeds holds where its mean paired difference passes the one-sided
    t test (t > T95[n - 1]); one run once, where its difference exceeds T95[n - 1] standard
    deviations of the paired differences of that kind measured at several seeds (FD relative; no
    such measure: the paper's direction alone) -> True, False or None (no pair, or a failed
    run)."""
    if not row.get("pair") or "error" in row:
        return None
    d = difference(row)
    if d is None:
        return None
    name, k = row["method"].split(" (seed ")[0], kind(row["pair"][0])
    if k in stats.get(name, {}):
        s = stats[name][k]
        return s["t"] > s["t95"]
    noise = [s[k] for s in stats.values() if k in s]
    if not noise:
        return d > 0
    return d > noise[0]["t95"] * noise[0]["sd"]


def best_signal(by_signal):
    """[[signal, accuracy], ...] -> the signal fraction with the highest linear probe."""
    return max(by_signal, key=lambda p: p[1])[0] if by_signal else None


def table(rows, stats):
    """The README's tables (markdown): each figure beside its floor or its control, the raw and the
    blurred pixels' rows, the paired statistics, and the split's own test."""

    def fmt(v):
        if v is None:
            return ""
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    def pair(r, k, s="_init"):
        """A figure and, in brackets, its floor or control."""
        return fmt(r.get(k)) + (f" ({fmt(r[k + s])})" if r.get(k + s) is not None else "")

    lines = [
        "| method | minutes | FD (control) | probe linear (init) | probe kNN (init) "
        "| detail: pattern (init) | detail: amplitude (init) | best signal "
        "| the paper's comparison | ours | control | held |",
        "|---|---:|" + "---:|" * 6 + "---|---:|---:|---|",
    ]
    for r in rows:
        key, ctrl, better = r.get("pair") or (None, None, None)
        ok = {True: "yes", False: "**no**", None: ""}[r.get("held")]
        cols = [
            fmt(r.get("minutes")),
            pair(r, "fd", "_control"),
            pair(r, "probe_linear"),
            pair(r, "probe_knn"),
            pair(r, "detail_pattern"),
            pair(r, "detail_amplitude"),
            fmt(best_signal(r.get("probe_linear_by_signal"))),
        ]
        cmp = f"{r['claim']} ({key} {better})" if key else ""
        lines.append(
            f"| {r['method']} | {' | '.join(cols)} | {cmp} | {fmt(r.get(key))} | "
            f"{fmt(r.get(ctrl))} | {ok} |"
        )
    px = next((r for r in rows if r.get("detail_pattern_pixels") is not None), None)
    px = px or next((r for r in rows if r.get("probe_linear_pixels") is not None), None)
    if px:
        lines.append(
            f"| raw pixels (probe: floor; detail: ceiling) | | | "
            f"{fmt(px['probe_linear_pixels'])} | {fmt(px['probe_knn_pixels'])} | "
            f"{fmt(px.get('detail_pattern_pixels'))} | {fmt(px.get('detail_amplitude_pixels'))} "
            "| | | | | |"
        )
        if px.get("detail_pattern_blurred") is not None:
            lines.append(
                "| the same images blurred, sigma 1.5 px (detail: floor) | | | | | "
                f"{fmt(px['detail_pattern_blurred'])} | {fmt(px['detail_amplitude_blurred'])} "
                "| | | | | |"
            )
    lines += ["", *statistics(stats), *swap_table(rows)]
    return "\n".join(lines) + "\n"


def statistics(stats):
    """The lines that say how `held` was decided, with the paired statistics measured."""
    lines = [
        "Held: a comparison run at several seeds holds where the mean of its paired differences "
        "(control - ours where lower is better, else ours - control; FD relative to the pair's "
        "mean) passes a one-sided t test at 95% (t = mean / standard error above Student's "
        "quantile); one run once, where its difference exceeds that quantile times the standard "
        "deviation of the paired differences of its kind measured at several seeds (a kind with "
        "no such measure, such as the swap test's stripes: the paper's direction alone)."
    ]
    for name, by_kind in sorted(stats.items()):
        for k, s in by_kind.items():
            ds = ", ".join(f"{d:+.3g}" for d in s["differences"])
            lines.append(
                f"- {name}, {k} over {s['seeds']} seeds: differences {ds}; mean {s['mean']:+.3g}, "
                f"sd {s['sd']:.3g}, standard error {s['se']:.3g}, t = {s['t']:.3g} against "
                f"{s['t95']} ({s['seeds'] - 1} df)."
            )
    if not stats:
        lines.append("- no comparison was run at several seeds: held by the direction alone.")
    return lines


def swap_table(rows):
    """The split's own test (the swap row's figures): each decoding of test image A, its stripes
    read against A's and B's factors, the class of the image made (a z_u probe fitted on real
    images) against A's and B's labels, for the split and for its undivided control."""
    r = next((r for r in rows if r.get("swap")), None)
    if r is None:
        return []

    def fmt(v):
        return "" if v is None else f"{v:.3g}"

    lines = [
        "",
        "The split's own test: test image A decoded from its latent with parts swapped in from "
        "another test image B (decoupled_latent.py eval's `swap`); stripes (pattern R^2) read "
        "against A's and B's factors, class by a z_u probe fitted on real images; split | "
        "undivided control (--no-decouple).",
        "",
        "| decoding of A | stripes of A | stripes of B | class of A | class of B "
        "| control: stripes of A | stripes of B | class of A | class of B |",
        "|---|" + "---:|" * 8,
    ]
    for name, what in SWAPS.items():
        cells = []
        for swap in (r["swap"], r.get("swap_control") or {}):
            s = swap.get(name, {})
            cells += [fmt(s.get(k)) for k in ("pattern_A", "pattern_B", "class_A", "class_B")]
        lines.append(f"| {what} | {' | '.join(cells)} |")
    psnr = {name: r["swap"].get(name, {}).get("psnr_A") for name in ("all", "drop_d")}
    lines.append(
        f"\nPSNR of A's reconstruction: {fmt(psnr['all'])} dB with z_d, "
        f"{fmt(psnr['drop_d'])} dB without."
    )
    return lines


def svg(rows, path):
    """figure.svg without a plotting package: left, the linear probe against FD (one point per run,
    a line to its control); middle, the probe of each denoiser's features against the signal
    fraction a/(a+s) of its input a*x + s*e; right, the split's own test (bars: test image A
    decoded with z_d from B, its stripes and class read against A and against B, for the split and
    its undivided control)."""
    pts = [
        (
            r["method"],
            r["fd"],
            r["probe_linear"],
            r.get("fd_control"),
            r.get("probe_linear_control"),
        )
        for r in rows
        if r.get("fd") is not None and r.get("probe_linear") is not None
    ]
    curves = [
        (r["method"], r["probe_linear_by_signal"]) for r in rows if r.get("probe_linear_by_signal")
    ]
    swap = next((r for r in rows if r.get("swap")), None)
    W, H, P = 360, 260, 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{(3 if swap else 2) * W}" height="{H}" '
        'font-family="sans-serif" '
        f'font-size="10"><rect width="100%" height="100%" fill="white"/>'
    ]

    def axes(x0, xs, ys, xlabel, ylabel, log=False):

        def tx(v):
            """The x axis' scale."""
            return math.log10(v) if log else v

        lo, hi = min(map(tx, xs)), max(map(tx, xs))
        ylo, yhi = min(ys), max(ys)

        def fx(v):
            """x value -> pixel column."""
            return x0 + P + (tx(v) - lo) / (hi - lo or 1) * (W - 2 * P)

        def fy(v):
            """y value -> pixel row."""
            return H - P - (v - ylo) / (yhi - ylo or 1) * (H - 2 * P)

        out.append(
            f'<rect x="{x0 + P}" y="{P}" width="{W - 2 * P}" height="{H - 2 * P}" fill="none" '
            'stroke="#999"/>'
        )
        out.append(f'<text x="{x0 + W / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>')
        out.append(
            f'<text x="{x0 + 10}" y="{H / 2}" transform="rotate(-90 {x0 + 10} {H / 2})" '
            f'text-anchor="middle">{ylabel}</text>'
        )
        for v, f, anchor in ((lo, fx, "start"), (hi, fx, "end")):
            out.append(
                f'<text x="{f(10**v if log else v)}" y="{H - P + 12}" text-anchor="{anchor}">'
                f"{(10**v if log else v):.3g}</text>"
            )
        out.append(f'<text x="{x0 + P - 3}" y="{fy(ylo)}" text-anchor="end">{ylo:.3g}</text>')
        out.append(f'<text x="{x0 + P - 3}" y="{fy(yhi) + 8}" text-anchor="end">{yhi:.3g}</text>')
        return fx, fy

    if pts:
        xs = [p[1] for p in pts] + [p[3] for p in pts if p[3] is not None]
        ys = [p[2] for p in pts] + [p[4] for p in pts if p[4] is not None]
        fx, fy = axes(0, xs, ys, "FD (log scale; lower is better)", "linear probe", log=min(xs) > 0)
        for name, fd, pr, fd_c, pr_c in pts:
            if fd_c is not None:
                y_c = fy(pr if pr_c is None else pr_c)
                out.append(
                    f'<line x1="{fx(fd)}" y1="{fy(pr)}" x2="{fx(fd_c)}" y2="{y_c}" stroke="#bbb"/>'
                    f'<circle cx="{fx(fd_c)}" cy="{y_c}" r="3" fill="white" stroke="#555"/>'
                )
            out.append(
                f'<circle cx="{fx(fd)}" cy="{fy(pr)}" r="3.5" fill="#1f5fbf"/>'
                f'<text x="{fx(fd) + 5}" y="{fy(pr) - 4}">{name}</text>'
            )
    if curves:
        xs = [signal for _, c in curves for signal, _ in c]
        ys = [a for _, c in curves for _, a in c]
        xlabel = "signal a/(a+s) in the input a·x + s·e (0: noise, 1: clean)"
        fx, fy = axes(W, xs, ys, xlabel, "linear probe")
        colours = ["#1f5fbf", "#c0392b", "#27ae60", "#8e44ad", "#d35400"]
        for k, (name, c) in enumerate(curves):
            col = colours[k % len(colours)]
            out.append(
                f'<polyline fill="none" stroke="{col}" points="'
                + " ".join(f"{fx(signal)},{fy(a)}" for signal, a in c)
                + '"/>'
            )
            out.append(f'<text x="{W + P + 4}" y="{P + 12 + 12 * k}" fill="{col}">{name}</text>')
    if swap:
        swap_panel(out, swap, 2 * W, W, H, P)
    open(path, "w", encoding="utf-8").write("\n".join(out + ["</svg>"]) + "\n")


def swap_panel(out, row, x0, W, H, P):
    """The split's own test as bars on [0, 1] (svg's third panel): under z_d from B, the stripes'
    pattern R^2 against A and B and the class accuracy against A and B, split and control."""
    bars = []
    for label, swap in (("split", row["swap"]), ("control", row.get("swap_control") or {})):
        s = swap.get("z_d_from_B", {})
        for k, colour in (
            ("pattern_A", "#9ecae1"),
            ("pattern_B", "#1f5fbf"),
            ("class_A", "#fdae6b"),
            ("class_B", "#d35400"),
        ):
            bars.append((label, k, s.get(k), colour))
    # two groups of four bars with a bar's gap between and around them
    width = (W - 2 * P) / (len(bars) + 2)
    out.append(
        f'<rect x="{x0 + P}" y="{P}" width="{W - 2 * P}" height="{H - 2 * P}" fill="none" '
        'stroke="#999"/>'
    )
    out.append(
        f'<text x="{x0 + W / 2}" y="{P - 8}" text-anchor="middle">A decoded with z_d from B: '
        "stripes (blue) and class (orange) of A | of B</text>"
    )
    for i, (label, _, v, colour) in enumerate(bars):
        x = x0 + P + width * (i + 0.5 + i // 4)
        h = (H - 2 * P) * (v or 0)
        out.append(
            f'<rect x="{x:.1f}" y="{H - P - h:.1f}" width="{width * 0.8:.1f}" height="{h:.1f}" '
            f'fill="{colour}"/>'
        )
        if i % 4 == 0:
            middle = x + 2 * width
            out.append(
                f'<text x="{middle:.1f}" y="{H - P + 12}" text-anchor="middle">{label}</text>'
            )
    out.append(f'<text x="{x0 + P - 3}" y="{H - P}" text-anchor="end">0</text>')
    out.append(f'<text x="{x0 + P - 3}" y="{P + 8}" text-anchor="end">1</text>')


def commit():
    """-> the checkout's commit (with "+changes" when the tree differs from it), or None outside
    git."""

    def run(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    head = run("rev-parse", "--short", "HEAD")
    if head.returncode:
        return None
    changed = run("status", "--porcelain", "--untracked-files=no").stdout
    return head.stdout.strip() + ("+changes" if changed else "")


def run_row(row, log):
    """Runs a row's commands; a training command whose checkpoint exists resumes (the same command +
    --resume)."""
    t0 = time.time()
    for argv in row["runs"]:
        out = argv[argv.index("--out") + 1] if "--out" in argv else ""
        if argv[1].startswith("train") and os.path.isfile(os.path.join(out, "ckpt.pt")):
            argv = argv + ["--resume"]
        print(f"$ python {' '.join(argv)}", flush=True)
        log.write(f"$ python {' '.join(argv)}\n")
        log.flush()
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if r.returncode:
            error = f"exit {r.returncode}: python {' '.join(argv)}"
            return dict(error=error), (time.time() - t0) / 60
    return {}, (time.time() - t0) / 60


def module_of(file):
    import importlib

    sys.path.insert(0, ROOT)
    return importlib.import_module(file[:-3])


def parses(argv):
    """-> None if argv parses with its file's own parser, else the error line."""
    import common

    class Parsed(Exception):
        pass

    parse = common.Parser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    common.Parser.parse_args = stop
    try:
        module_of(argv[0]).main(argv[1:])
    except Parsed:
        return None
    except (common.UsageError, SystemExit) as e:
        return str(e)
    finally:
        common.Parser.parse_args = parse
    return "did not parse"


def counted(argv):
    """Runs a method file's command in this process on a CPU -> (FLOPs it counted, bytes of the
    distinct tensors autograd saved for backward, leaves such as weights and data left out)."""
    import torch
    import torch.utils.flop_counter

    import common

    saved = {}

    def pack(t):
        if t.grad_fn is not None or not t.is_leaf:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with (
        torch.utils.flop_counter.FlopCounterMode(display=False) as fc,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        contextlib.redirect_stdout(sys.stderr),
    ):
        common.load_images.cache_clear()
        common.cli(module_of(argv[0]).main, argv[1:])
    return fc.get_total_flops(), sum(saved.values())


def small_run(argv, folder, batch=2, steps=1):
    """argv (a training command) on `shapes:64` at a small batch for a few steps on a CPU, into
    folder."""
    argv = [a for a in argv if a != "--compile"]
    for flag in ("--data", "--steps", "--batch-size", "--out", "--device"):
        if flag in argv:
            i = argv.index(flag)
            argv = argv[:i] + argv[i + 2 :]
    return [
        *argv,
        "--data",
        "shapes:64",
        "--batch-size",
        str(batch),
        "--steps",
        str(steps),
        "--device",
        "cpu",
        "--set",
        "grid=0",
        "--out",
        folder,
    ]


def step_flops(argv, folder, save=True):
    """FLOPs of one training step of argv at batch 2: its run for two steps less its run for one
    (what a run does once, such as encoding the data set, cancels). save=False: no checkpoint is
    written (one that no later command reads; at full size it can outgrow this machine's memory)."""
    import common

    real = common.save_checkpoint

    def skip(path, obj):
        pass

    common.save_checkpoint = real if save else skip
    try:
        two = counted(small_run(argv, folder, steps=2))[0]
        one = counted(small_run(argv, folder + "_1", steps=1))[0]
    finally:
        common.save_checkpoint = real
    return two - one


def run_config(argv):
    """The Config a training command starts a run with (its preset, its flags and the file's own
    rules, such as an lr that follows the batch): the file's make_config, called where start_run
    would be; nothing is trained or written."""
    import common

    class Started(Exception):
        pass

    def capture(args, Config, presets, make_config):
        raise Started(make_config(args))

    real = common.start_run
    common.start_run = capture
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module_of(argv[0]).main(argv[1:])
    except Started as started:
        return started.args[0]
    finally:
        common.start_run = real
    raise RuntimeError(f"{' '.join(argv)} did not start a run")


def estimate(rows, out, gpus=1):
    """-> estimates(...) as a list."""
    return list(estimates(rows, out, gpus))


def estimates(rows, out, gpus=1):
    """A plan's training on `gpus` H100s at MFU of their bf16 peak: each training command's FLOPs
    per step at its run's batch (step_flops at batch 2, scaled) times its run's steps. A row's
    `count` flags stand in for what this machine lacks (a DINOv2 download: a random ViT of its
    size; ImageNet: `shapes` at the preset's size). The evals' sampling comes on top."""
    with tempfile.TemporaryDirectory() as tmp:

        def moved(argv):
            """The plan's folder -> a temporary one."""
            return [a.replace(out, tmp) for a in argv]

        for row in rows:
            for i, argv in enumerate(row["runs"]):
                # the exported encoder: what later commands read
                if argv[1] == "export-encoder":
                    counted(moved(argv))
                if not argv[1].startswith("train"):
                    continue
                argv = moved(argv)
                folder = argv[argv.index("--out") + 1]
                count = [*argv, *row.get("count", {}).get(argv[1], [])]
                cfg = run_config([*count, "--data", "shapes:64"])
                # the checkpoint is written where a later command of the row reads it
                later = [a for run in row["runs"][i + 1 :] for a in moved(run)]
                save = any(a.startswith(folder) for a in later)
                per_step = step_flops(count, folder, save) * cfg.batch_size / 2
                seconds = per_step * cfg.steps / (gpus * MFU * PEAK["H100"])
                yield dict(
                    command=f"{argv[0]} {argv[1]} {os.path.basename(folder)}",
                    steps=cfg.steps,
                    batch=cfg.batch_size,
                    tflop_per_step=round(per_step / 1e12, 2),
                    minutes=round(seconds / 60, 1),
                )


BENCH = {
    "jit_xpred.py": ["train"],
    "consistency.py": ["train"],
    "soda.py": ["train"],
    "repa.py": ["train", "--encoder", "random-vit-b@224"],
    "rae.py": ["train-decoder", "--encoder", "random-vit-b@224"],
    # DINOv2-B's compute
    "rcg.py": ["train", "--encoder", "random-vit-b@224"],
    "decoupled_latent.py": ["train"],
}


def bench(args):
    """Each file's own train step, as its command runs it (`train --preset P` on `shapes` at 32 px,
    the preset's batch): img/s and peak memory from its log.jsonl after --warmup steps, MFU from its
    FLOPs per step (step_flops)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    peak = None
    if dev == "cuda":
        peak = next((p for k, p in PEAK.items() if k in torch.cuda.get_device_name()), None)
    with tempfile.TemporaryDirectory() as tmp:
        for file in args.files.split(","):
            mod = module_of(file)
            cmd, *extra = BENCH[file]
            preset = args.preset if args.preset in mod.PRESETS else "default"
            base = [file, cmd, "--preset", preset, *extra]
            # per image
            flops = step_flops([*base, "--out", "x"], os.path.join(tmp, f"flops_{file}")) / 2
            batch = args.batch or mod.Config(**mod.PRESETS[preset]).batch_size
            argv = [
                *base,
                "--data",
                "shapes:5000",
                "--batch-size",
                str(batch),
                "--steps",
                str(args.warmup + args.steps),
                "--set",
                f"log_every={args.steps}",
                "--set",
                "grid=0",
                "--set",
                f"ckpt_every={10**9}",
                "--device",
                dev,
                *(["--compile"] if args.compile else []),
                "--out",
                os.path.join(tmp, file),
            ]
            r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                sys.exit(1)
            last = [json.loads(x) for x in open(os.path.join(tmp, file, "log.jsonl"))][-1]
            print(
                json.dumps(
                    dict(
                        file=file,
                        command=cmd,
                        preset=preset,
                        batch=batch,
                        device=dev,
                        compile=args.compile,
                        img_per_s=last["img_per_s"],
                        gflop_per_image=round(flops / 1e9, 2),
                        mfu=round(flops * last["img_per_s"] / peak, 4) if peak else None,
                        max_mem_gib=last.get("max_mem_gib"),
                    )
                ),
                flush=True,
            )


def memory(args):
    """Each file's default preset at its batch on one GPU, estimated here: the activations autograd
    saves for backward under bf16 autocast (counted at batch 2 and 4 on this CPU: a fixed part plus
    a part per image, scaled), plus fp32 weights, gradients, AdamW's two moments and the EMA (20
    bytes a trained parameter) and the frozen encoder's weights. The allocator's overhead and
    transient peaks are not in it."""
    os.environ["REPDIFF_CPU_BF16"] = "1"
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        for file, (cmd, *extra) in BENCH.items():
            mod = module_of(file)
            cfg = mod.Config(**mod.PRESETS["default"])
            base = [file, cmd, *extra]
            s2 = counted(small_run(base, os.path.join(tmp, f"{file}2"), batch=2))[1]
            s4 = counted(small_run(base, os.path.join(tmp, f"{file}4"), batch=4))[1]
            ck = torch.load(os.path.join(tmp, f"{file}2", "ckpt.pt"), weights_only=True)
            params = sum(v.numel() for v in ck["model"].values() if v.is_floating_point())
            act = s2 + (s4 - s2) / 2 * (cfg.batch_size - 2)
            # random-vit-b's (DINOv2-B's) weights, fp32
            frozen = 86e6 * 4 if extra else 0
            print(
                json.dumps(
                    dict(
                        file=file,
                        command=cmd,
                        batch=cfg.batch_size,
                        params_m=round(params / 1e6, 1),
                        activations_gib=round(act / 2**30, 2),
                        states_gib=round(params * 20 / 2**30, 2),
                        total_gib=round((act + params * 20 + frozen) / 2**30, 1),
                    )
                ),
                flush=True,
            )


def write_synthetic_jpeg(i, folder, size):
    """Image i of a synthetic folder: a smooth colour field with noise (JPEG sizes near natural
    images'), in class c{i % 1000}."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    im = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), 3)
    im.save(os.path.join(folder, "train", f"c{i % 1000:03d}", f"{i:07d}.jpg"), quality=90)


def bench_data(args):
    """For synthetic image folders (N images x side, JPEG, 1,000 classes), written once under
    --root: the first start of common.load_images (decoding into the cache), a later start
    (memory-mapping it), the resident memory, and at batch 256 the rate of reading a batch's rows
    and of common.batch() on the device, each start a fresh process."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    for n, size in args.sets:
        folder = os.path.join(args.root, f"synthetic_{n}x{size}")
        if not os.path.isdir(folder):
            write = functools.partial(write_synthetic_jpeg, folder=folder + ".tmp", size=size)
            for c in range(1000):
                os.makedirs(os.path.join(folder + ".tmp", "train", f"c{c:03d}"), exist_ok=True)
            with ThreadPoolExecutor(8) as ex:
                list(
                    tqdm(
                        ex.map(write, range(n), chunksize=256),
                        total=n,
                        desc=f"write {n} x {size}px JPEGs",
                    )
                )
            os.replace(folder + ".tmp", folder)
        cache = os.path.join(args.root, f"cache_{n}x{size}")
        # the first start decodes
        for f in os.listdir(cache) if os.path.isdir(cache) else []:
            os.remove(os.path.join(cache, f))
        for start in ("first", "later"):
            child = (
                f"import reproduce; reproduce._bench_data_child({folder!r}, {size}, {args.batches})"
            )
            r = subprocess.run(
                [sys.executable, "-c", child],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env=dict(os.environ, REPDIFF_CACHE=cache),
            )
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                sys.exit(1)
            print(
                json.dumps(
                    dict(images=n, side=size, start=start, **json.loads(r.stdout.splitlines()[-1]))
                ),
                flush=True,
            )


def _bench_data_child(folder, size, batches):
    import torch

    import common

    t0 = time.time()
    x, y, _ = common.load_images(folder, "train", size)
    start = time.time() - t0
    # resident memory in GiB (/proc/self/status counts kB)
    mem = {
        k: int(v.split()[0]) / 2**20
        for k, v in (line.split(":") for line in open("/proc/self/status"))
        if k in ("RssAnon", "RssFile")
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rate = {}
    # the rows: the host's part
    for name, fn in (
        ("read", lambda s: x[common.batch_rows(len(x), 256, 0, s)[0]]),
        ("batch", lambda s: common.batch(x, y, 256, 0, s, 0, flip=True, device=device)),
    ):
        t0 = time.time()
        for step in range(batches):
            fn(step + (batches if name == "batch" else 0))
        if device == "cuda":
            torch.cuda.synchronize()
        rate[name] = batches / (time.time() - t0)
    print(
        json.dumps(
            dict(
                start_s=round(start, 2),
                rss_anon_gib=round(mem["RssAnon"], 3),
                rss_file_gib=round(mem["RssFile"], 3),
                read_batches_per_s=round(rate["read"], 1),
                batch_device=device,
                batch_per_s=round(rate["batch"], 1),
            )
        )
    )


def sizes(text):
    """An argparse type: comma-separated NxSIDE -> [(N, SIDE)]."""
    try:
        out = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(o) != 2 or min(o) < 1 for o in out):
        raise argparse.ArgumentTypeError(f"{text!r} is not NxSIDE[,NxSIDE...]")
    return out


def reproduce(args):
    rows = plan(args.machine, os.path.abspath(args.out))
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {r["method"].split(" ")[0] for r in rows}
        if unknown:
            print(f"error: --only: no row for {', '.join(sorted(unknown))}", file=sys.stderr)
            sys.exit(2)
        rows = [r for r in rows if r["method"].split(" ")[0] in want]
    bad = [f"{' '.join(a)}: {e}" for r in rows for a in r["runs"] if (e := parses(a))]
    if bad:
        print("error: " + "\n       ".join(bad), file=sys.stderr)
        sys.exit(2)
    print(
        f"{sum(len(r['runs']) for r in rows)} commands of "
        f"{len(rows)} rows parse with their files' own parsers"
    )
    if args.machine == "gpu":
        est = estimate(rows, os.path.abspath(args.out))
        for e in est:
            print(json.dumps(e))
        print(
            f"estimate: {sum(e['minutes'] for e in est):.0f} "
            f"minutes of training on one H100 at {MFU:.0%} of its "
            f"bf16 peak, plus the evals' sampling",
            flush=True,
        )
    if args.dry_run:
        return
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    done = {r["method"]: r for r in json.load(open(path))["rows"]} if os.path.isfile(path) else {}
    with open(os.path.join(args.out, "log.txt"), "a") as log:
        for row in rows:
            old = done.get(row["method"])
            if not (old and "error" not in old and os.path.isfile(row["result"])):
                err, minutes = run_row(row, log)
                command = " && ".join("python " + " ".join(a) for a in row["runs"]).replace(
                    ROOT + os.sep, ""
                )
                old = dict(method=row["method"], command=command, minutes=round(minutes, 2), **err)
            fig = {} if "error" in old else row["read"](json.load(open(row["result"])))
            done[row["method"]] = {
                **old,
                **fig,
                "claim": row["claim"],
                "paper": row["paper"],
                "pair": row["pair"],
            }
            print(json.dumps(done[row["method"]]), flush=True)
            json.dump(
                dict(machine=args.machine, rows=list(done.values())), open(path, "w"), indent=1
            )
    rows = list(done.values())
    stats = paired(rows)
    for r in rows:
        r["held"] = held(r, stats)
    json.dump(
        dict(machine=args.machine, commit=commit(), cpus=os.cpu_count(), paired=stats, rows=rows),
        open(path, "w"),
        indent=1,
    )
    open(os.path.join(args.out, "table.md"), "w").write(table(rows, stats))
    svg(rows, os.path.join(args.out, "figure.svg"))
    print(table(rows, stats))
    failed = [r["method"] for r in rows if "error" in r]
    if failed:
        print(
            f"error: {', '.join(failed)} failed; see {os.path.join(args.out, 'log.txt')}",
            file=sys.stderr,
        )
        sys.exit(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="machine", required=True)
    for machine, what in (
        ("cpu", "any machine, offline"),
        ("gpu", "one GPU, CIFAR-10"),
        ("tiny", "seconds a file"),
    ):
        r = sub.add_parser(machine, help=f"the reproductions: {what}")
        r.add_argument(
            "--out", default=f"runs/repro_{machine}", help="folder for the runs and the results"
        )
        r.add_argument("--only", help="comma-separated methods (file names) to run")
        r.add_argument(
            "--dry-run",
            action="store_true",
            help="parse every command (gpu: and estimate); run nothing",
        )
    pp = sub.add_parser("paper", help="the papers' own runs: commands and time on 8 GPUs (dry run)")
    pp.add_argument("--dry-run", action="store_true", required=True, help="the only mode: print")
    pp.add_argument("--out", default="runs/paper", help="the runs' folder in the printed commands")
    pp.add_argument("--imagenet", default="data/imagenet", help="ImageNet: train/, val/ of classes")
    pp.add_argument("--latents", default="data/in256_latents", help="REPA's sd-vae latents folder")
    pp.add_argument("--gpus", type=int, default=8, help="processes (GPUs) the estimate assumes")
    pp.add_argument("--no-estimate", action="store_true", help="the commands only")
    pp.add_argument("--only", help="comma-separated method files")
    b = sub.add_parser("bench", help="img/s, MFU and peak memory of each file's own train step")
    b.add_argument("--files", default="jit_xpred.py,repa.py", help="comma-separated method files")
    b.add_argument(
        "--preset", default="default", help="the preset to time (a file without it: default)"
    )
    b.add_argument("--batch", type=int, help="batch size (default: the preset's)")
    b.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--compile", action="store_true")
    sub.add_parser(
        "memory", help="each default preset's GPU memory at its batch, estimated on this machine"
    )
    bd = sub.add_parser(
        "bench-data", help="start time, memory and batch() rate of large image folders"
    )
    bd.add_argument(
        "--root", required=True, help="folder for the synthetic image folders and their cache"
    )
    bd.add_argument(
        "--sets", default="1000000x32,100000x256", type=sizes, help="comma-separated NxSIDE"
    )
    bd.add_argument("--batches", type=int, default=200, help="batch() calls timed")
    args = p.parse_args(argv)
    if getattr(args, "out", None) and os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out} is a file", file=sys.stderr)
        sys.exit(2)
    commands = {"bench": bench, "memory": memory, "bench-data": bench_data, "paper": paper_dry_run}
    commands.get(args.machine, reproduce)(args)


if __name__ == "__main__":
    main()
