"""The pictures: image grids, reconstructions, loss curves, the latent space, anomalies, a user's
own digit.

Every plot function returns a matplotlib Figure built without pyplot: it leaves the backend and
pyplot's figures alone, a notebook shows it inline (the last expression of a cell, or `display`),
and `save_figure` writes it atomically, so an interrupted run never leaves a half-written PNG.
matplotlib is imported on the first picture, not with this module.
"""

from __future__ import annotations

import functools
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# how a picture is written, to a file or into a notebook: the whole drawing, on white
PNG_OPTIONS = {"format": "png", "bbox_inches": "tight", "facecolor": "white"}


@functools.cache
def _picture_class() -> type:
    from matplotlib.figure import Figure

    class Picture(Figure):
        """A Figure that IPython shows inline in any notebook. IPython displays a plain Figure as a
        picture only once pyplot is imported there (importing it registers that display)."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, dpi=self.dpi, **PNG_OPTIONS)
            return buffer.getvalue()

    return Picture


def new_figure(**kwargs) -> Figure:
    """A matplotlib Figure that belongs to no pyplot state (garbage-collected like any object)."""
    return _picture_class()(**kwargs)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as PNG through a temporary file and os.replace."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=fig.dpi, **PNG_OPTIONS)
    return Path(path)


def grid_image(images: torch.Tensor, nrow: int, padding: int = 2):
    """(N, 1, 28, 28) intensities -> an (H, W) numpy array laid out by torchvision's make_grid."""
    from torchvision.utils import make_grid

    return make_grid(
        images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0
    )[0].numpy()


def plot_rows(
    rows: list[torch.Tensor],
    labels: list[str],
    title: str,
    column_labels: list[str] | None = None,
    scale: float = 0.75,
) -> Figure:
    """Rows of digits, one labelled row each; all rows the same length."""
    n = rows[0].shape[0]
    fig = new_figure(figsize=(max(4.0, n * scale), len(rows) * scale * 1.05 + 0.6), dpi=100)
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, row, label in zip(axes[:, 0], rows, labels):
        ax.imshow(grid_image(row, nrow=n), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=10)
    if column_labels:
        ax = axes[-1, 0]
        ax.set_xticks([2 + 30 * i + 14 for i in range(n)], column_labels, fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def plot_reconstructions(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    title: str = "Test digits and their VAE reconstructions",
) -> Figure:
    return plot_rows([originals, reconstructions], ["test digit", "reconstruction"], title=title)


def plot_grid(images: torch.Tensor, title: str, nrow: int = 8) -> Figure:
    rows = math.ceil(images.shape[0] / nrow)
    fig = new_figure(figsize=(nrow * 0.6 + 0.4, rows * 0.6 + 0.8), dpi=100)
    ax = fig.subplots()
    ax.imshow(grid_image(images, nrow=nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    return fig


def plot_loss_curves(history: list[dict]) -> Figure:
    """Train and validation loss, bce and kl per epoch, with the best epoch (lowest validation loss)
    marked."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    fig = new_figure(figsize=(13, 3.8), dpi=100)
    axes = fig.subplots(1, 3)
    for ax, key, name in zip(
        axes,
        ("loss", "bce", "kl"),
        ("negative ELBO (bce + kl)", "reconstruction (bce)", "KL divergence"),
    ):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train", markersize=3)
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation", markersize=3)
        ax.axvline(best, color="gray", linestyle=":", linewidth=1, label=f"best (epoch {best})")
        # whole epochs only, even when a one-epoch run's axis spans less than one epoch
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves", fontsize=12)
    fig.tight_layout()
    return fig


def plot_latent_space(points: torch.Tensor, labels: torch.Tensor) -> Figure:
    """Posterior means placed on the latent map (evaluate.latent_map), one colour per digit."""
    from matplotlib import colormaps

    fig = new_figure(figsize=(7, 6), dpi=100)
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    points, labels = points.cpu().numpy(), labels.cpu().numpy()
    for d in range(10):
        sel = labels == d
        if sel.any():
            ax.scatter(
                points[sel, 0],
                points[sel, 1],
                s=3,
                alpha=0.6,
                color=cmap(d),
                label=str(d),
                rasterized=True,
            )
    ax.set_xlabel("discriminant direction 1")
    ax.set_ylabel("discriminant direction 2")
    ax.set_title(
        "Latent space: test-set posterior means on the two directions\n"
        "that best separate the digits (linear discriminant analysis)"
    )
    ax.legend(title="digit", markerscale=4, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    return fig


def plot_anomalies(
    sections: list[tuple[str, torch.Tensor, torch.Tensor, list[str]]], title: str = ""
) -> Figure:
    """For each (title, digits, reconstructions, captions): a titled panel of digits above their
    reconstructions."""
    n = sections[0][1].shape[0]
    fig = new_figure(figsize=(n * 0.8, 2.3 * len(sections)), dpi=100, layout="constrained")
    panels = fig.subfigures(len(sections), 1, squeeze=False)[:, 0]  # an array even for one section
    for sub, (heading, digits, recons, captions) in zip(panels, sections):
        axes = sub.subplots(2, n, squeeze=False)
        for i in range(n):
            for row, images in enumerate((digits, recons)):
                axes[row, i].imshow(
                    images[i, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1
                )
                axes[row, i].set_xticks([])
                axes[row, i].set_yticks([])
            axes[0, i].set_title(captions[i], fontsize=7)
        axes[0, 0].set_ylabel("digit", fontsize=8)
        axes[1, 0].set_ylabel("recon.", fontsize=8)
        sub.suptitle(heading, fontsize=11)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def plot_user_reconstruction(
    original: torch.Tensor, model_input: torch.Tensor, reconstruction: torch.Tensor, title: str
) -> Figure:
    """The user's picture, the 28x28 input the model sees, and its reconstruction."""
    fig = new_figure(figsize=(7, 2.8), dpi=100)
    axes = fig.subplots(1, 3)
    panels = (
        (original, "your image"),
        (model_input, "as the model sees it"),
        (reconstruction, "reconstruction"),
    )
    for ax, (img, name) in zip(axes, panels):
        # the last two dimensions: squeeze() would make a picture 1 pixel high one-dimensional
        ax.imshow(img.detach().cpu().reshape(img.shape[-2:]).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
