"""Query2Label model: timm backbone adapter, sine positions, DETR-style transformer, group-wise head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from q2l.models.backbone import Backbone
from q2l.models.head import GroupWiseLinear
from q2l.models.position_encoding import PositionEmbeddingSine
from q2l.models.pretrained import PretrainedWeightsError
from q2l.models.query2label import Query2Label
from q2l.models.transformer import Transformer

if TYPE_CHECKING:
    from q2l.config import ModelConfig

__all__ = [
    "Backbone",
    "GroupWiseLinear",
    "PositionEmbeddingSine",
    "PretrainedWeightsError",
    "Query2Label",
    "Transformer",
    "build_model",
]


def build_model(model_cfg: ModelConfig, num_classes: int) -> Query2Label:
    """Query2Label from the ``model`` config section."""
    return Query2Label(
        backbone=model_cfg.backbone,
        num_classes=num_classes,
        hidden_dim=model_cfg.hidden_dim,
        pretrained=model_cfg.pretrained,
        pretrained_path=model_cfg.pretrained_path,
        num_heads=model_cfg.num_heads,
        enc_layers=model_cfg.enc_layers,
        dec_layers=model_cfg.dec_layers,
        dim_feedforward=model_cfg.dim_feedforward,
        dropout=model_cfg.dropout,
        decoder_self_attn=model_cfg.decoder_self_attn,
        activation_checkpointing=model_cfg.activation_checkpointing,
    )
