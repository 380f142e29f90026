"""RAE: the official DDT.py (DiT^DH), decoder.py, rae.py (stage 1) and transport/ against rae.py
(fixtures rae_net, rae_loss, rae_sample, rae_shift, rae_decoder, rae_keys; a bench).

The official latents are [B, C, h, w]; ours are tokens [B, N, C] (N = h w, row-major): the fixtures
store inputs and outputs as ours (x.flatten(2).transpose(1, 2) maps one to the other), the random
draws in the official shapes. The frozen encoder is not compared: both sides decode the same latent.
The official RAE class needs a DINOv2 download to be built, so its noising() and decode() run on a
stand-in object that holds exactly the attributes they read.

Precision: the weights are drawn in fp32 and stored so (exact in float64); all else runs in float64:
the official modules .double(), the inputs float64, torch's default dtype float64 inside (the
official draws, its t, its sampler's grid). The official RMSNorm computes in x.float()
(model_utils.py:317), an upcast meant for bf16 that would round float64 to fp32: here it upcasts to
fp32 at least, so float64 stays float64.

Every random draw the official code makes is recorded (conftest.Draws.record) and stored in its
order: the tests feed them to ours (conftest.Draws.feed), whatever this machine's random stream.
"""

import contextlib
import math
import os
import sys
import time
from types import SimpleNamespace

import make_references as refs
import torch

sys.path.insert(0, os.path.dirname(refs.HERE))  # tests/, for conftest's Draws
from conftest import Draws

# a small DiT^DH: a 4 x 4 latent of 8 channels, trunk 16 wide (2 blocks, 2 heads of 8), head 32 wide
# (2 blocks, 2 heads of 16), 5 classes, half the labels dropped; a = 2 given (the official code
# asserts a >= 1, sqrt(128 / 4096) is not: rae_shift takes a from a latent's dimension); a decoder
# 32 wide with an MLP of 48 (not 4 x), 2 x 2 pixel patches: 8 px images
G, C = 4, 8
CONFIG = dict(
    image_size=8,
    hidden=16,
    depth=2,
    heads=2,
    head_dim=32,
    head_depth=2,
    head_heads=2,
    num_classes=5,
    label_drop=0.5,
    shift=2.0,
    dec_dim=32,
    dec_depth=2,
    dec_heads=2,
    dec_mlp=48,
    noise_tau=0.8,
    perc_coeff=0.0,
)
# rae_shift's latent [C, h, w]: m = 6400, a = sqrt(6400 / 4096) = 1.25 (a base of 1024: 2.5)
SHIFT_LATENT = (400, 4, 4)
SEED = 3  # the loss's draws: some labels dropped, some kept
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the DINOv2 processor's (ImageNet)
GRADS = (
    "blocks.0.attn.qkv.weight",
    "blocks.3.mlp.w12.weight",
    "t_embedder.mlp.0.weight",
    "s_projector.weight",
)
STAGE1_YAML = "stage1/training/DINOv2-B_decXL.yaml"
STAGE2_YAML = "stage2/training/ImageNet256/DiTDH-S_DINOv2-B.yaml"


def tokens(x):  # official [B, C, h, w] -> ours [B, N, C]
    return x.flatten(2).transpose(1, 2).contiguous()


def official_ddt(c, grid=G, channels=C):
    from stage2.models.DDT import DiTwDDTHead

    return DiTwDDTHead(
        input_size=grid,
        patch_size=1,
        in_channels=channels,
        hidden_size=[c["hidden"], c["head_dim"]],
        depth=[c["depth"], c["head_depth"]],
        num_heads=[c["heads"], c["head_heads"]],
        class_dropout_prob=c["label_drop"],
        num_classes=c["num_classes"],
    )


def official_decoder(repos, dim, depth, heads, mlp, c, grid, patch):
    """decoder.py's GeneralDecoder built as stage1/rae.py builds it, from configs/decoder/ViTXL at
    another size."""
    from stage1.decoders import GeneralDecoder
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(os.path.join(repos, "RAE", "configs", "decoder", "ViTXL"))
    cfg.decoder_hidden_size = dim
    cfg.decoder_num_hidden_layers = depth
    cfg.decoder_num_attention_heads = heads
    cfg.decoder_intermediate_size = mlp
    cfg.hidden_size, cfg.patch_size, cfg.image_size = c, patch, patch * grid
    return GeneralDecoder(cfg, num_patches=grid * grid)


def official_config(repos, path):
    """An official training config (configs/...yaml) as a dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(os.path.join(repos, "RAE", "configs", path)))


def randomise(model, seed=0):
    """Every trained parameter away from its init (adaLN gates open, outputs non-zero, class token
    non-zero), in fp32."""
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
    """The attributes stage1/rae.py's RAE.noising and RAE.decode read (the pixel mean and std: fp32
    plain attributes, as RAE.__init__ makes them; .double() would leave them so)."""
    mean_px = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std_px = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return SimpleNamespace(
        decoder=decoder,
        noise_tau=tau,
        reshape_to_2d=True,
        do_normalization=mean is not None,
        latent_mean=mean,
        latent_var=var,
        eps=1e-5,
        encoder_mean=mean_px,
        encoder_std=std_px,
    )


@contextlib.contextmanager
def float64():
    """torch's default dtype float64; the official RMSNorm's x.float() an upcast only (above)."""
    from stage2.models import model_utils

    forward = model_utils.RMSNorm.forward

    def upcast_forward(self, x):  # model_utils.py:317, with x.float() -> at least fp32
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return self._norm(x32).type_as(x) * self.weight

    saved = torch.get_default_dtype()
    model_utils.RMSNorm.forward = upcast_forward
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)
        model_utils.RMSNorm.forward = forward


def official_shift(repos, latent_size):
    """train.py:136-139 (sample_ddp.py:134-137): a = sqrt(shift_dim / shift_base), shift_dim the
    latent's dimension prod([C, h, w]) (the configs write it out: 196608 = 16 * 16 * 768),
    shift_base 4096 (the configs' and the default)."""
    misc = official_config(repos, STAGE2_YAML)["misc"]
    # the config's dimension is its latent's
    assert misc["time_dist_shift_dim"] == math.prod(misc["latent_size"]), misc
    return math.sqrt(math.prod(latent_size) / misc["time_dist_shift_base"])


def schedules(repos, steps_per_epoch=10):
    """utils/optim_utils.py's learning rate at some steps, for the stage-1 and stage-2 training
    configs (10 steps an epoch): -> {name: dict(steps, epochs, lr, ema, clip)}."""
    from utils.optim_utils import build_scheduler

    out = {}
    for name, path in (("stage1", STAGE1_YAML), ("stage2", STAGE2_YAML)):
        training = official_config(repos, path)["training"]
        lr0 = training["optimizer"]["lr"]
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
        sched, _ = build_scheduler(opt, steps_per_epoch, training)
        total = training["epochs"] * steps_per_epoch
        some = (0, 1, 5, 9, 10, 11, 50, 399, 400, 401, 1000, 4000, 7999, 8000, 8001)
        steps = [s for s in some if s < total] + [total - 1]
        lr = [lr0 * sched.lr_lambdas[0](s) for s in steps]
        out[name] = dict(
            steps=steps,
            epochs=training["epochs"],
            lr=lr,
            ema=training["ema_decay"],
            clip=training["clip_grad"],
        )
    return out


def make_net(ddt, sd, g):
    """(a) DiT^DH: t from 0 to 1 (exact in fp32, where ours embeds t), every class and the null
    class. -> (x, t, y, out) for the check of ours on the spot."""
    x = torch.randn(6, C, G, G, generator=g)
    t = torch.tensor([0.0, 1 / 16, 5 / 16, 5 / 8, 15 / 16, 1.0])
    y = torch.tensor([0, 1, 2, 3, 4, CONFIG["num_classes"]])
    ddt.eval()
    with torch.no_grad():
        out, t_emb = ddt(x, t, y), ddt.t_embedder(t)
    refs.save(
        "rae",
        "net",
        config=CONFIG,
        latent=[G * G, C],
        state_dict=sd,
        x=tokens(x),
        t=t,
        y=y,
        out=tokens(out),
        t_emb=t_emb,
    )
    return x, t, y, out


def make_loss(ddt, g, repos):
    """(b) The stage-2 loss; its draws in the official order: the noise (transport.py:161), t's
    uniform (transport.py:76), the label drop's uniform (model_utils.py:427, in DiTwDDTHead)."""
    from stage2.transport import create_transport

    transport = create_transport(
        "Linear",
        "velocity",
        None,
        time_dist_type="logit-normal_0_1",
        time_dist_shift=CONFIG["shift"],
    )
    x1 = torch.randn(4, C, G, G, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    seen = {}
    table = ddt.y_embedder.embedding_table  # its input: the labels after the drop
    hook = table.register_forward_pre_hook(lambda m, a: seen.update(y=a[0].clone()))

    def model(xt, t, y):  # the official network, watched
        seen.update(t=t.clone(), xt=xt.clone())
        return ddt(xt, t, y)

    ddt.train()
    torch.manual_seed(SEED)
    with Draws.record() as drawn:
        terms = transport.training_losses(model, x1, dict(y=labels))
    hook.remove()
    loss = terms["loss"].mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in ddt.named_parameters() if k in GRADS}
    ddt.zero_grad()
    assert [name for name, _ in drawn] == ["randn_like", "rand", "rand"], drawn
    dropped = seen["y"] == CONFIG["num_classes"]
    assert dropped.any() and not dropped.all(), "pick another SEED"
    refs.save(
        "rae",
        "loss",
        z=tokens(x1),
        labels=labels,
        draws=[d for _, d in drawn],
        t=seen["t"],
        x_t=tokens(seen["xt"]),
        y=seen["y"],
        pred=tokens(terms["pred"].detach()),
        loss=loss.detach(),
        grads=grads,
        schedules=schedules(repos),
    )


def make_sample(ddt):
    """(c) The Euler sampler over the shifted grid (6 points, 5 steps), CFG 2.5 on [0, 1] (the
    default) and on [0, 0.6], and none; one draw, sample_ddp.py:249's noise [B, C, h, w] (CFG
    doubles it, no draw)."""
    from stage2.transport import Sampler, create_transport

    transport = create_transport(
        "Linear",
        "velocity",
        None,
        time_dist_type="logit-normal_0_1",
        time_dist_shift=CONFIG["shift"],
    )
    sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=6)
    ddt.eval()
    y = torch.tensor([0, 2, 4])
    y_cfg = torch.cat([y, torch.full_like(y, CONFIG["num_classes"])])
    torch.manual_seed(7)
    z = torch.randn(3, C, G, G)
    runs = {}
    for name, interval, scale in (
        ("default", (0.0, 1.0), 2.5),
        ("interval", (0.0, 0.6), 2.5),
        ("none", (0, 1), 1),
    ):
        with torch.no_grad(), Draws.record() as drawn:
            if scale > 1:
                xs = sample_fn(
                    torch.cat([z, z]),
                    ddt.forward_with_cfg,
                    y=y_cfg,
                    cfg_scale=scale,
                    cfg_interval=interval,
                )[-1].chunk(2)[0]
            else:
                xs = sample_fn(z, ddt.forward, y=y)[-1]
        assert not drawn, drawn  # the ODE sampler draws nothing
        runs[name] = dict(interval=list(interval), scale=scale, out=tokens(xs))
    refs.save("rae", "sample", y=y, draws=[z], steps=6, runs=runs)


def make_shift(repos):
    """(d) The time shift from the latent's dimension (train.py), at a latent where its base
    matters: a stand-in network, v = t x_t with DiTwDDTHead's label drop, under the official
    transport and sampler; z = 0. -> a."""
    from stage2.models.model_utils import LabelEmbedder
    from stage2.transport import Sampler, create_transport

    shift = official_shift(repos, SHIFT_LATENT)
    transport = create_transport(
        "Linear", "velocity", None, time_dist_type="logit-normal_0_1", time_dist_shift=shift
    )
    drop = LabelEmbedder(CONFIG["num_classes"], 4, CONFIG["label_drop"])
    seen, grid = {}, []

    def net(xt, t, y):  # in training: the label drop too
        seen.update(t=t.clone(), y=drop.token_drop(y))
        return t[:, None, None, None] * xt

    def velocity(xt, t, y):  # in sampling
        grid.append(t[0].item())
        return t[:, None, None, None] * xt

    labels = torch.tensor([1, 3])
    z = torch.zeros(2, *SHIFT_LATENT)
    torch.manual_seed(SEED)
    with Draws.record() as drawn:
        loss = transport.training_losses(net, z, dict(y=labels))["loss"].mean()
    assert [name for name, _ in drawn] == ["randn_like", "rand", "rand"], drawn
    torch.manual_seed(7)
    noise = torch.randn(1, *SHIFT_LATENT)  # sample_ddp.py:249
    sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=6)
    with torch.no_grad():
        sample_fn(noise, velocity, y=labels[:1])
    latent = [SHIFT_LATENT[1] * SHIFT_LATENT[2], SHIFT_LATENT[0]]  # ours: [N, C]
    refs.save(
        "rae",
        "shift",
        latent=latent,
        shift=shift,
        labels=labels,
        draws=[d for _, d in drawn],
        t=seen["t"],
        y=seen["y"],
        loss=loss,
        sample_draws=[noise],
        steps=6,
        grid=torch.tensor(grid),
    )
    return shift


def make_decoder(dec, dec_sd, g):
    """(e) The decoder: decode (with the statistics) and the stage-1 L1 with the noise
    augmentation's draws (stage1/rae.py:74 s's uniform [B, 1, 1], :75 the noise [B, N, C]); the
    decoder's own output (ImageNet-normalised pixels) kept too."""
    from stage1.rae import RAE

    mean = torch.randn(C, G, G, generator=g, dtype=torch.float32)  # fp32, as stat.pt holds them
    var = torch.rand(C, G, G, generator=g, dtype=torch.float32) + 0.5
    z_norm = torch.randn(2, C, G, G, generator=g)
    raw = []
    hook = dec.register_forward_hook(lambda m, a, out: raw.append(m.unpatchify(out.logits)))
    with torch.no_grad():
        images = RAE.decode(stand_in(dec, mean.double(), var.double()), z_norm)
        z = torch.randn(3, G * G, C, generator=g) * 2  # the encoder's tokens, before going 2-D
        x01 = torch.rand(3, 3, 8, 8, generator=g)
        torch.manual_seed(SEED)
        with Draws.record() as drawn:
            z_noised = RAE.noising(stand_in(dec, tau=CONFIG["noise_tau"]), z)
        recon = RAE.decode(stand_in(dec), z_noised.transpose(1, 2).reshape(3, C, G, G))
        l1 = (recon - x01).abs().mean()  # train_stage1.py:382's rec_loss
    hook.remove()
    assert [name for name, _ in drawn] == ["rand", "randn_like"], drawn
    refs.save(
        "rae",
        "decoder",
        latent=[G * G, C],
        state_dict=dec_sd,
        mean=mean,
        var=var,
        z_norm=tokens(z_norm),
        pixels=raw[0],
        images=images,
        z=z,
        x01=x01,
        draws=[d for _, d in drawn],
        z_noised=z_noised,
        recon_pixels=raw[1],
        recon=recon,
        l1=l1,
    )


def make_keys(repos):
    """The released checkpoints' keys and shapes: DiT^DH-XL and the ViT-XL decoder (DINOv2-B,
    256 px), on meta."""
    from stage2.models.DDT import DiTwDDTHead

    with torch.device("meta"):
        xl = DiTwDDTHead(
            input_size=16,
            patch_size=1,
            in_channels=768,
            hidden_size=[1152, 2048],
            depth=[28, 2],
            num_heads=[16, 16],
        )
        dxl = official_decoder(repos, 1152, 28, 16, 4096, 768, 16, 16)
    refs.save(
        "rae",
        "keys",
        ddt_xl={k: list(v.shape) for k, v in xl.state_dict().items()},
        decoder_xl={k: list(v.shape) for k, v in dxl.state_dict().items()},
    )


def make(repos):
    refs.official("rae", repos, "src")
    import rae as R

    torch.manual_seed(0)
    ddt = official_ddt(CONFIG)
    randomise(ddt)
    sd = {k: v.clone() for k, v in ddt.state_dict().items()}  # fp32, as drawn
    ddt.double()
    torch.manual_seed(0)
    dec = official_decoder(repos, 32, 2, 2, 48, C, G, 2)
    randomise(dec, 1)
    dec_sd = {k: v.clone() for k, v in dec.state_dict().items()}
    dec.double()
    g = torch.Generator().manual_seed(1)  # the inputs' (float64: the default dtype inside)
    with float64():
        x, t, y, out = make_net(ddt, sd, g)
        make_loss(ddt, g, repos)
        make_sample(ddt)
        shift = make_shift(repos)
        make_decoder(dec, dec_sd, g)
    make_keys(repos)

    # ours, on the spot, in float64
    ours = R.RAE(R.Config(**CONFIG), G * G, C).eval()
    ours.net.load_state_dict(sd, strict=True)
    ours.double()
    with torch.no_grad():
        err = (ours.net(tokens(x), t, y) - tokens(out)).abs().max().item()
    latent = SHIFT_LATENT[1] * SHIFT_LATENT[2], SHIFT_LATENT[0]
    a = R.RAE(R.Config(**dict(CONFIG, shift=0.0)), *latent).a  # 0: a from the latent's dimension
    print(
        f"net max |ours - official| (float64): {err:.3g}; time shift a at {SHIFT_LATENT}: "
        f"official {shift}, ours {a}"
    )


def bench(repos, batch=8, repeats=5):
    """Forward + backward of the stage-2 loss (fp32, CPU) at a modest width: ms/image, official and
    ours."""
    refs.official("rae", repos, "src")
    from stage2.transport import create_transport

    import rae as R

    c = dict(
        CONFIG,
        hidden=192,
        depth=4,
        heads=3,
        head_dim=384,
        head_depth=2,
        head_heads=6,
        num_classes=10,
        label_drop=0.1,
    )
    g, ch = 8, 32
    ddt = official_ddt(c, g, ch).train()
    ours = R.RAE(R.Config(**c), g * g, ch).train()
    ours.net.load_state_dict(ddt.state_dict())
    transport = create_transport(
        "Linear", "velocity", None, time_dist_type="logit-normal_0_1", time_dist_shift=2.0
    )
    z, y = torch.randn(batch, ch, g, g), torch.arange(batch) % 10
    runs = dict(
        official=lambda: transport.training_losses(ddt, z, dict(y=y))["loss"].mean(),
        ours=lambda: ours(tokens(z), y),
    )
    ms = {}
    for name in ("official", "ours", "official", "ours"):
        runs[name]().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            runs[name]().backward()
        ms[name] = (time.perf_counter() - t0) / repeats / batch * 1e3
    print(
        f"DiT^DH fwd+bwd, batch {batch}, latent {g}x{g}x{ch}, trunk 192 x 4, head 384 x 2 "
        f"(fp32, CPU, {torch.get_num_threads()} threads): official {ms['official']:.2f} ms/img, "
        f"ours {ms['ours']:.2f} ms/img, ours/official {ms['ours'] / ms['official']:.2f}"
    )
