"""Query2Label (Liu et al., 2021): label queries attend to backbone features through a transformer."""

from __future__ import annotations

import torch
from torch import nn

from q2l.models.backbone import build_backbone
from q2l.models.head import GroupWiseLinear
from q2l.models.position_encoding import build_position_encoding
from q2l.models.transformer import build_transformer


class Query2Label(nn.Module):
    """timm backbone → (1×1 projection C→d) → sine positions → transformer → GroupWiseLinear.

    ``forward`` takes normalised float images [B, 3, H, W] (any size the backbone accepts, any memory
    format) and returns logits [B, K]; probabilities are ``sigmoid(logits)``. ``data_config`` holds the
    backbone's preprocessing (``mean``, ``std``, ``input_size``). ``input_proj``: None projects only
    when ``hidden_dim`` differs from the backbone's channels (official behaviour); True always
    projects; False never does (then ``hidden_dim`` must equal the channels).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 80,
        hidden_dim: int = 256,
        pretrained: bool = False,
        pretrained_path: str | None = None,
        num_heads: int = 8,
        enc_layers: int = 1,
        dec_layers: int = 2,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        decoder_self_attn: bool = False,
        activation_checkpointing: bool = False,
        input_proj: bool | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"Query2Label: num_classes must be >= 1, got {num_classes}")
        if hidden_dim % 4:
            # Sine positions give d/2 channels per axis, as sin/cos pairs.
            raise ValueError(f"model.hidden_dim must be a multiple of 4, got {hidden_dim}")
        if hidden_dim % num_heads:
            raise ValueError(
                f"model.hidden_dim ({hidden_dim}) must be divisible by model.num_heads ({num_heads})"
            )
        self.backbone = build_backbone(
            backbone,
            pretrained=pretrained,
            pretrained_path=pretrained_path,
            activation_checkpointing=activation_checkpointing,
        )
        channels = self.backbone.num_channels
        if input_proj is None:
            input_proj = hidden_dim != channels
        if not input_proj and hidden_dim != channels:
            raise ValueError(
                f"Query2Label: input_proj=False needs model.hidden_dim == backbone channels ({channels}), "
                f"got {hidden_dim}"
            )
        self.input_proj = nn.Conv2d(channels, hidden_dim, kernel_size=1) if input_proj else nn.Identity()
        self.position = build_position_encoding(hidden_dim)
        self.transformer = build_transformer(
            hidden_dim, num_heads, enc_layers, dec_layers, dim_feedforward, dropout, decoder_self_attn
        )
        self.query_embed = nn.Embedding(num_classes, hidden_dim)
        self.head = GroupWiseLinear(num_classes, hidden_dim)
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.data_config: dict = dict(self.backbone.data_config)

    def _run(self, images: torch.Tensor, need_weights: bool):
        features = self.input_proj(self.backbone(images))
        b, d, h, w = features.shape
        src = features.flatten(2).transpose(1, 2)  # [B, HW, d]
        pos = self.position(h, w, device=features.device).flatten(1).T.unsqueeze(0).to(src.dtype)
        hs, attn = self.transformer(src, pos, self.query_embed.weight, need_weights=need_weights)
        return self.head(hs), attn, (h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> logits [B, num_classes]."""
        return self._run(images, need_weights=False)[0]

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K] and the last decoder layer's cross-attention [B, K, h, w] (heads averaged)."""
        logits, attn, (h, w) = self._run(images, need_weights=True)
        return logits, attn.reshape(attn.shape[0], attn.shape[1], h, w)
