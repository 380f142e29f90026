import os
import urllib.error

import pytest
import torch
import torch.nn.functional as F

import common

# facebookresearch/dinov2 hub/backbones.py: dinov2_vits14 has 175 tensors, 22,056,576 values
OFFICIAL_VITS14 = {
    "cls_token": (1, 1, 384),
    "pos_embed": (1, 1370, 384),
    "mask_token": (1, 384),
    "patch_embed.proj.weight": (384, 3, 14, 14),
    "patch_embed.proj.bias": (384,),
    "blocks.0.norm1.weight": (384,),
    "blocks.0.attn.qkv.weight": (1152, 384),
    "blocks.0.attn.proj.bias": (384,),
    "blocks.0.ls1.gamma": (384,),
    "blocks.0.mlp.fc1.weight": (1536, 384),
    "blocks.11.mlp.fc2.weight": (384, 1536),
    "blocks.11.ls2.gamma": (384,),
    "norm.weight": (384,),
    "norm.bias": (384,),
}


def test_official_key_layout():
    sd = common.DinoViT(384, 12, 6).state_dict()
    assert len(sd) == 175 and sum(v.numel() for v in sd.values()) == 22_056_576
    for k, shape in OFFICIAL_VITS14.items():
        assert tuple(sd[k].shape) == shape, k
    sd_reg = common.DinoViT(384, 12, 6, registers=4).state_dict()
    assert tuple(sd_reg["register_tokens"].shape) == (1, 4, 384) and len(sd_reg) == 176


def _official_like_state_dict(registers):
    """A state dict with the released key layout and non-trivial values (LayerScale and norms not at
    their init)."""
    g = torch.Generator().manual_seed(1)
    sd = common.DinoViT(384, 12, 6, registers=registers).state_dict()
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_hub_name_loads_a_cached_official_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    sd = _official_like_state_dict(registers=4)
    os.makedirs(tmp_path / "checkpoints")
    torch.save(sd, tmp_path / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth")
    enc = common.load_encoder("dinov2_vits14_reg")
    assert (
        enc.resolution == 224
        and enc.dim == 384
        and not any(p.requires_grad for p in enc.parameters())
    )
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    g, p = enc(x)
    # 224 / 14 = 16 -> 256 patch tokens, registers dropped
    assert g.shape == (2, 384) and p.shape == (2, 256, 384)
    # the same numbers by hand: resize, normalise, and a ViT built from the same state dict
    ref = common.DinoViT(384, 12, 6, registers=4)
    ref.load_state_dict(sd)
    xi = F.interpolate((x + 1) / 2, size=(224, 224), mode="bicubic", align_corners=False)
    mean, std = (
        torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1),
    )
    g_ref, p_ref = ref((xi - mean) / std)
    assert torch.allclose(g, g_ref, atol=1e-5) and torch.allclose(p, p_ref, atol=1e-5)


def test_file_spec_and_resolution(tmp_path):
    sd = _official_like_state_dict(registers=0)
    torch.save(sd, tmp_path / "enc.pt")
    enc = common.load_encoder(f"{tmp_path / 'enc.pt'}@112")
    g, p = enc(torch.rand(3, 3, 40, 24) * 2 - 1)  # any input size
    assert enc.resolution == 112 and p.shape == (3, 64, 384)


def test_position_embedding_interpolation():
    vit = common.DinoViT(64, 1, 1, patch=14, grid=37)
    # at the native grid the table is used as it is; elsewhere it is resized bicubically with
    # dinov2's 0.1 offset
    x = torch.randn(1, 3, 37 * 14, 37 * 14)
    assert vit(x)[1].shape == (1, 37 * 37, 64)
    pos = vit.pos_embed[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(pos, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    assert expected.shape[-2:] == (16, 16)
    captured = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    vit.eval()(torch.zeros(1, 3, 224, 224))
    # a zero image: patch embedding = bias
    tokens = captured["x"][:, 1:] - vit.patch_embed.proj.bias
    assert torch.allclose(tokens, expected.permute(0, 2, 3, 1).reshape(1, 256, 64), atol=1e-5)


def test_random_vit_is_deterministic_and_frozen():
    a, b = common.load_encoder("random-vit-s@28"), common.load_encoder("random-vit-s@28")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(a(x)[1], b(x)[1]) and a(x)[1].shape == (2, 4, 384)
    a.train()
    assert not a.net.training


def test_encoder_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
    with pytest.raises(common.UsageError, match=f"put {url} at"):
        common.load_encoder("dinov2_vitb14")
    with pytest.raises(common.UsageError, match="unknown --encoder"):
        common.load_encoder("resnet50")
    (tmp_path / "bad.pt").write_bytes(b"not a state dict")
    with pytest.raises(
        common.UsageError, match="neither a dinov2-layout ViT nor a torchvision ResNet"
    ):
        common.load_encoder(str(tmp_path / "bad.pt"))


def test_register_backbones_resize_positions_as_dinov2_hub():
    """dinov2's hub builds the _reg4 backbones with interpolate_antialias=True, interpolate_offset=0
    (an exact size), the others without antialiasing at the scale factor (n + 0.1) / grid."""
    for registers in (0, 4):
        vit = common.DinoViT(64, 1, 1, patch=14, grid=37, registers=registers)
        pos = vit.pos_embed[:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
        if registers:
            expected = F.interpolate(pos, size=(16, 16), mode="bicubic", antialias=True)
        else:
            expected = F.interpolate(pos, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
        assert torch.allclose(
            vit.resized_pos(16, 16), expected.permute(0, 2, 3, 1).reshape(1, 256, 64), atol=1e-6
        )
    other = F.interpolate(pos, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic").permute(
        0, 2, 3, 1
    )
    # the two differ
    assert not torch.allclose(vit.resized_pos(16, 16), other.reshape(1, 256, 64), atol=1e-3)


def test_download_creates_the_hub_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "fresh"))
    sd = _official_like_state_dict(registers=0)
    seen = {}

    def download(url, path, progress=False):
        seen.update(url=url, progress=progress)
        torch.save(sd, path)  # fails if the folder was not created first

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    enc = common.load_encoder("dinov2_vits14")
    assert seen == {
        "url": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        "progress": True,
    }
    assert enc.dim == 384 and os.path.isfile(
        tmp_path / "fresh" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    )


def test_torchvision_resnet_layout_loads_and_matches(tmp_path):
    """A torchvision resnet18 file (ImageNet stem, with its fc) loads through load_encoder and gives
    torchvision's own pooled feature and last-stage map; the CIFAR stem (3x3 stride 1, no max-pool)
    is read off the first conv."""
    import torchvision

    tv = torchvision.models.resnet18().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics away from their init, so eval mode matters
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    enc = common.load_encoder(str(tmp_path / "r18.pt"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    pooled, tokens = enc(x)
    mean, std = (
        torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1),
    )
    xn = ((x + 1) / 2 - mean) / std
    trunk = torch.nn.Sequential(*list(tv.children())[:-2])  # conv1 ... layer4
    with torch.no_grad():
        fmap = trunk(xn)
    # 64 px / 32 -> 2 x 2
    assert enc.resolution is None and enc.dim == 512 and tokens.shape == (2, 4, 512)
    assert torch.allclose(tokens, fmap.flatten(2).transpose(1, 2), atol=1e-4)
    assert torch.allclose(pooled, tv.avgpool(fmap).flatten(1), atol=1e-4)
    small = common.ResNet(16, (1, 1), cifar_stem=True)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    enc = common.load_encoder(str(tmp_path / "small.pt"))
    assert isinstance(enc.net.maxpool, torch.nn.Identity) and enc.dim == 32
    # stride 1, then one stride-2 stage: 8 x 8
    assert enc(torch.zeros(1, 3, 16, 16))[1].shape == (1, 64, 32)
