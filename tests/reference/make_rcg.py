"""RCG: the official RDM (latentmlp.py, ddpm.py, ddim.py) and RCG's DiT (pixel_generator/dit/models.py) against
rcg.py (fixtures rcg_rdm, rcg_loss, rcg_ddim, rcg_dit; a bench).

The official code targets torch 1.7 / lightning 1.4 and a GPU: pytorch_lightning (one decorator) and the encoder zoo
(pretrained_enc, not run: a stub encoder returns fixed representations) are stubbed with sys.modules entries,
Tensor.cuda / Module.cuda are no-ops and the DDIM sampler's buffers stay where they are, so that it runs in fp32 on a
CPU. The DiT is built as the pixel generator here uses it: 3 input channels and no learned-sigma half (the official
one runs on 4-channel SD-VAE latents with 8 output channels; its first channels are the eps these correspond to).
"""
import contextlib, os, sys, time, types

import torch
import torch.nn as nn

from make_references import official, save

# the RDM: 16-d representations, width 64, 2 blocks, time_embed_dim 32; the released configs' T and betas
RDM_CONFIG = dict(dim=16, rdm_width=64, rdm_depth=2, t_dim=32, T=1000, beta_start=0.0015, beta_end=0.0195)
# the DiT: 16x16 images, 4x4 patches, width 32, 2 blocks of 2 heads, 8-d representations, half of them dropped
DIT_CONFIG = dict(image_size=16, patch=4, hidden=32, depth=2, heads=2, rep_dim=8, rep_drop=0.5)
LOSS_SEED, DROP_SEED = 3, 5
DDIM_RUNS = ((10, 1.0), (7, 1.0), (10, 0.0))  # (steps, eta): 1000 // 7 = 142 gives 8 steps (1, 143, ..., 995)


@contextlib.contextmanager
def cpu_only():
    """Tensor.cuda / Module.cuda -> no-ops; the stubbed modules the official imports need."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    stubs = ["pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.distributed",
             "pretrained_enc.models_pretrained_enc"]
    for name in stubs:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["pytorch_lightning.utilities.distributed"].rank_zero_only = lambda f: f
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def official_rdm(c):
    """The official RDM of config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml at the sizes of c, without its encoder."""
    from omegaconf import OmegaConf
    from rdm.util import instantiate_from_config
    conf = OmegaConf.load(os.path.join(CHECKOUT, "config/rdm/mocov3vitb_simplemlp_l12_w1536.yaml")).model
    assert (conf.params.timesteps, conf.params.linear_start, conf.params.linear_end) == (
        c["T"], c["beta_start"], c["beta_end"])
    conf.params.channels = c["dim"]
    conf.params.unet_config.params.update(in_channels=c["dim"], out_channels=c["dim"], model_channels=c["rdm_width"],
                                          bottleneck_channels=c["rdm_width"], num_res_blocks=c["rdm_depth"],
                                          time_embed_dim=c["t_dim"])
    del conf.params.pretrained_enc_config
    return instantiate_from_config(conf)


def official_dit(c):
    from pixel_generator.dit.models import DiT
    return DiT(input_size=c["image_size"], patch_size=c["patch"], in_channels=3, hidden_size=c["hidden"],
               depth=c["depth"], num_heads=c["heads"], class_dropout_prob=0, rep_dropout_prob=c["rep_drop"],
               num_classes=1, learn_sigma=False, rep_dim=c["rep_dim"])


def randomise(named, seed=0):
    """Every parameter (or buffer) away from its init: LayerNorm gains around 1, zero-initialised layers non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named:
            if p.dim() == 0 or name == "pos_embed":
                continue
            r = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and name.replace(".", "").endswith(("layers0weight", "out0weight")):  # LayerNorm gains
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)


CHECKOUT = None  # the official checkout's folder, set by make / bench


def make(repos):
    global CHECKOUT
    CHECKOUT = official("rcg", repos)
    with cpu_only():
        from rdm.models.diffusion.ddim import DDIMSampler

        # (a) the RDM network: the official RDM module, raw weights and (different) EMA weights
        torch.manual_seed(0)
        m = official_rdm(RDM_CONFIG).eval()
        randomise(m.model.named_parameters(), 0)
        randomise(m.model_ema.named_buffers(), 1)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        g = torch.Generator().manual_seed(1)
        B, D = 5, RDM_CONFIG["dim"]
        r_t = torch.randn(B, D, 1, 1, generator=g)
        t = torch.tensor([0, 1, 250, 998, 999])
        ctx = m.get_learned_conditioning({"class_label": torch.zeros(B).long()})
        with torch.no_grad():
            out = m.apply_model(r_t, t, ctx)
            with m.ema_scope():
                out_ema = m.apply_model(r_t, t, ctx)
        save("rcg", "rdm", config=RDM_CONFIG, state_dict=sd, r_t=r_t.flatten(1), t=t, out=out.flatten(1),
             out_ema=out_ema.flatten(1))

        # (b) the loss: the schedule, the representations' normalisation, the loss at fixed t and noise and at a seed
        class Encoder(nn.Module):  # stands for MoCo v3 + its head: returns fixed raw representations
            def forward_features(self, x):
                return raw
            head = nn.Identity()
        raw = torch.randn(4, D, generator=g) * 3 + torch.arange(4.0)[:, None]
        m.pretrained_encoder, m.pretrained_enc_withproj = Encoder(), True
        batch = {"image": torch.rand(4, 16, 16, 3, generator=g), "class_label": torch.zeros(4).long()}
        x0 = m.get_input(batch, "image")[0]
        t = torch.tensor([0, 17, 500, 999])
        e = torch.randn(4, D, 1, 1, generator=g)
        cond = m.get_learned_conditioning({"class_label": torch.zeros(4).long()})
        m.train()
        loss = m.p_losses(x0, cond, t, noise=e)[0]
        torch.manual_seed(LOSS_SEED)
        t_seed, e_seed = torch.randint(0, 1000, (4,)), torch.randn(4, D)
        torch.manual_seed(LOSS_SEED)
        loss_seed = m(x0, {"class_label": torch.zeros(4).long()})[0]
        save("rcg", "loss", raw=raw, rep=x0.flatten(1), t=t, e=e.flatten(1), loss=loss.detach(), seed=LOSS_SEED,
             t_seed=t_seed, e_seed=e_seed, loss_seed=loss_seed.detach(), betas=m.betas.clone(),
             alphas_cumprod=m.alphas_cumprod.clone())

        # (c) the DDIM sampler under ema_scope, as the pixel generators call it; the draws from the global RNG
        m.eval()
        sampler = DDIMSampler(m)
        sampler.register_buffer = lambda name, attr: setattr(sampler, name, attr)  # (it moves them to "cuda")
        runs = []
        for i, (steps, eta) in enumerate(DDIM_RUNS):
            with m.ema_scope(), torch.no_grad():
                cond = m.get_learned_conditioning({"class_label": torch.zeros(3).long()})
                torch.manual_seed(10 + i)
                x, _ = sampler.sample(steps, conditioning=cond, batch_size=3, shape=[D, 1, 1], eta=eta,
                                      verbose=False)
            torch.manual_seed(10 + i)
            draws = torch.stack([torch.randn(3, D, 1, 1).flatten(1) for _ in range(1 + len(sampler.ddim_timesteps))])
            runs.append(dict(steps=steps, eta=eta, seed=10 + i, timesteps=torch.from_numpy(sampler.ddim_timesteps),
                             draws=draws, out=x.flatten(1)))
        save("rcg", "ddim", runs=runs)

        # (a) the DiT generator: with r, with the null r (fake_latent), without r (c = t + y), guided, in training
        torch.manual_seed(0)
        dit = official_dit(DIT_CONFIG).eval()
        randomise(dit.named_parameters(), 2)
        sd = {k: v.clone() for k, v in dit.state_dict().items()}
        c = DIT_CONFIG
        B, S = 4, c["image_size"]
        x = torch.randn(B, 3, S, S, generator=g)
        t = torch.tensor([0.0, 0.001, 0.37, 1.0])  # ours: t in [0, 1]; the official net sees 1000 t
        rep = torch.randn(B, c["rep_dim"], generator=g)
        y = torch.zeros(B).long()
        null = dit.fake_latent.repeat(B, 1)
        with torch.no_grad():
            out_rep, out_null = dit(x, 1000 * t, y, rep), dit(x, 1000 * t, y, null)
            out_uncond = dit(x, 1000 * t, y, None)
            out_cfg = dit.forward_with_cfg(torch.cat([x, x]), torch.cat([1000 * t] * 2), torch.cat([y, y]), 3.0,
                                           torch.cat([rep, null]))[:B]
            dit.train()
            torch.manual_seed(DROP_SEED)
            drop = torch.rand(B) < c["rep_drop"]
            assert 0 < drop.sum() < B, "pick another DROP_SEED"
            torch.manual_seed(DROP_SEED)
            out_train = dit(x, 1000 * t, y, rep)
        save("rcg", "dit", config=DIT_CONFIG, state_dict=sd, x=x, t=t, rep=rep, out_rep=out_rep, out_null=out_null,
             out_uncond=out_uncond, cfg_scale=3.0, out_cfg=out_cfg, drop_seed=DROP_SEED, drop=drop,
             out_train=out_train)


def bench(repos, batch=8, repeats=5):
    """ms/image of forward + backward, official and ours side by side in fp32 on this machine: the DiT (32 px,
    patch 2, width 192, 6 blocks) and the RDM network (256-d, width 1536, 12 blocks: the paper's)."""
    global CHECKOUT
    CHECKOUT = official("rcg", repos)
    with cpu_only():
        import rcg as R
        c = dict(image_size=32, patch=2, hidden=192, depth=6, heads=3, rep_dim=256, rep_drop=0.1)
        torch.manual_seed(0)
        theirs = official_dit(c).train()
        ours = R.DiT(R.Config(**{k: v for k, v in c.items() if k != "rep_dim"}), c["rep_dim"]).train()
        ours.load_state_dict(theirs.state_dict())
        x, t, rep = torch.randn(batch, 3, 32, 32), torch.rand(batch), torch.randn(batch, 256)
        y = torch.zeros(batch).long()
        dit_runs = dict(official=lambda: theirs(x, 1000 * t, y, rep), ours=lambda: ours(x, t, rep))
        rc = dict(RDM_CONFIG, dim=256, rdm_width=1536, rdm_depth=12, t_dim=256)
        theirs_rdm = official_rdm(rc).model.diffusion_model.train()
        ours_rdm = R.SimpleMLP(256, 1536, 12).train()
        ours_rdm.load_state_dict(theirs_rdm.state_dict())
        r, tt = torch.randn(batch, 256), torch.randint(0, 1000, (batch,))
        ctx = torch.zeros(batch, 1, 512)
        rdm_runs = dict(official=lambda: theirs_rdm(r[..., None, None], tt, ctx), ours=lambda: ours_rdm(r, tt))
        for what, runs in (("DiT", dit_runs), ("RDM net", rdm_runs)):
            ms = {}
            for name, fn in runs.items():
                fn().square().mean().backward()  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn().square().mean().backward()
                    times.append(time.perf_counter() - t0)
                ms[name] = 1000 * min(times) / batch
            print(f"{what}: official {ms['official']:.2f} ms/image, ours {ms['ours']:.2f} ms/image, "
                  f"ours/official {ms['ours'] / ms['official']:.2f} (fp32, forward + backward, batch {batch}, "
                  f"best of {repeats})")
