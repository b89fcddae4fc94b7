"""Where each label looked: the last decoder layer's cross-attention of a label query over the image.

Query2Label's label queries attend to the backbone's feature grid; the attention weights of the last decoder
layer (heads averaged) form one h×w map per label. ``attention_maps`` computes them, ``save_attention_figure``
draws the image next to one overlay per predicted label, and ``log_attention_examples`` writes a few such
figures for a training run. Figures are drawn with matplotlib's object API (no pyplot state, no display).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# figures are downscaled so that the longest side of a panel is at most this many pixels
_MAX_PANEL_PX = 384


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [B, K] and cross-attention maps [B, K, h, w] of ``model`` for uint8 images [B, 3, S, S].

    Images are normalised with ``model.data_config`` mean/std exactly as the engine does.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(
            f"attention_maps expects uint8 images [B, 3, S, S], got {images.dtype} {tuple(images.shape)}"
        )
    device = next(model.parameters()).device
    mean255 = torch.tensor(model.data_config["mean"], device=device).view(1, -1, 1, 1) * 255
    std255 = torch.tensor(model.data_config["std"], device=device).view(1, -1, 1, 1) * 255
    was_training = model.training
    model.eval()
    try:
        logits, attn = model.forward_with_attention(images.to(device).float().sub_(mean255).div_(std255))
    finally:
        model.train(was_training)
    return torch.sigmoid(logits.float()).cpu().numpy(), attn.float().cpu().numpy()


def predicted_labels(probs: np.ndarray, threshold: float | None = 0.5, top_k: int | None = None) -> list[int]:
    """Label indices to show for one image, most likely first.

    Labels with probability ≥ ``threshold`` (all when None), at most ``top_k`` of them (all when None).
    """
    order = [int(i) for i in np.argsort(-probs, kind="stable")]
    if threshold is not None:
        order = [i for i in order if probs[i] >= threshold]
    return order[:top_k] if top_k is not None else order


def overlay(image: np.ndarray, attn: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an attention map [h, w] (upsampled bilinearly, scaled to [0, 1]) as a heat map over ``image``.

    ``image``: uint8 [H, W, 3]; returns float [H, W, 3] in [0, 1].
    """
    from matplotlib import colormaps

    h, w = image.shape[:2]
    up = F.interpolate(
        torch.from_numpy(attn)[None, None].float(), size=(h, w), mode="bilinear", align_corners=False
    )
    heat = up[0, 0].numpy()
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colour = colormaps["jet"](heat)[..., :3]
    return (1 - alpha) * image.astype(np.float64) / 255 + alpha * colour


def _panel_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] tensor (or [H, W, 3] array) → uint8 [H, W, 3], downscaled to ``_MAX_PANEL_PX``."""
    if isinstance(image, torch.Tensor):
        t = image
    else:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    h, w = t.shape[-2:]
    scale = _MAX_PANEL_PX / max(h, w)
    if scale < 1:
        t = (
            F.interpolate(
                t[None].float(),
                size=(max(1, round(h * scale)), max(1, round(w * scale))),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            .round()
            .clamp(0, 255)
            .byte()
        )
    return t.permute(1, 2, 0).cpu().numpy()


def save_attention_figure(
    image: torch.Tensor | np.ndarray,
    maps: np.ndarray,
    probs: np.ndarray,
    label_names: list[str],
    labels: list[int],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Write a PNG: ``image`` (uint8 [3, H, W] or [H, W, 3], any size), one overlay per label in ``labels``.

    ``maps`` [K, h, w] and ``probs`` [K] belong to that image. With no label to show, the figure says so next
    to the image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = _panel_image(image)
    panels = 1 + max(1, len(labels))
    fig = Figure(figsize=(3 * panels, 3.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(img)
    axes[0].set_title(title or "image", fontsize=9)
    if not labels:
        axes[1].text(0.5, 0.5, "no label predicted", ha="center", va="center", fontsize=10)
    for ax, k in zip(axes[1:], labels, strict=False):
        ax.imshow(overlay(img, maps[k]))
        ax.set_title(f"{label_names[k]}  {probs[k]:.2f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def log_attention_examples(
    model: nn.Module,
    images: torch.Tensor,
    label_names: list[str],
    out_dir: str | Path,
    *,
    max_images: int = 4,
    threshold: float = 0.5,
    top_k: int = 3,
    names: list[str] | None = None,
) -> list[Path]:
    """Write attention figures of the first ``max_images`` of ``images`` (uint8 [N, 3, S, S]) to ``out_dir``.

    Each figure shows the labels with probability ≥ ``threshold`` (at most ``top_k``; the single most likely
    one when none passes, so that every figure shows a map). ``names`` gives file stems (default
    ``example_000`` …). Returns the written paths (the training layer logs the folder as an MLflow artifact).
    """
    images = images[:max_images]
    probs, maps = attention_maps(model, images)
    written = []
    for i in range(images.shape[0]):
        labels = predicted_labels(probs[i], threshold, top_k) or predicted_labels(probs[i], None, 1)
        stem = names[i] if names is not None else f"example_{i:03d}"
        written.append(
            save_attention_figure(
                images[i].cpu(),
                maps[i],
                probs[i],
                label_names,
                labels,
                Path(out_dir) / f"{stem}.png",
                title=stem,
            )
        )
    return written
