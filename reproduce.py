"""One command per machine: every method file's reproduction, and the seeds' question in one table.

    python reproduce.py cpu --out runs/repro_cpu    # any machine, offline: the toys and a `shapes` row per method
    python reproduce.py gpu --out runs/repro_gpu    # one GPU: each file's CIFAR-10 quick reproduction (see README)
    python reproduce.py tiny --out DIR              # every command at --preset tiny, seconds each: the runner itself
    python reproduce.py bench [--compile]           # img/s, MFU, peak memory of JiT-B/2 and SiT-B/2 + REPA steps
    python reproduce.py bench-data --root DIR       # start time, memory and batch() rate of a 1M-image folder
    --only jit_xpred.py,rae.py runs some rows; a finished row (its result file exists) is not run again.

It only calls the method files' own commands (each printed before it runs) and reads what they write: DIR/results.json
(`rows`: method, command, minutes, fd, probe_linear, probe_knn, r2_stripes, claim, paper, held, and the row's other
figures) and DIR/table.md, the README's table. The figures of a short run are what that run measured; each file's
docstring and README section hold its full claim at its own preset.
"""
import argparse, json, os, subprocess, sys, time

ROOT = os.path.dirname(os.path.abspath(__file__))

# steps per machine for every training command (None: the preset's own)
STEPS = {
    "tiny": dict(jit=None, ct=None, repa=None, soda=None, rae_dec=None, rae=None, rdm=None, rcg=None, dl=None,
                 dl_gen=None),
    "cpu": dict(jit=600, ct=400, repa=400, soda=1500, rae_dec=1000, rae=400, rdm=2000, rcg=400, dl=600, dl_gen=1000),
    "gpu": dict(jit=None, ct=None, repa=None, soda=None, rae_dec=None, rae=None, rdm=None, rcg=None, dl=None,
                dl_gen=None),
}


def plan(machine, out):
    """-> the rows: dict(method, runs: [argv], result: the json the row reads, read: json -> figures, claim, paper,
    held: figures -> bool or None)."""
    tiny, gpu = machine == "tiny", machine == "gpu"
    preset = ["--preset", "tiny", "--device", "cpu"] if tiny else ["--preset", "cpu"] if machine == "cpu" else \
        ["--data", "cifar10", "--compile"]
    ev = ["--n", "50" if tiny else "1000"] + (["--fd-model", "inception", "--n", "10000"] if gpu else [])
    steps = STEPS[machine]
    d = lambda name: os.path.join(out, name)
    ck = lambda name: os.path.join(out, name, "ckpt.pt")
    ev_json = lambda name: os.path.join(out, name, "eval.json")

    def train(file, cmd, name, key, *extra):
        s = ["--steps", str(steps[key])] if steps[key] else []
        return [file, cmd, *preset, *s, *extra, "--out", d(name)]

    def rep(res):  # the figures every row reports, with the floors: the network at initialisation, the raw pixels
        return {k + s: res.get(k + s) for k in ("probe_linear", "probe_knn", "r2_stripes")
                for s in ("", "_init", "_pixels")} | {"fd": res.get("fd")}

    toy_steps = ["--toy-steps", "50"] if tiny else []
    # offline GPU: soda.py's encoder, trained first in the same run, is the frozen encoder of repa, rae and rcg
    export = [["soda.py", "export-encoder", "--ckpt", ck("soda"), "--out", d("soda_enc.pt")]] if gpu else []
    enc = ["--encoder", d("soda_enc.pt")] if gpu else []
    rows = [
        dict(method="jit_xpred.py (toy)", runs=[["jit_xpred.py", "toy", "--dims", "2", "512", *toy_steps, "--out",
                                                 d("jit_toy")]],
             result=os.path.join(out, "jit_toy", "toy.json"), read=lambda r: {
                 f"sw_{x['pred']}_D{x['D']}": x["distance"] for x in r["results"]},
             claim="at D = 512, x-prediction samples the spiral, eps-prediction does not",
             paper="Fig. 2: x-pred holds at D = 512, eps/v collapse",
             held=lambda f: f["sw_x_D512"] < 0.2 and f["sw_eps_D512"] > 1.0),
        dict(method="consistency.py (toy)", runs=[["consistency.py", "toy", *toy_steps, "--out", d("ct_toy")]],
             result=os.path.join(out, "ct_toy", "toy.json"), read=lambda r: {
                 f"sw_{x['model']}_{x['steps']}step": x["distance"] for x in r["results"]},
             claim="1-step samples from scratch, 2 steps better",
             paper="ECT: 1- and 2-step FID 3.60 / 2.11 on CIFAR-10",
             held=lambda f: f["sw_trained_1step"] < f["sw_init_1step"] / 4),
        dict(method="jit_xpred.py", runs=[train("jit_xpred.py", "train", "jit", "jit"),
                                          ["jit_xpred.py", "eval", "--ckpt", ck("jit"), *ev]],
             result=ev_json("jit"), read=rep, claim=None, paper="JiT-B/16 ImageNet 256 FID 3.66", held=None),
        dict(method="consistency.py", runs=[train("consistency.py", "train", "ct", "ct"),
                                            ["consistency.py", "eval", "--ckpt", ck("ct"), *ev]],
             result=ev_json("ct"), read=lambda r: {**rep(r), "fd_2step": r.get("fd_2step")}, claim=None,
             paper="ECT CIFAR-10 FID 3.60 (1 step)", held=None),
        dict(method="soda.py", runs=[train("soda.py", "train", "soda", "soda"),
                                     ["soda.py", "eval", "--ckpt", ck("soda"), *ev]] + export,
             result=ev_json("soda"), read=rep, claim="z probes >= 5 points above its initialisation",
             paper="SODA CIFAR-10 linear probe 80.0",
             held=lambda f: f["probe_linear"] >= f["probe_linear_init"] + 0.05),
        dict(method="repa.py", runs=[train("repa.py", "train", "repa", "repa", *enc),
                                     ["repa.py", "eval", "--ckpt", ck("repa"), *ev]],
             result=ev_json("repa"), read=rep, claim=None, paper="SiT-B/2 + REPA 400k FID 24.4 (no CFG)",
             held=None),
        dict(method="rae.py", runs=[train("rae.py", "train-decoder", "rae_dec", "rae_dec", *enc),
                                    train("rae.py", "train", "rae", "rae", "--decoder", ck("rae_dec")),
                                    ["rae.py", "eval", "--ckpt", ck("rae"), *ev]],
             result=ev_json("rae"), read=lambda r: {**rep(r), "psnr": r["psnr"], "psnr_init": r["psnr_init"]},
             claim="the decoder reconstructs >= 3 dB above its initialisation",
             paper="RAE DiT^DH-XL ImageNet 256 FID 1.51, rFID 0.57",
             held=lambda f: f["psnr"] >= f["psnr_init"] + 3),
        dict(method="rcg.py", runs=[train("rcg.py", "train-rdm", "rdm", "rdm", *enc),
                                    train("rcg.py", "train", "rcg", "rcg", *enc),
                                    ["rcg.py", "eval", "--ckpt", ck("rcg"), "--rdm", ck("rdm"), *ev]],
             result=ev_json("rcg"), read=lambda r: {**rep(r), "rep_fd": r["rep_fd"],
                                                    "rep_fd_init": r["rep_fd_init"]},
             claim="the RDM's representations: rep_fd below half its initialisation's",
             paper="RCG DiT-XL unconditional ImageNet 256 FID 4.89 (27.32 without)",
             held=lambda f: f["rep_fd"] < f["rep_fd_init"] / 2),
        dict(method="decoupled_latent.py", runs=[
            train("decoupled_latent.py", "train", "dl", "dl"),
            train("decoupled_latent.py", "train-gen", "dl_gen", "dl_gen", "--ae", ck("dl")),
            ["decoupled_latent.py", "eval", "--ckpt", ck("dl_gen"), *ev]],
             result=ev_json("dl_gen"), read=lambda r: {
                 **rep(r), "probe_linear_all": r["parts"]["all"]["probe_linear"],
                 "probe_linear_z_d": r["parts"]["z_d"]["probe_linear"]},
             claim="z_u probes >= 5 points above its initialisation", paper="the seeds' proposal (no paper)",
             held=lambda f: f["probe_linear"] >= f["probe_linear_init"] + 0.05),
    ]
    return rows


def commit():  # -> the checkout's commit (with "+changes" when the tree differs from it), or None outside git
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    head = run("rev-parse", "--short", "HEAD")
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if run("status", "--porcelain", "--untracked-files=no").stdout else "")


def figures(row):
    """-> the row's figures, read from the result file its commands wrote, and whether its claim held."""
    f = row["read"](json.load(open(row["result"])))
    return {**f, "held": row["held"](f) if row["held"] else None}


def run_row(row, log):
    t0 = time.time()
    for argv in row["runs"]:
        print(f"$ python {' '.join(argv)}", flush=True)
        log.write(f"$ python {' '.join(argv)}\n")
        log.flush()
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if r.returncode:
            return dict(error=f"exit {r.returncode}: python {' '.join(argv)}"), (time.time() - t0) / 60
    return {}, (time.time() - t0) / 60


def table(rows):
    """The README's table (markdown) from results.json's rows: each probe beside its floor at initialisation, and a
    last row with the raw pixels' (of the first row that has them)."""
    fmt = lambda v: "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    pair = lambda r, k: fmt(r.get(k)) + (f" ({fmt(r[k + '_init'])})" if r.get(k + "_init") is not None else "")
    cols = ("probe_linear", "probe_knn", "r2_stripes")
    lines = ["| method | minutes | FD | probe linear (init) | probe kNN (init) | R^2 stripes (init) | claim | held |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        held = {True: "yes", False: "**no**", None: ""}[r.get("held")]
        lines.append(f"| {r['method']} | {fmt(r['minutes'])} | {fmt(r.get('fd'))} | "
                     f"{' | '.join(pair(r, k) for k in cols)} | {r['claim'] or ''} | {held} |")
    px = next((r for r in rows if r.get("probe_linear_pixels") is not None), None)
    if px:
        lines.append(f"| raw pixels (floor) | | | {' | '.join(fmt(px[k + '_pixels']) for k in cols)} | | |")
    return "\n".join(lines) + "\n"


def bench(args):
    """img/s, MFU and peak memory of this repository's train step (forward, backward, AdamW, EMA) for JiT-B/2 and
    SiT-B/2 with REPA (the encoder: random-vit-b, DINOv2-B's compute, no download) on synthetic 32 px batches."""
    import torch
    import common, jit_xpred, repa
    d = common.setup_dist(args.device)
    for name, mod in (("JiT-B/2", jit_xpred), ("SiT-B/2 + REPA", repa)):
        cfg = mod.Config(**{**mod.PRESETS["B"], "batch_size": args.batch})
        torch.manual_seed(0)
        enc = common.load_encoder("random-vit-b", d.device) if mod is repa else None
        model = (mod.REPA(cfg, enc.dim) if enc else mod.JiT(cfg)).to(d.device)
        net = common.wrap(model, d, args.compile)
        ema = common.Ema(model, 0.9999)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=d.device.type == "cuda")
        x = torch.rand(args.batch, 3, 32, 32, device=d.device) * 2 - 1  # data held on the device
        y = torch.randint(0, 10, (args.batch,), device=d.device)

        def loss():
            with common.autocast(d.device):
                return net(x, y, enc(x)[1]) if enc else net(x, y)

        flops = common.flops_per_image(loss, args.batch, d, model)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:  # timing starts after compilation and the allocator's warm-up
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.time()
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()
            ema.update(model, i)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        ips = args.steps * args.batch / (time.time() - t0)
        peak = common.peak_flops(d.device)
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if d.device.type == "cuda" else None
        print(json.dumps(dict(model=name, device=str(d.device), batch=args.batch, compile=args.compile,
                              img_per_s=round(ips, 1), mfu=round(flops * ips / peak, 4) if flops and peak else None,
                              peak_mem_gib=round(mem, 2) if mem else None)), flush=True)


def bench_data(args):
    """For synthetic image folders (N images x side, JPEG, 1,000 classes), written once under --root: the first start
    of common.load_images (decoding into the cache), a later start (memory-mapping it), the process's resident memory
    (anonymous: what the loader holds; file: page cache of the map, reclaimable), and at batch 256 the rate of reading
    a batch's rows (the host's part of a step) and of common.batch() on the device (on a CPU it also converts to float
    and flips there), each start in a fresh process. Against it: the step rate of the default presets of jit_xpred.py and
    repa.py on one H100 were every FLOP at its bf16 peak (989 TFLOP/s), a bound no run reaches."""
    import numpy as np, torch
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    from tqdm import tqdm
    import common, jit_xpred, repa
    for n, size in args.sets:
        folder = os.path.join(args.root, f"synthetic_{n}x{size}")
        if not os.path.isdir(folder):
            def write(i):  # smooth colour fields with noise: JPEG sizes near natural images'
                rng = np.random.default_rng(i)
                im = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), 3)
                d = os.path.join(folder + ".tmp", "train", f"c{i % 1000:03d}")
                im.save(os.path.join(d, f"{i:07d}.jpg"), quality=90)
            for c in range(1000):
                os.makedirs(os.path.join(folder + ".tmp", "train", f"c{c:03d}"), exist_ok=True)
            with ThreadPoolExecutor(8) as ex:
                list(tqdm(ex.map(write, range(n), chunksize=256), total=n, desc=f"write {n} x {size}px JPEGs"))
            os.replace(folder + ".tmp", folder)
        cache = os.path.join(args.root, f"cache_{n}x{size}")
        for f in (os.listdir(cache) if os.path.isdir(cache) else []):
            os.remove(os.path.join(cache, f))  # the first start decodes
        for start in ("first", "later"):
            child = f"import reproduce; reproduce._bench_data_child({folder!r}, {size}, {args.batches})"
            r = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True,
                               env=dict(os.environ, REPDIFF_CACHE=cache))
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                sys.exit(1)
            print(json.dumps(dict(images=n, side=size, start=start, **json.loads(r.stdout.splitlines()[-1]))),
                  flush=True)
    for name, mod, enc in (("jit_xpred.py", jit_xpred, None), ("repa.py", repa, "random-vit-b")):
        cfg = mod.Config()
        torch.manual_seed(0)
        e = common.load_encoder(enc, torch.device("cpu")) if enc else None
        model = mod.REPA(cfg, e.dim) if e else mod.JiT(cfg)
        x, y = torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1, torch.randint(0, 10, (4,))
        with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
            (model(x, y, e(x)[1]) if e else model(x, y)).backward()
        step = fc.get_total_flops() / 4 * cfg.batch_size
        print(json.dumps(dict(preset=f"{name} default", batch=cfg.batch_size, tflop_per_step=round(step / 1e12, 3),
                              h100_steps_per_s_at_peak=round(989e12 / step, 1))), flush=True)


def sizes(text):
    """An argparse type: comma-separated NxSIDE -> [(N, SIDE)]."""
    try:
        out = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(o) != 2 or min(o) < 1 for o in out):
        raise argparse.ArgumentTypeError(f"{text!r} is not NxSIDE[,NxSIDE...]")
    return out


def _bench_data_child(folder, size, batches):
    import torch
    import common
    t0 = time.time()
    x, y, _ = common.load_images(folder, "train", size)
    start = time.time() - t0
    mem = {k: int(v.split()[0]) / 2 ** 20 for k, v in (line.split(":") for line in open("/proc/self/status"))
           if k in ("RssAnon", "RssFile")}  # GiB
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rate = {}
    for name, fn in (("read", lambda s: x[common.batch_rows(len(x), 256, 0, s)[0]]),  # the rows: the host's part
                     ("batch", lambda s: common.batch(x, y, 256, 0, s, device=device))):  # + to_float, flips
        t0 = time.time()
        for step in range(batches):
            fn(step + (batches if name == "batch" else 0))
        if device == "cuda":
            torch.cuda.synchronize()
        rate[name] = batches / (time.time() - t0)
    print(json.dumps(dict(start_s=round(start, 2), rss_anon_gib=round(mem["RssAnon"], 3),
                          rss_file_gib=round(mem["RssFile"], 3), read_batches_per_s=round(rate["read"], 1),
                          batch_device=device, batch_per_s=round(rate["batch"], 1))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="machine", required=True)
    for machine, what in (("cpu", "any machine, offline"), ("gpu", "one GPU, CIFAR-10"), ("tiny", "seconds a file")):
        r = sub.add_parser(machine, help=f"the reproductions: {what}")
        r.add_argument("--out", required=True, help="folder for the runs, results.json and table.md")
        r.add_argument("--only", help="comma-separated methods (file names) to run")
    b = sub.add_parser("bench", help="img/s, MFU and peak memory of the JiT-B/2 and SiT-B/2 + REPA train steps")
    b.add_argument("--batch", type=int, default=256)
    b.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--device", default="auto")
    b.add_argument("--compile", action="store_true")
    bd = sub.add_parser("bench-data", help="start time, memory and batch() rate of large image folders")
    bd.add_argument("--root", required=True, help="folder for the synthetic image folders and their cache")
    bd.add_argument("--sets", default="1000000x32,100000x256", type=sizes, help="comma-separated NxSIDE")
    bd.add_argument("--batches", type=int, default=200, help="batch() calls timed")
    args = p.parse_args(argv)
    if args.machine == "bench":
        return bench(args)
    if args.machine == "bench-data":
        return bench_data(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out} is a file", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    rows = plan(args.machine, os.path.abspath(args.out))
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {r["method"].split(" ")[0] for r in rows}
        if unknown:
            print(f"error: --only: no row for {', '.join(sorted(unknown))}", file=sys.stderr)
            sys.exit(2)
        rows = [r for r in rows if r["method"].split(" ")[0] in want]
    path = os.path.join(args.out, "results.json")
    done = {r["method"]: r for r in json.load(open(path))["rows"]} if os.path.isfile(path) else {}
    with open(os.path.join(args.out, "log.txt"), "a") as log:
        for row in rows:
            old = done.get(row["method"])
            if old and "error" not in old and os.path.isfile(row["result"]):  # finished in an earlier call: read again
                done[row["method"]] = {**old, "claim": row["claim"], "paper": row["paper"], **figures(row)}
                continue
            err, minutes = run_row(row, log)
            command = " && ".join("python " + " ".join(a) for a in row["runs"]).replace(ROOT + os.sep, "")
            out = dict(method=row["method"], command=command,
                       minutes=round(minutes, 2), claim=row["claim"], paper=row["paper"], **err)
            done[row["method"]] = out if err else {**out, **figures(row)}
            print(json.dumps(done[row["method"]]), flush=True)
            with open(path, "w") as f:  # after every row: a stopped run keeps what it finished
                json.dump(dict(machine=args.machine, rows=list(done.values())), f, indent=1)
    with open(path, "w") as f:
        json.dump(dict(machine=args.machine, commit=commit(), cpus=os.cpu_count(), rows=list(done.values())), f,
                  indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(list(done.values())))
    print(table(list(done.values())))
    failed = [r["method"] for r in done.values() if "error" in r]
    if failed:
        print(f"error: {', '.join(failed)} failed; see {os.path.join(args.out, 'log.txt')}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
