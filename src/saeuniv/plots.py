"""Figures: layer-by-layer heatmaps and per-layer curves (matplotlib, Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmap(grid: np.ndarray, layers_a: list[int], layers_b: list[int], title: str,
            label_a: str, label_b: str, pvalues: np.ndarray | None = None, alpha: float = 0.05):
    """Heatmap of ``grid`` (A layers x B layers); cells with p < alpha get a star."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(layers_b), 1.0 + 0.55 * len(layers_a)))
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(layers_b)), [str(l) for l in layers_b])
    ax.set_yticks(range(len(layers_a)), [str(l) for l in layers_a])
    ax.set_xlabel(f"{label_b} layer")
    ax.set_ylabel(f"{label_a} layer")
    ax.set_title(title, fontsize=10)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isnan(grid[i, j]):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
                continue
            star = "*" if pvalues is not None and pvalues[i, j] < alpha else ""
            ax.text(j, i, f"{grid[i, j]:.2f}{star}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < np.nanmean(grid) else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if pvalues is not None:
        fig.text(0.01, 0.01, f"* p < {alpha} (permutation null)", fontsize=7)
    fig.tight_layout()
    return fig


def depth_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                 title: str, xlabel: str = "relative depth of A layer"):
    """Per-layer curves with null bands: name -> (x, score, null_mean, null_sd)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (x, y, mean, sd) in curves.items():
        line, = ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, mean - 2 * sd, mean + 2 * sd, color=line.get_color(), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score (band: null mean ± 2 sd)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
