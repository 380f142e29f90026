"""JiT: the official model_jit.py / denoiser.py against jit_xpred.py (fixtures jit_net, jit_loss,
jit_sample, jit_keys; a bench).

The official code calls .cuda() on its RoPE tables and attention bias and wraps two forwards in
torch.compile: here both are no-ops (placement and compilation only), so that it runs on a CPU.

The fixtures are fp32: the official module does not run in float64. Its timestep embedding casts t
to fp32 before a Linear (model_jit.py:68; once the module is .double(), "mat1 and mat2 must have the
same dtype"), its attention takes q k^T in fp32 and multiplies those weights by v
(model_jit.py:100-104, "expected scalar type Double but found Float") and its RMSNorm normalises in
fp32 (util/model_util.py:148). The tests compare with conftest's assert_close32.

Every random draw of the official code is recorded (conftest's Draws.record, in the official order)
and stored, so that the tests feed those draws to ours (Draws.feed) instead of relying on a seed to
reproduce them. Dropout draws its mask inside torch's C++ kernel, out of Draws' reach: while
recording (and in the test that feeds the masks) F.dropout is replaced by bernoulli_dropout, the
same arithmetic with its mask drawn by Tensor.bernoulli_.
"""

import argparse
import contextlib
import os
import sys
import time

import torch
from make_references import official, save

# tests/, for conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import Draws

# a small JiT: 16x16 images, 4x4 patches (a 4x4 grid), width 32, 2 heads of 16, 4 blocks (dropout,
# when on, in the middle two), 3 in-context tokens from block 1 on; t drawn wide (P_mean 1.5) so
# that some 1 - t fall under t_eps; noise_scale 2; half the labels dropped
CONFIG = dict(
    image_size=16,
    patch=4,
    bottleneck=8,
    hidden=32,
    depth=4,
    heads=2,
    in_context=3,
    in_context_start=1,
    num_classes=5,
    P_mean=1.5,
    P_std=1.5,
    t_eps=0.05,
    noise_scale=2.0,
    label_drop=0.5,
)
SEED = 2  # the seed of the loss's draws: one label dropped, one t above 1 - t_eps
DROPOUT = 0.2  # proj_dropout of the loss's second run (JiT-H's)
GRADS = (
    "net.in_context_posemb",
    "net.blocks.2.attn.q_norm.weight",
    "net.blocks.1.mlp.w3.weight",
    "net.x_embedder.proj1.weight",
    "net.t_embedder.mlp.0.bias",
)


@contextlib.contextmanager
def cpu_only():
    """Tensor.cuda / Module.cuda -> no-ops, torch.compile -> the function itself."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda, torch.compile
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.compile = lambda fn=None, **k: fn if fn is not None else (lambda f: f)
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda, torch.compile = saved


def bernoulli_dropout(x, p=0.5, training=True, inplace=False):
    """F.dropout's arithmetic (keep with probability 1 - p, scale by 1 / (1 - p)); the mask drawn
    by Tensor.bernoulli_."""
    if not training or p == 0:
        return x
    keep = torch.empty_like(x).bernoulli_(1 - p)
    return x * keep / (1 - p)


@contextlib.contextmanager
def recordable_dropout():
    """F.dropout (which nn.Dropout calls) -> bernoulli_dropout, on both sides."""
    saved = torch.nn.functional.dropout
    torch.nn.functional.dropout = bernoulli_dropout
    try:
        yield
    finally:
        torch.nn.functional.dropout = saved


def official_denoiser(c, cfg_scale=1.0, interval=(0.0, 1.0), steps=5, dropout=0.0):
    """The official Denoiser around JiT(...) at the config c (our Config's field names)."""
    import model_jit
    from denoiser import Denoiser

    model_jit.JiT_models["test"] = lambda **kw: model_jit.JiT(
        patch_size=c["patch"],
        hidden_size=c["hidden"],
        depth=c["depth"],
        num_heads=c["heads"],
        bottleneck_dim=c["bottleneck"],
        in_context_len=c["in_context"],
        in_context_start=c["in_context_start"],
        **kw,
    )
    args = argparse.Namespace(
        model="test",
        img_size=c["image_size"],
        class_num=c["num_classes"],
        attn_dropout=0.0,
        proj_dropout=dropout,
        label_drop_prob=c["label_drop"],
        P_mean=c["P_mean"],
        P_std=c["P_std"],
        t_eps=c["t_eps"],
        noise_scale=c["noise_scale"],
        ema_decay1=0.9999,
        ema_decay2=0.9996,
        sampling_method="heun",
        num_sampling_steps=steps,
        cfg=cfg_scale,
        interval_min=interval[0],
        interval_max=interval[1],
    )
    return Denoiser(args)


def randomise(model):
    """Every trained parameter away from its init (adaLN gates open, output non-zero); pos_embed
    stays sin-cos."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or ".norm" in name:  # RMSNorm gains around 1
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5 * (0.3 if "final_layer.linear" in name else 1.0))


def recorded(drawn):
    """Draws.record's list of (function, tensor) -> the fixture's two lists: names and tensors."""
    return dict(draw_names=[name for name, _ in drawn], draws=[t for _, t in drawn])


def make(repos):
    official("jit", repos)
    with cpu_only():
        import jit_xpred as J

        torch.manual_seed(0)
        den = official_denoiser(CONFIG)
        randomise(den)
        sd = {k: v.clone() for k, v in den.state_dict().items()}
        net = den.net.eval()
        rope = net.feat_rope_incontext

        # (a) the network: raw t (0 and 1 included), every class and the null class
        g = torch.Generator().manual_seed(1)
        B, S = 6, CONFIG["image_size"]
        z = torch.randn(B, 3, S, S, generator=g) * 2
        t = torch.tensor([0.0, 0.03, 0.4, 0.75, 0.97, 1.0])
        y = torch.tensor([0, 1, 2, 3, 4, CONFIG["num_classes"]])
        with torch.no_grad():
            out, t_emb = net(z, t, y), net.t_embedder(t)
        save(
            "jit",
            "net",
            config=CONFIG,
            state_dict=sd,
            z=z,
            t=t,
            y=y,
            out=out,
            t_emb=t_emb,
            rope_cos=rope.freqs_cos.clone(),
            rope_sin=rope.freqs_sin.clone(),
        )

        # (b) the loss, without and with dropout: its draws as the official code made them (label
        # drop, t, noise, then the dropout masks block by block), the loss and some gradients
        x = torch.rand(4, 3, S, S, generator=g) * 2 - 1
        labels = torch.tensor([0, 1, 2, 3])
        runs = {}
        for name, dropout in (("plain", 0.0), ("dropout", DROPOUT)):
            den = official_denoiser(CONFIG, dropout=dropout)
            den.load_state_dict(sd)
            den.train()
            torch.manual_seed(SEED)
            with recordable_dropout(), Draws.record() as drawn:
                loss = den(x, labels)
            loss.backward()
            grads = {k: p.grad.clone() for k, p in den.named_parameters() if k in GRADS}
            runs[name] = dict(
                proj_dropout=dropout, loss=loss.detach(), grads=grads, **recorded(drawn)
            )
            print(f"loss {name}: draws {runs[name]['draw_names']}")
        # the official transforms of the first three draws, for the test's checks of our config
        u, n, e = runs["plain"]["draws"]
        with Draws.feed([u, n, e]):
            y_drop = den.drop_labels(labels)
            t_off = den.sample_t(4)
            e_off = torch.randn_like(x) * den.noise_scale
        dropped = (y_drop == CONFIG["num_classes"]).any()
        assert dropped and (t_off > 1 - CONFIG["t_eps"]).any(), "pick another SEED"
        save("jit", "loss", x=x, labels=labels, y_drop=y_drop, t=t_off, e_scaled=e_off, runs=runs)
        runs_loss = runs

        # (c) the sampler: 4 Heun steps + 1 Euler, CFG 2.5 in two intervals (lo = 0 includes
        # t = 0); its one draw, the noise
        runs = {}
        yy = torch.tensor([0, 2, 4])
        for name, interval in (("lo0", (0.0, 0.7)), ("mid", (0.3, 1.0))):
            den = official_denoiser(CONFIG, cfg_scale=2.5, interval=interval, steps=5)
            den.load_state_dict(sd)
            den.eval()
            torch.manual_seed(7)
            with torch.no_grad(), Draws.record() as drawn:
                xs = den.generate(yy)
            print(
                f"sample {name}: {(xs.abs() > 1).float().mean():.3f} of the values outside [-1, 1]"
            )
            runs[name] = dict(interval=list(interval), out=xs, **recorded(drawn))
        save("jit", "sample", y=yy, steps=5, cfg_scale=2.5, runs=runs)

        # the released checkpoints' keys and shapes (/16 at 256 px, /32 at 512 px), built on the
        # meta device
        import model_jit

        shapes = {}
        for name in model_jit.JiT_models:
            if name != "test":
                with torch.device("meta"):
                    net = model_jit.JiT_models[name](input_size=512 if name.endswith("32") else 256)
                shapes[name] = {"net." + k: list(v.shape) for k, v in net.state_dict().items()}
        save("jit", "keys", shapes=shapes)

        # ours, on the spot: the same numbers (the loss from the official draws)
        ours = J.JiT(J.Config(**CONFIG)).eval()
        ours.load_state_dict(sd, strict=True)
        with torch.no_grad():
            print("net max |ours - official|:", (ours.net(z, t, y) - out).abs().max().item())
        for name, run in runs_loss.items():
            ours = J.JiT(J.Config(**CONFIG, proj_dropout=run["proj_dropout"])).train()
            ours.load_state_dict(sd, strict=True)
            with torch.no_grad(), recordable_dropout(), Draws.feed(run["draws"]):
                loss = ours(x, labels)
            print(f"loss {name} |ours - official|:", (loss - run["loss"]).abs().item())


def bench(repos, batch=8, repeats=5):
    """Forward + backward of the training loss (fp32, CPU) at a modest width: ms/image, official and
    ours."""
    official("jit", repos)
    c = dict(
        CONFIG,
        image_size=64,
        patch=8,
        bottleneck=32,
        hidden=192,
        depth=6,
        heads=3,
        in_context=8,
        in_context_start=2,
        num_classes=10,
        P_mean=-0.8,
        P_std=0.8,
        noise_scale=1.0,
        label_drop=0.1,
    )
    with cpu_only():
        import jit_xpred as J

        den = official_denoiser(c).train()
        ours = J.JiT(J.Config(**c)).train()
        ours.load_state_dict(den.state_dict())
        x, y = torch.rand(batch, 3, 64, 64) * 2 - 1, torch.arange(batch) % 10
        ms = {}
        for name, m in (("official", den), ("ours", ours), ("official ", den), ("ours ", ours)):
            m(x, y).backward()  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                m(x, y).backward()
            ms[name.strip()] = (time.perf_counter() - t0) / repeats / batch * 1e3
        print(
            f"JiT fwd+bwd, batch {batch}, 64 px, p 8, width 192, depth 6 (fp32, CPU): official "
            f"{ms['official']:.2f} ms/img, ours {ms['ours']:.2f} ms/img, "
            f"ours/official {ms['ours'] / ms['official']:.2f}"
        )
