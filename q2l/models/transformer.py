"""DETR-style transformer for Query2Label: encoder over image tokens, decoder over label queries.

Post-norm layers (DETR's default). Positions are added to queries and keys in every attention, never
to values. The decoder target starts at zero and the label embeddings are its query positions in
every layer; its self-attention is optional (the official Query2Label removes it).
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderLayer(nn.Module):
    """Self-attention over image tokens + feed-forward, post-norm."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, src, need_weights=False)[0]))
        ff = self.linear2(self.dropout(torch.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ff))


class DecoderLayer(nn.Module):
    """(Optional self-attention) + cross-attention to image tokens + feed-forward, post-norm."""

    def __init__(
        self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, self_attn: bool
    ) -> None:
        super().__init__()
        if self_attn:
            self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
            self.norm1 = nn.LayerNorm(d_model)
            self.dropout1 = nn.Dropout(dropout)
        else:
            self.self_attn = None
        self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        query_pos: torch.Tensor,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.self_attn is not None:
            q = k = tgt + query_pos
            tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        out, weights = self.cross_attn(
            tgt + query_pos, memory + pos, memory, need_weights=need_weights, average_attn_weights=True
        )
        tgt = self.norm2(tgt + self.dropout2(out))
        ff = self.linear2(self.dropout(torch.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ff)), weights


class Transformer(nn.Module):
    """Encoder (``enc_layers``) + decoder (``dec_layers``) with DETR's final decoder LayerNorm."""

    def __init__(
        self,
        d_model: int = 256,
        num_heads: int = 8,
        enc_layers: int = 1,
        dec_layers: int = 2,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        decoder_self_attn: bool = False,
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(
                f"model.hidden_dim ({d_model}) must be divisible by model.num_heads ({num_heads})"
            )
        if dec_layers < 1:
            raise ValueError(f"model.dec_layers must be >= 1, got {dec_layers}")
        self.encoder = nn.ModuleList(
            EncoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(enc_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, num_heads, dim_feedforward, dropout, decoder_self_attn)
            for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # DETR's init: Xavier-uniform for every matrix.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, query_embed: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the transformer.

        ``src`` [B, HW, d] image tokens, ``pos`` [1 or B, HW, d] their positions, ``query_embed``
        [K, d] label embeddings. Returns the decoder output [B, K, d] and, when ``need_weights``, the
        last decoder layer's cross-attention [B, K, HW] averaged over heads (else None).
        """
        memory = src
        for layer in self.encoder:
            memory = layer(memory, pos)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        weights = None
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            tgt, weights = layer(tgt, memory, pos, query_pos, need_weights=need_weights and i == last)
        return self.decoder_norm(tgt), weights


def build_transformer(
    hidden_dim: int,
    num_heads: int,
    enc_layers: int,
    dec_layers: int,
    dim_feedforward: int,
    dropout: float,
    decoder_self_attn: bool,
) -> Transformer:
    """The Query2Label transformer from the model settings."""
    return Transformer(
        hidden_dim, num_heads, enc_layers, dec_layers, dim_feedforward, dropout, decoder_self_attn
    )
