"""RAE: the official DDT.py (DiT^DH), decoder.py, rae.py (stage 1) and transport/ against rae.py (fixtures rae_net,
rae_decoder, rae_loss, rae_sample, rae_keys; a bench).

The official latents are [B, C, h, w]; ours are tokens [B, N, C] (N = h w, row-major): the fixtures store ours, and
x.flatten(2).transpose(1, 2) maps one to the other. The frozen encoder is not compared: both sides decode the same
latent. The official RAE class needs a DINOv2 download to be built, so its noising() and decode() run on a stand-in
object that holds exactly the attributes they read.
"""
import os, time
from types import SimpleNamespace

import torch

from make_references import official, save

# a small DiT^DH: a 4 x 4 latent of 8 channels, trunk 32 wide (2 blocks, 2 heads of 16), head 48 wide (2 blocks, 2
# heads of 24), 5 classes, half the labels dropped; a = 2 (the official code asserts a >= 1, sqrt(128 / 4096) is not);
# a decoder 32 wide with an MLP of 48 (not 4 x), 2 x 2 pixel patches: 8 px images
G, C = 4, 8
CONFIG = dict(image_size=8, hidden=32, depth=2, heads=2, head_dim=48, head_depth=2, head_heads=2, num_classes=5,
              label_drop=0.5, shift=2.0, dec_dim=32, dec_depth=2, dec_heads=2, dec_mlp=48, noise_tau=0.8,
              perc_coeff=0.0)
SEED = 3  # the loss's draws: some labels dropped, some kept
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the DINOv2 processor's (ImageNet)
GRADS = ("blocks.0.attn.qkv.weight", "blocks.3.mlp.w12.weight", "t_embedder.mlp.0.weight", "s_projector.weight")


def tokens(x):  # official [B, C, h, w] -> ours [B, N, C]
    return x.flatten(2).transpose(1, 2).contiguous()


def official_ddt(c, grid=G, channels=C):
    from stage2.models.DDT import DiTwDDTHead
    return DiTwDDTHead(input_size=grid, patch_size=1, in_channels=channels, hidden_size=[c["hidden"], c["head_dim"]],
                       depth=[c["depth"], c["head_depth"]], num_heads=[c["heads"], c["head_heads"]],
                       class_dropout_prob=c["label_drop"], num_classes=c["num_classes"])


def official_decoder(repos, dim, depth, heads, mlp, c, grid, patch):
    """decoder.py's GeneralDecoder built as stage1/rae.py builds it, from configs/decoder/ViTXL at another size."""
    from transformers import AutoConfig
    from stage1.decoders import GeneralDecoder
    cfg = AutoConfig.from_pretrained(os.path.join(repos, "RAE", "configs", "decoder", "ViTXL"))
    cfg.decoder_hidden_size, cfg.decoder_num_hidden_layers, cfg.decoder_num_attention_heads = dim, depth, heads
    cfg.decoder_intermediate_size, cfg.hidden_size, cfg.patch_size, cfg.image_size = mlp, c, patch, patch * grid
    return GeneralDecoder(cfg, num_patches=grid * grid)


def randomise(model, seed=0):
    """Every trained parameter away from its init (adaLN gates open, outputs non-zero, class token non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):  # RMSNorm / LayerNorm gains around 1
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5 * (0.3 if "final_layer.linear" in name else 1.0))


def stand_in(decoder, mean=None, var=None, tau=0.0):
    """The attributes stage1/rae.py's RAE.noising and RAE.decode read."""
    return SimpleNamespace(decoder=decoder, noise_tau=tau, reshape_to_2d=True, do_normalization=mean is not None,
                           latent_mean=mean, latent_var=var, eps=1e-5, encoder_mean=torch.tensor(MEAN)[:, None, None],
                           encoder_std=torch.tensor(STD)[:, None, None])


def schedules(repos, steps_per_epoch=10):
    """utils/optim_utils.py's learning rate at some steps, for the stage-1 and stage-2 training configs (10 steps an
    epoch): -> {name: dict(steps, epochs, lr)}."""
    from omegaconf import OmegaConf
    from utils.optim_utils import build_scheduler
    out = {}
    for name, path in (("stage1", "stage1/training/DINOv2-B_decXL.yaml"),
                       ("stage2", "stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml")):
        training = OmegaConf.to_container(OmegaConf.load(os.path.join(repos, "RAE", "configs", path)).training)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training["optimizer"]["lr"])
        sched, _ = build_scheduler(opt, steps_per_epoch, training)
        total = training["epochs"] * steps_per_epoch
        steps = [s for s in (0, 1, 5, 9, 10, 11, 50, 399, 400, 401, 1000, 4000, 7999, 8000, 8001) if s < total]
        steps.append(total - 1)
        lr = [training["optimizer"]["lr"] * sched.lr_lambdas[0](s) for s in steps]
        out[name] = dict(steps=steps, epochs=training["epochs"], lr=lr, ema=training["ema_decay"],
                         clip=training["clip_grad"])
    return out


def make(repos):
    official("rae", repos, "src")
    import rae as R
    from stage1.rae import RAE as OfficialRAE
    from stage2.transport import Sampler, create_transport
    torch.manual_seed(0)
    ddt = official_ddt(CONFIG)
    randomise(ddt)
    sd = {k: v.clone() for k, v in ddt.state_dict().items()}
    ddt.eval()

    # (a) DiT^DH: t from 0 to 1, every class and the null class
    g = torch.Generator().manual_seed(1)
    B = 6
    x = torch.randn(B, C, G, G, generator=g)
    t = torch.tensor([0.0, 0.05, 0.3, 0.6, 0.95, 1.0])
    y = torch.tensor([0, 1, 2, 3, 4, CONFIG["num_classes"]])
    with torch.no_grad():
        out, t_emb = ddt(x, t, y), ddt.t_embedder(t)
    save("rae", "net", config=CONFIG, latent=[G * G, C], state_dict=sd, x=tokens(x), t=t, y=y, out=tokens(out),
         t_emb=t_emb)

    # (b) the stage-2 loss: the raw draws in the official order (noise, t's uniform, the label drop's uniform)
    transport = create_transport("Linear", "velocity", None, time_dist_type="logit-normal_0_1",
                                 time_dist_shift=CONFIG["shift"])
    x1 = torch.randn(4, C, G, G, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(SEED)
    e, u, u_drop = torch.randn(4, C, G, G), torch.rand(4), torch.rand(4)
    seen = {}

    def model(xt, t, y):
        seen.update(t=t.clone(), xt=xt.clone())
        return ddt(xt, t, y)

    ddt.train()
    torch.manual_seed(SEED)
    loss = transport.training_losses(model, x1, dict(y=labels))["loss"].mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in ddt.named_parameters() if k in GRADS}
    ddt.zero_grad()
    drop = u_drop < CONFIG["label_drop"]
    assert drop.any() and not drop.all(), "pick another SEED"
    save("rae", "loss", z=tokens(x1), labels=labels, seed=SEED, e=tokens(e), u=u, u_drop=u_drop, t=seen["t"],
         x_t=tokens(seen["xt"]), loss=loss.detach(), grads=grads, schedules=schedules(repos))

    # (c) the Euler sampler over the shifted grid (6 points, 5 steps), CFG 2.5 on [0, 1] (the default) and [0, 0.6]
    ddt.eval()
    sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=6)
    yy = torch.tensor([0, 2, 4])
    runs = {}
    for name, interval, scale in (("default", (0.0, 1.0), 2.5), ("interval", (0.0, 0.6), 2.5), ("none", (0, 1), 1)):
        torch.manual_seed(7)
        z = torch.randn(3, C, G, G)  # sample_ddp.py's draw
        with torch.no_grad():
            if scale > 1:
                y2 = torch.cat([yy, torch.full_like(yy, CONFIG["num_classes"])])
                xs = sample_fn(torch.cat([z, z]), ddt.forward_with_cfg, y=y2, cfg_scale=scale,
                               cfg_interval=interval)[-1].chunk(2)[0]
            else:
                xs = sample_fn(z, ddt.forward, y=yy)[-1]
        runs[name] = dict(interval=list(interval), scale=scale, out=tokens(xs))
    save("rae", "sample", y=yy, seed=7, noise=tokens(z), steps=6, runs=runs)

    # (d) the decoder: decode (with the statistics) and the stage-1 L1 with the noise augmentation's draws
    torch.manual_seed(0)
    dec = official_decoder(repos, 32, 2, 2, 48, C, G, 2)
    randomise(dec, 1)
    dec_sd = {k: v.clone() for k, v in dec.state_dict().items()}
    mean, var = torch.randn(C, G, G, generator=g), torch.rand(C, G, G, generator=g) + 0.5
    z_norm = torch.randn(2, C, G, G, generator=g)
    with torch.no_grad():
        images = OfficialRAE.decode(stand_in(dec, mean, var), z_norm)
        z_raw = torch.randn(3, G * G, C, generator=g) * 2  # the encoder's tokens, before the reshape to 2-D
        x01 = torch.rand(3, 3, 8, 8, generator=g)
        torch.manual_seed(SEED)
        s1_u, s1_n = torch.rand(3, 1, 1), torch.randn(3, G * G, C)
        torch.manual_seed(SEED)
        z_noised = OfficialRAE.noising(stand_in(dec, tau=CONFIG["noise_tau"]), z_raw)
        recon = OfficialRAE.decode(stand_in(dec), z_noised.transpose(1, 2).reshape(3, C, G, G))
        l1 = (recon - x01).abs().mean()  # train_stage1.py's rec_loss
    save("rae", "decoder", state_dict=dec_sd, mean=mean, var=var, z_norm=tokens(z_norm), images=images, z=z_raw,
         x01=x01, seed=SEED, u=s1_u, n=s1_n, z_noised=z_noised, recon=recon, l1=l1)

    # the released checkpoints' keys and shapes: DiT^DH-XL and the ViT-XL decoder (DINOv2-B, 256 px), on meta
    from stage2.models.DDT import DiTwDDTHead
    with torch.device("meta"):
        xl = DiTwDDTHead(input_size=16, patch_size=1, in_channels=768, hidden_size=[1152, 2048], depth=[28, 2],
                         num_heads=[16, 16])
        dxl = official_decoder(repos, 1152, 28, 16, 4096, 768, 16, 16)
    save("rae", "keys", ddt_xl={k: list(v.shape) for k, v in xl.state_dict().items()},
         decoder_xl={k: list(v.shape) for k, v in dxl.state_dict().items()})

    # ours, on the spot
    ours = R.RAE(R.Config(**CONFIG), G * G, C).eval()
    ours.net.load_state_dict(sd, strict=True)
    with torch.no_grad():
        print("net max |ours - official|:", (ours.net(tokens(x), t, y) - tokens(out)).abs().max().item())


def bench(repos, batch=8, repeats=5):
    """Forward + backward of the stage-2 loss (fp32, CPU) at a modest width: ms/image, official and ours."""
    official("rae", repos, "src")
    import rae as R
    from stage2.transport import create_transport
    c = dict(CONFIG, hidden=192, depth=4, heads=3, head_dim=384, head_depth=2, head_heads=6, num_classes=10,
             label_drop=0.1)
    g, ch = 8, 32
    ddt = official_ddt(c, g, ch).train()
    ours = R.RAE(R.Config(**c), g * g, ch).train()
    ours.net.load_state_dict(ddt.state_dict())
    transport = create_transport("Linear", "velocity", None, time_dist_type="logit-normal_0_1", time_dist_shift=2.0)
    z, y = torch.randn(batch, ch, g, g), torch.arange(batch) % 10
    runs = dict(official=lambda: transport.training_losses(ddt, z, dict(y=y))["loss"].mean(),
                ours=lambda: ours(tokens(z), y))
    ms = {}
    for name in ("official", "ours", "official", "ours"):
        runs[name]().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            runs[name]().backward()
        ms[name] = (time.perf_counter() - t0) / repeats / batch * 1e3
    print(f"DiT^DH fwd+bwd, batch {batch}, latent {g}x{g}x{ch}, trunk 192 x 4, head 384 x 2 (fp32, CPU): official "
          f"{ms['official']:.2f} ms/img, ours {ms['ours']:.2f} ms/img, "
          f"ours/official {ms['ours'] / ms['official']:.2f}")
