"""timm backbone adapter: any timm model's last feature map as B×C×H×W (docs/design.md §2)."""

from __future__ import annotations

import timm
import torch
from torch import nn

from q2l.models.pretrained import create_timm_model


class Backbone(nn.Module):
    """Wraps a timm model and returns its last feature map in NCHW layout.

    Three output layouts of ``forward_features`` are handled: NCHW (CNNs), NHWC (families that declare
    ``output_fmt == "NHWC"``, e.g. Swin) and token sequences B×N×C (ViT-like models with a
    ``patch_embed``): prefix tokens (class/register/distillation, ``num_prefix_tokens``) are dropped
    and the rest reshaped to the patch grid of the actual input size. Models that accept
    ``dynamic_img_size`` are created with it so that any resolution works.

    The classifier is removed (``reset_classifier(0)``). A dry run at the pretrained input size reads
    ``num_channels`` from the real output and finds head-only parts that ``forward_features`` never
    uses (e.g. ConvNeXt's head norm, ViT's ``fc_norm``); their parameters are frozen so that DDP sees
    no parameter without gradient.
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"model.backbone: {name!r} is not a timm model name (see timm.list_models())")
        try:
            body, data_config = create_timm_model(
                name, pretrained=pretrained, pretrained_path=pretrained_path, dynamic_img_size=True
            )
        except TypeError as err:
            if "dynamic_img_size" not in str(err):
                raise
            # Most CNNs have no such argument and take any resolution anyway.
            body, data_config = create_timm_model(
                name, pretrained=pretrained, pretrained_path=pretrained_path
            )
        body.reset_classifier(0)
        self.name = name
        self.body = body
        self.data_config = data_config
        self.channels_last_output = getattr(body, "output_fmt", "NCHW") == "NHWC"
        self.num_prefix_tokens = int(getattr(body, "num_prefix_tokens", 0))
        self.num_channels = self._dry_run(data_config["input_size"])
        if activation_checkpointing:
            try:
                body.set_grad_checkpointing(True)
            except (AssertionError, NotImplementedError, AttributeError) as err:
                raise ValueError(
                    f"model.activation_checkpointing: backbone {name!r} does not support it ({err})"
                ) from err

    @torch.no_grad()
    def _dry_run(self, input_size: tuple[int, int, int]) -> int:
        """Run once to read the channel count and freeze parameters of modules that never ran."""
        ran: set[nn.Module] = set()
        hooks = [m.register_forward_hook(lambda mod, *_: ran.add(mod)) for m in self.body.modules()]
        was_training = self.body.training
        try:
            self.body.eval()
            channels = self._to_nchw(self.body.forward_features(torch.zeros(1, *input_size)), input_size[1:])
        finally:
            self.body.train(was_training)
            for h in hooks:
                h.remove()
        for module in self.body.modules():
            # Parameters held directly by the root (cls_token, pos_embed) are used by forward_features.
            if module is not self.body and module not in ran:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        return int(channels.shape[1])

    def _token_grid(self, height: int, width: int) -> tuple[int, int]:
        patch_embed = getattr(self.body, "patch_embed", None)
        if patch_embed is None:
            raise ValueError(f"backbone {self.name!r} returns tokens but has no patch_embed to size its grid")
        if hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        ph, pw = patch_embed.patch_size
        return height // ph, width // pw

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` [B, 3, H, W] -> features [B, C, h, w]."""
        x = self._to_nchw(self.body.forward_features(images), images.shape[-2:])
        if x.shape[1] != self.num_channels:
            raise ValueError(
                f"backbone {self.name!r}: feature map has {x.shape[1]} channels, expected {self.num_channels}"
            )
        return x

    def _to_nchw(self, x: torch.Tensor, image_hw) -> torch.Tensor:
        if x.ndim == 3:
            gh, gw = self._token_grid(int(image_hw[0]), int(image_hw[1]))
            tokens = x[:, self.num_prefix_tokens :]
            if tokens.shape[1] != gh * gw:
                raise ValueError(
                    f"backbone {self.name!r}: {tokens.shape[1]} patch tokens do not form a {gh}×{gw} grid"
                )
            x = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[-1], gh, gw)
        elif x.ndim == 4 and self.channels_last_output:
            x = x.permute(0, 3, 1, 2)
        elif x.ndim != 4:
            raise ValueError(f"backbone {self.name!r}: unsupported feature shape {tuple(x.shape)}")
        return x


def build_backbone(
    name: str, *, pretrained: bool, pretrained_path: str | None, activation_checkpointing: bool
) -> Backbone:
    """The backbone adapter for a timm model name."""
    return Backbone(
        name,
        pretrained=pretrained,
        pretrained_path=pretrained_path,
        activation_checkpointing=activation_checkpointing,
    )
