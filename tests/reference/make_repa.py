"""REPA fixtures from sihyun-yu/REPA (models/sit.py, loss.py, samplers.py).

A small SiT whose every weight is random (the official init zeroes the adaLN and output layers),
its state dict loaded unchanged into repa.py's SiT. The state dict is stored once (fp32 values), in
repa_net.pt (the others name it: weights="net").

The official code runs in float64: its SiT .double() (it computes the time sinusoid in fp32, then
casts it to t's dtype: models/sit.py:57-64), float64 inputs, the samplers' float64 state and
float64 latents (so that the samplers' SiT calls run in float64 too). Every random draw the official
code made is recorded in its order (conftest's Draws.record) and stored (draw_names, draws), for the
tests to feed to ours (Draws.feed) instead of relying on a seed.

    repa_net.pt      (a) the SiT's velocity and the projector's tokens zs for a batch with classes,
                     the null class and several t; the official pos_embed; the key -> shape table
                     of the released SiT-XL/2
    repa_loss.pt     (b) SILoss (uniform t, linear path, v target) + proj_coeff * projection loss
                     in train mode: its draws (t [B,1,1,1], the noise, then the label drop inside
                     the SiT), the SiT's inputs, both terms
    repa_sampler.pt  (c) euler_sampler (Euler and Heun) and euler_maruyama_sampler with CFG 1.8 on
                     t <= 0.7: each one's draws (the initial noise as generate.py:121, then the
                     SDE's per-step noise, samplers.py:140) and its output

make() also runs ours on the official draws and checks it as tests/test_repa.py does (ours in
float64 for the network, in fp32 for the loss and the samplers).
"""

import os
import sys
import time

import torch
from make_references import official, save

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for conftest
from conftest import Draws, assert_close32, assert_close64

D, DEPTH, HEADS, ENC_DEPTH, PROJ, Z, CLASSES, SIZE, CH = 32, 3, 2, 2, 32, 16, 10, 8, 4
# repa.Config fields
SMALL = dict(
    image_size=SIZE,
    channels=CH,
    patch=2,
    hidden=D,
    depth=DEPTH,
    heads=HEADS,
    align_depth=ENC_DEPTH,
    proj_dim=PROJ,
    num_classes=CLASSES,
    label_drop=0.5,
    latents=True,
)
# the seed of the loss's draws: some labels dropped, not all (any other such seed does as well)
LOSS_SEED = 3


def official_sit(repos, drop=0.5, **kw):
    official("repa", repos)
    from models.sit import SiT

    kw = dict(
        dict(
            input_size=SIZE,
            patch_size=2,
            in_channels=CH,
            hidden_size=D,
            decoder_hidden_size=D,
            encoder_depth=ENC_DEPTH,
            depth=DEPTH,
            num_heads=HEADS,
            class_dropout_prob=drop,
            num_classes=CLASSES,
            use_cfg=True,
            z_dims=[Z],
            projector_dim=PROJ,
            qk_norm=False,
            fused_attn=True,
        ),
        **kw,
    )
    return SiT(**kw)


def randomize(model, seed=0):
    """Every trainable weight random (pos_embed stays the fixed sin-cos table)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.dim() > 1 else 0.1))
    return model


def ours(sd, **kw):
    import repa

    cfg = repa.Config(**dict(SMALL, **kw))
    model = repa.REPA(cfg, enc_dim=Z)
    model.net.load_state_dict(sd, strict=True)
    return model.eval()


def in_float64(model):
    """Ours in float64, as tests/test_repa.py runs it. repa.py's TimestepEmbedder hands its fp32
    sinusoid to its Linear as it is; the official one first casts it to t's dtype
    (models/sit.py:64), and this hook does that cast."""
    mlp = model.net.t_embedder.mlp
    mlp.register_forward_pre_hook(lambda m, args: (args[0].to(m[0].weight.dtype),))
    return model.double()


def recorded(drawn):
    """Draws.record's list of (function, tensor) -> the fixture's two lists: names and tensors."""
    return dict(draw_names=[name for name, _ in drawn], draws=[t for _, t in drawn])


def make(repos):
    torch.manual_seed(0)
    net = randomize(official_sit(repos)).eval()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    pos_embed = net.pos_embed.detach().clone()
    net.double()
    f64 = dict(dtype=torch.float64)
    config = dict(SMALL, z_dim=Z)

    # (a) the network: classes, the null class (CLASSES), t across [0, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, CH, SIZE, SIZE, generator=g, **f64)
    t = torch.tensor([0.0, 0.04, 0.3, 0.7, 0.95, 1.0], **f64)
    y = torch.tensor([0, 3, CLASSES, 9, CLASSES, 5])
    with torch.no_grad():
        v, zs = net(x, t, y)
    # the released SiT-XL/2 (ImageNet 256: 32x32x4 latents, DINOv2-B: z_dim 768)
    with torch.device("meta"):
        from models.sit import SiT_models

        xl = SiT_models["SiT-XL/2"](
            input_size=32,
            num_classes=1000,
            use_cfg=True,
            z_dims=[768],
            encoder_depth=8,
            qk_norm=False,
            fused_attn=False,
        )
    xl_shapes = {k: list(v.shape) for k, v in xl.state_dict().items()}
    save(
        "repa",
        "net",
        state_dict=sd,
        x=x,
        t=t,
        y=y,
        v=v,
        zs=zs[0],
        pos_embed=pos_embed,
        xl_shapes=xl_shapes,
        config=config,
    )
    mine = in_float64(ours(sd))
    with torch.no_grad():
        v2, h = mine.net(x, t, y)
        zs2 = mine.net.projectors[0](h)
    print("net: max |v diff|", (v - v2).abs().max().item(), " zs", (zs[0] - zs2).abs().max().item())
    assert_close64(v2, v, "net v")
    assert_close64(zs2, zs[0], "net zs")

    # (b) the loss, train mode: SILoss draws t [B,1,1,1], then the noise; the SiT's LabelEmbedder
    # then drops labels
    from loss import SILoss

    B = 4
    images = torch.randn(B, CH, SIZE, SIZE, generator=g, **f64)
    labels = torch.tensor([1, 2, 7, 4])
    # encoder tokens that the projector partly matches: cos well away from 0
    with torch.no_grad():
        z_enc = net(images, torch.full((B,), 0.5, **f64), labels)[1][0]
    z_enc = z_enc + torch.randn(B, (SIZE // 2) ** 2, Z, generator=g, **f64)
    seen = {}

    def inputs(module, args):
        seen.update(model_input=args[0].clone(), time_input=args[1].clone())

    def dropped(module, args):
        seen.update(model_labels=args[0].clone())

    hooks = [
        net.register_forward_pre_hook(inputs),
        net.y_embedder.embedding_table.register_forward_pre_hook(dropped),
    ]
    net.train()
    # train.py's defaults
    loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform")
    torch.manual_seed(LOSS_SEED)
    with Draws.record() as drawn:
        loss_v, proj = loss_fn(net, images, dict(y=labels), [z_enc])
    net.eval()
    for hook in hooks:
        hook.remove()
    # train.py: proj_coeff 0.5
    loss = loss_v.mean() + 0.5 * proj.mean()
    draws = recorded(drawn)
    print("loss: draws", draws["draw_names"])
    assert draws["draw_names"] == ["rand", "randn_like", "rand"], draws["draw_names"]
    n_dropped = (seen["model_labels"] == CLASSES).sum()
    assert 0 < n_dropped < B, "pick a LOSS_SEED that drops some labels, not all"
    save(
        "repa",
        "loss",
        weights="net",
        images=images,
        labels=labels,
        z_enc=z_enc,
        proj_coeff=0.5,
        **draws,
        **seen,
        loss_v=loss_v.mean().detach(),
        loss_proj=proj.detach(),
        loss=loss.detach(),
        config=config,
    )
    mine = ours(sd).train()
    t_draw, noise, drop = draws["draws"]
    # ours draws t as [B]: the same B numbers
    with Draws.feed([t_draw.view(B), noise, drop]):
        loss2, terms = mine(images.float(), labels, z_enc.float())
    print("loss: |diff|", (loss2 - loss).abs().item())
    assert_close32(terms["loss_v"], loss_v.mean(), "loss_v")
    assert_close32(terms["loss_align"], proj, "loss_align")
    assert_close32(loss2.detach(), loss, "loss")

    # (c) the samplers, generate.py's way: the noise (fp32, generate.py:121), then the sampler (the
    # SDE draws its noise per step, samplers.py:140); the latents handed over in float64, so that
    # the sampler's SiT calls run in float64
    from samplers import euler_maruyama_sampler, euler_sampler

    y = torch.tensor([0, 4, 9])
    kw = dict(cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7, path_type="linear")

    def null(x, t, y):
        # the samplers' null class is ImageNet's 1000
        return net(x, t, torch.where(y == 1000, CLASSES, y))

    runs = {}
    torch.manual_seed(5)
    for name, fn, steps, heun in (
        ("ode", euler_sampler, 6, False),
        ("heun", euler_sampler, 6, True),
        ("sde", euler_maruyama_sampler, 8, False),
    ):
        with Draws.record() as drawn:
            z = torch.randn(len(y), CH, SIZE, SIZE)
            out = fn(null, z.double(), y, num_steps=steps, heun=heun, **kw)
        runs[name] = dict(steps=steps, out=out, **recorded(drawn))
        print(f"{name}: draws", runs[name]["draw_names"])
    save(
        "repa",
        "sampler",
        weights="net",
        y=y,
        cfg_scale=1.8,
        interval=[0.0, 0.7],
        runs=runs,
        config=config,
    )
    mine = ours(sd)
    for name, run in runs.items():
        with Draws.feed(run["draws"]):
            s = mine.sample(y, sampler=name, steps=run["steps"], scale=1.8, interval=[0.0, 0.7])
        print(f"{name}: max |diff|", (s - run["out"]).abs().max().item())
        assert_close32(s, run["out"], name)


def bench(repos, batch=8, repeats=5, hidden=384, depth=6):
    """ms per image, forward + backward of the training loss, official and ours at the same config
    (by default SiT-S width, 6 blocks, 16x16x4 latents: 64 tokens), fp32 CPU. hidden (a multiple of
    the 6 heads) and depth make it smaller."""
    import repa

    official("repa", repos)
    from loss import SILoss

    cfg = dict(
        input_size=16,
        hidden_size=hidden,
        decoder_hidden_size=hidden,
        depth=depth,
        num_heads=6,
        encoder_depth=2,
        projector_dim=512,
        z_dims=[384],
        class_dropout_prob=0.1,
    )
    net = official_sit(repos, drop=0.1, **cfg).train()
    ours_cfg = dict(
        SMALL, image_size=16, hidden=hidden, depth=depth, heads=6, proj_dim=512, label_drop=0.1
    )
    mine = repa.REPA(repa.Config(**ours_cfg), enc_dim=384)
    mine.net.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(batch, CH, 16, 16)
    y = torch.randint(0, CLASSES, (batch,))
    z = torch.randn(batch, 64, 384)
    loss_fn = SILoss()

    def official_step():
        loss_v, proj = loss_fn(net, x, dict(y=y), [z])
        (loss_v.mean() + 0.5 * proj.mean()).backward()

    def our_step():
        # REPA.forward -> (loss, its terms)
        loss = mine(x, y, z)[0]
        loss.backward()

    res = {}
    for name, step in (("official", official_step), ("ours", our_step)):
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        res[name] = (time.perf_counter() - start) / repeats / batch * 1e3
    print(
        f"repa bench (B={batch}, {repeats} repeats): official {res['official']:.2f} ms/image, "
        f"ours {res['ours']:.2f} ms/image, ours/official {res['ours'] / res['official']:.2f}"
    )
    return res
