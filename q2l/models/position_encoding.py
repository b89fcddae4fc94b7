"""2-D sine position encoding (DETR's ``PositionEmbeddingSine``), built for each feature-map size."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of normalised (y, x) positions, ``num_pos_feats`` channels each.

    Same values as DETR with an all-valid mask: positions 1..H and 1..W divided by their last value
    (+1e-6) and scaled by ``scale`` (2π), frequencies ``temperature^(2⌊i/2⌋/num_pos_feats)``, sin on even
    and cos on odd channels, y channels first. Computed for the actual H×W on every call, so any input
    resolution works (no fixed-size buffer).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Encoding [2·num_pos_feats, height, width] in float32."""
        y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            eps = 1e-6
            y = y / (y[-1:] + eps) * self.scale
            x = x / (x[-1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_y = y[:, None] / dim_t  # [H, F]
        pos_x = x[:, None] / dim_t  # [W, F]
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos_y = pos_y.T[:, :, None].expand(-1, height, width)
        pos_x = pos_x.T[:, None, :].expand(-1, height, width)
        return torch.cat((pos_y, pos_x), dim=0)


def build_position_encoding(hidden_dim: int) -> PositionEmbeddingSine:
    """DETR's settings for a transformer of width ``hidden_dim``: d/2 features per axis, normalised."""
    return PositionEmbeddingSine(hidden_dim // 2, temperature=10000.0, normalize=True)
