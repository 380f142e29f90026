"""One command per machine: every method file's reproduction, and the seeds' question in one table.

    python reproduce.py cpu --out runs/repro_cpu    # any machine, offline: the toys and a `shapes` row per method
    python reproduce.py gpu --out runs/repro_gpu    # one GPU: each file's CIFAR-10 quick reproduction (see README)
    python reproduce.py tiny --out DIR              # every command at --preset tiny, seconds each: the runner itself
    python reproduce.py bench [--compile]           # img/s, MFU, peak memory of JiT-B/2 and SiT-B/2 + REPA steps
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

    def rep(res):  # the figures every row reports
        return {k: res.get(k) for k in ("fd", "probe_linear", "probe_knn", "probe_linear_init", "r2_stripes")}

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
    """The README's table (markdown) from results.json's rows."""
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| method | minutes | FD | probe linear | probe kNN | R^2 stripes | claim | held |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        held = {True: "yes", False: "**no**", None: ""}[r.get("held")]
        lines.append(f"| {r['method']} | {fmt(r['minutes'])} | {fmt(r.get('fd'))} | {fmt(r.get('probe_linear'))} | "
                     f"{fmt(r.get('probe_knn'))} | {fmt(r.get('r2_stripes'))} | {r['claim'] or ''} | {held} |")
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
    args = p.parse_args(argv)
    if args.machine == "bench":
        return bench(args)
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
            if row["method"] in done and "error" not in done[row["method"]] and os.path.isfile(row["result"]):
                continue  # finished in an earlier call
            err, minutes = run_row(row, log)
            out = dict(method=row["method"], command=" && ".join("python " + " ".join(a) for a in row["runs"]),
                       minutes=round(minutes, 2), claim=row["claim"], paper=row["paper"], **err)
            if not err:
                figures = row["read"](json.load(open(row["result"])))
                out.update(figures, held=row["held"](figures) if row["held"] else None)
            done[row["method"]] = out
            with open(path, "w") as f:  # after every row: a stopped run keeps what it finished
                json.dump(dict(machine=args.machine, rows=list(done.values())), f, indent=1)
            print(json.dumps(out), flush=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(list(done.values())))
    print(table(list(done.values())))
    failed = [r["method"] for r in done.values() if "error" in r]
    if failed:
        print(f"error: {', '.join(failed)} failed; see {os.path.join(args.out, 'log.txt')}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
