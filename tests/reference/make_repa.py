"""REPA fixtures from sihyun-yu/REPA (models/sit.py, loss.py, samplers.py): a small SiT (fp32, CPU) whose every weight
is random (the official init zeroes the adaLN and output layers), its state dict loaded unchanged into repa.py's SiT.
The state dict is stored once, in repa_net.pt (the others name it: weights="net").

    repa_net.pt      (a) the SiT's velocity and the projector's tokens zs for a batch with classes, the null class and
                     several t; the official pos_embed; the key -> shape table of the released SiT-XL/2
    repa_loss.pt     (b) SILoss (uniform t, linear path, v target) + proj_coeff * projection loss in train mode (label
                     dropout inside the SiT), from a seed: the raw draws, the SiT's inputs, both terms
    repa_sampler.pt  (c) euler_sampler (Euler and Heun) and euler_maruyama_sampler with CFG 1.8 on t <= 0.7, from a
                     seed: the initial noise (drawn first, as generate.py) and the SDE's per-step draws after it
"""
import time

import torch

from make_references import official, save

D, DEPTH, HEADS, ENC_DEPTH, PROJ, Z, CLASSES, SIZE, CH = 32, 3, 2, 2, 32, 16, 10, 8, 4
SMALL = dict(image_size=SIZE, channels=CH, patch=2, hidden=D, depth=DEPTH, heads=HEADS, align_depth=ENC_DEPTH,
             proj_dim=PROJ, num_classes=CLASSES, label_drop=0.5, latents=True)  # repa.Config fields


def official_sit(repos, drop=0.5, **kw):
    official("repa", repos)
    from models.sit import SiT
    kw = dict(dict(input_size=SIZE, patch_size=2, in_channels=CH, hidden_size=D, decoder_hidden_size=D,
                   encoder_depth=ENC_DEPTH, depth=DEPTH, num_heads=HEADS, class_dropout_prob=drop,
                   num_classes=CLASSES, use_cfg=True, z_dims=[Z], projector_dim=PROJ, qk_norm=False,
                   fused_attn=True), **kw)
    return SiT(**kw)


def randomize(model, seed=0):
    """Every trainable weight random (pos_embed stays the fixed sin-cos table)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.dim() > 1 else 0.1))
    return model


def ours(sd, **kw):
    import repa
    cfg = repa.Config(**dict(SMALL, **kw))
    model = repa.REPA(cfg, enc_dim=Z)
    model.net.load_state_dict(sd, strict=True)
    return model.eval()


def make(repos):
    torch.manual_seed(0)
    net = randomize(official_sit(repos)).eval()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    mine = ours(sd)

    # (a) the network: classes, the null class (CLASSES), t across [0, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, CH, SIZE, SIZE, generator=g)
    t = torch.tensor([0.0, 0.04, 0.3, 0.7, 0.95, 1.0])
    y = torch.tensor([0, 3, CLASSES, 9, CLASSES, 5])
    with torch.no_grad():
        v, zs = net(x, t, y)
        v2, h = mine.net(x, t, y)
        zs2 = mine.net.projectors[0](h)
        print("net: max |v diff|", (v - v2).abs().max().item(), " zs", (zs[0] - zs2).abs().max().item())
    with torch.device("meta"):  # the released SiT-XL/2 (ImageNet 256: 32x32x4 latents, DINOv2-B: z_dim 768)
        from models.sit import SiT_models
        xl = SiT_models["SiT-XL/2"](input_size=32, num_classes=1000, use_cfg=True, z_dims=[768], encoder_depth=8,
                                    qk_norm=False, fused_attn=False)
    xl_shapes = {k: list(v.shape) for k, v in xl.state_dict().items()}
    save("repa", "net", state_dict=sd, x=x, t=t, y=y, v=v, zs=zs[0], pos_embed=net.pos_embed.detach().clone(),
         xl_shapes=xl_shapes, config=dict(SMALL, z_dim=Z))

    # (b) the loss, train mode: SILoss draws t [B,1,1,1], then the noise; the SiT's LabelEmbedder then drops labels
    from loss import SILoss
    B, seed = 4, 3
    images = torch.randn(B, CH, SIZE, SIZE, generator=g)
    labels = torch.tensor([1, 2, 7, 4])
    with torch.no_grad():  # encoder tokens that the projector partly matches: cos well away from 0
        z_enc = net(images, torch.full((B,), 0.5), labels)[1][0] + torch.randn(B, (SIZE // 2) ** 2, Z, generator=g)
    torch.manual_seed(seed)
    draws = dict(t=torch.rand(B, 1, 1, 1), noise=torch.randn(B, CH, SIZE, SIZE), drop=torch.rand(B))
    seen = {}
    net.register_forward_pre_hook(lambda m, a: seen.update(model_input=a[0].clone(), time_input=a[1].clone()))
    net.y_embedder.embedding_table.register_forward_pre_hook(lambda m, a: seen.update(model_labels=a[0].clone()))
    net.train()
    torch.manual_seed(seed)
    loss_fn = SILoss(prediction="v", path_type="linear", weighting="uniform")  # train.py's defaults
    loss_v, proj = loss_fn(net, images, dict(y=labels), [z_enc])
    net.eval()
    loss = loss_v.mean() + 0.5 * proj.mean()  # train.py: proj_coeff 0.5
    assert 0 < (draws["drop"] < 0.5).sum() < B, "pick a seed that drops some labels, not all"
    save("repa", "loss", weights="net", images=images, labels=labels, z_enc=z_enc, seed=seed, proj_coeff=0.5,
         **draws, **seen, loss_v=loss_v.mean().detach(), loss_proj=proj.detach(), loss=loss.detach(),
         config=dict(SMALL, z_dim=Z))

    # (c) the samplers, generate.py's way: noise, labels, then the sampler (the SDE draws its noise per step)
    from samplers import euler_sampler, euler_maruyama_sampler
    y = torch.tensor([0, 4, 9])
    kw = dict(cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7, path_type="linear")
    out, seed = {}, 5
    null = lambda x, t, y: net(x, t, torch.where(y == 1000, CLASSES, y))  # the samplers' null class is ImageNet's 1000
    for name, fn, steps, heun in (("ode", euler_sampler, 6, False), ("heun", euler_sampler, 6, True),
                                  ("sde", euler_maruyama_sampler, 8, False)):
        torch.manual_seed(seed)
        z = torch.randn(len(y), CH, SIZE, SIZE)
        out[name] = fn(null, z, y, num_steps=steps, heun=heun, **kw).float()
        out[f"{name}_steps"] = steps
    save("repa", "sampler", weights="net", y=y, z=z, seed=seed, cfg_scale=1.8, interval=torch.tensor([0.0, 0.7]),
         **out, config=dict(SMALL, z_dim=Z))
    for name in ("ode", "heun", "sde"):
        torch.manual_seed(seed)
        s = mine.sample(y, sampler=name, steps=out[f"{name}_steps"], scale=1.8, interval=[0.0, 0.7])
        print(f"{name}: max |diff|", (s - out[name]).abs().max().item())


def bench(repos, batch=8, repeats=5):
    """ms per image, forward + backward of the training loss, official and ours at the same config (SiT-S width,
    6 blocks, 16x16x4 latents: 64 tokens), fp32 CPU."""
    import repa
    official("repa", repos)
    from loss import SILoss
    cfg = dict(input_size=16, hidden_size=384, decoder_hidden_size=384, depth=6, num_heads=6, encoder_depth=2,
               projector_dim=512, z_dims=[384], class_dropout_prob=0.1)
    net = official_sit(repos, drop=0.1, **cfg).train()
    mine = repa.REPA(repa.Config(**dict(SMALL, image_size=16, hidden=384, depth=6, heads=6, proj_dim=512,
                                        label_drop=0.1)), enc_dim=384)
    mine.net.load_state_dict(net.state_dict(), strict=True)
    x, y, z = torch.randn(batch, CH, 16, 16), torch.randint(0, CLASSES, (batch,)), torch.randn(batch, 64, 384)
    loss_fn = SILoss()

    def official_step():
        loss_v, proj = loss_fn(net, x, dict(y=y), [z])
        (loss_v.mean() + 0.5 * proj.mean()).backward()

    def our_step():
        mine(x, y, z).backward()

    res = {}
    for name, step in (("official", official_step), ("ours", our_step)):
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        res[name] = (time.perf_counter() - start) / repeats / batch * 1e3
    print(f"repa bench (B={batch}, {repeats} repeats): official {res['official']:.2f} ms/image, ours "
          f"{res['ours']:.2f} ms/image, ours/official {res['ours'] / res['official']:.2f}")
    return res
