"""JiT: the official model_jit.py / denoiser.py against jit_xpred.py (fixtures jit_net, jit_loss, jit_sample; a bench).

The official code calls .cuda() on its RoPE tables and attention bias and wraps two forwards in torch.compile: here
both are no-ops (placement and compilation only), so that it runs in fp32 on a CPU.
"""
import argparse, contextlib, time

import torch

from make_references import official, save

# a small JiT: 16x16 images, 4x4 patches (a 4x4 grid), width 32, 2 heads of 16, 3 blocks, 3 in-context tokens from
# block 1 on; t drawn wide (P_mean 1.5) so that some 1 - t fall under t_eps; noise_scale 2; half the labels dropped
CONFIG = dict(image_size=16, patch=4, bottleneck=8, hidden=32, depth=3, heads=2, in_context=3, in_context_start=1,
              num_classes=5, P_mean=1.5, P_std=1.5, t_eps=0.05, noise_scale=2.0, label_drop=0.5)
SEED = 2  # the seed of the loss's draws: one label dropped, one t above 1 - t_eps
GRADS = ("net.in_context_posemb", "net.blocks.2.attn.q_norm.weight", "net.x_embedder.proj1.weight",
         "net.t_embedder.mlp.0.bias")


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


def official_denoiser(c, cfg_scale=1.0, interval=(0.0, 1.0), steps=5, dropout=0.0):
    """The official Denoiser around JiT(...) at the config c (our Config's field names)."""
    import model_jit
    from denoiser import Denoiser
    model_jit.JiT_models["test"] = lambda **kw: model_jit.JiT(
        patch_size=c["patch"], hidden_size=c["hidden"], depth=c["depth"], num_heads=c["heads"],
        bottleneck_dim=c["bottleneck"], in_context_len=c["in_context"], in_context_start=c["in_context_start"], **kw)
    args = argparse.Namespace(
        model="test", img_size=c["image_size"], class_num=c["num_classes"], attn_dropout=0.0, proj_dropout=dropout,
        label_drop_prob=c["label_drop"], P_mean=c["P_mean"], P_std=c["P_std"], t_eps=c["t_eps"],
        noise_scale=c["noise_scale"], ema_decay1=0.9999, ema_decay2=0.9996, sampling_method="heun",
        num_sampling_steps=steps, cfg=cfg_scale, interval_min=interval[0], interval_max=interval[1])
    return Denoiser(args)


def randomise(model):
    """Every trained parameter away from its init (adaLN gates open, output non-zero); pos_embed stays sin-cos."""
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
        save("jit", "net", config=CONFIG, state_dict=sd, z=z, t=t, y=y, out=out, t_emb=t_emb,
             rope_cos=rope.freqs_cos.clone(), rope_sin=rope.freqs_sin.clone())

        # (b) the loss: the raw draws (in the official order), the official transforms of them, the loss, some grads
        x = torch.rand(4, 3, S, S, generator=g) * 2 - 1
        labels = torch.tensor([0, 1, 2, 3])
        torch.manual_seed(SEED)
        u, n, e = torch.rand(4), torch.randn(4), torch.randn_like(x)
        torch.manual_seed(SEED)
        y_drop, t_off, e_off = den.drop_labels(labels), den.sample_t(4), torch.randn_like(x) * den.noise_scale
        assert (y_drop == CONFIG["num_classes"]).any() and (t_off > 1 - CONFIG["t_eps"]).any(), "pick another SEED"
        den.train()
        torch.manual_seed(SEED)
        loss = den(x, labels)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in den.named_parameters() if k in GRADS}
        save("jit", "loss", x=x, labels=labels, seed=SEED, u=u, n=n, e=e, y_drop=y_drop, t=t_off, e_scaled=e_off,
             loss=loss.detach(), grads=grads)

        # (c) the sampler: 4 Heun steps + 1 Euler, CFG 2.5 in two intervals (lo = 0 includes t = 0)
        runs = {}
        for name, interval in (("lo0", (0.0, 0.7)), ("mid", (0.3, 1.0))):
            den = official_denoiser(CONFIG, cfg_scale=2.5, interval=interval, steps=5)
            den.load_state_dict(sd)
            den.eval()
            yy = torch.tensor([0, 2, 4])
            torch.manual_seed(7)
            noise = torch.randn(3, 3, S, S) * den.noise_scale
            torch.manual_seed(7)
            with torch.no_grad():
                xs = den.generate(yy)
            print(f"sample {name}: {(xs.abs() > 1).float().mean():.3f} of the values outside [-1, 1]")
            runs[name] = dict(interval=list(interval), out=xs)
        save("jit", "sample", y=yy, seed=7, noise=noise, steps=5, cfg_scale=2.5, runs=runs)

        # the released checkpoints' keys and shapes (/16 at 256 px, /32 at 512 px), built on the meta device
        import model_jit
        shapes = {}
        for name in model_jit.JiT_models:
            if name != "test":
                with torch.device("meta"):
                    net = model_jit.JiT_models[name](input_size=512 if name.endswith("32") else 256)
                shapes[name] = {"net." + k: list(v.shape) for k, v in net.state_dict().items()}
        save("jit", "keys", shapes=shapes)

        # ours, on the spot: the same numbers
        cfg = J.Config(**CONFIG)
        ours = J.JiT(cfg).eval()
        ours.load_state_dict(sd, strict=True)
        with torch.no_grad():
            print("net max |ours - official|:", (ours.net(z, t, y) - out).abs().max().item())


def bench(repos, batch=8, repeats=5):
    """Forward + backward of the training loss (fp32, CPU) at a modest width: ms/image, official and ours."""
    official("jit", repos)
    c = dict(CONFIG, image_size=64, patch=8, bottleneck=32, hidden=192, depth=6, heads=3, in_context=8,
             in_context_start=2, num_classes=10, P_mean=-0.8, P_std=0.8, noise_scale=1.0, label_drop=0.1)
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
        print(f"JiT fwd+bwd, batch {batch}, 64 px, p 8, width 192, depth 6 (fp32, CPU): official "
              f"{ms['official']:.2f} ms/img, ours {ms['ours']:.2f} ms/img, "
              f"ours/official {ms['ours'] / ms['official']:.2f}")
