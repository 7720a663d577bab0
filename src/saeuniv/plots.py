"""Figures: layer-by-layer heatmaps, per-layer curves and concept-subspace charts
(matplotlib, Agg backend)."""

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
    ax.set_xticks(range(len(layers_b)), [str(layer) for layer in layers_b])
    ax.set_yticks(range(len(layers_a)), [str(layer) for layer in layers_a])
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


def category_bars(rows: list[dict], title: str):
    """Concept categories at one layer pair: per metric, each category's score as a bar,
    the shuffled-pairing null (grey) and random-subspace null (orange) as mean ± 2 sd bands,
    a star on significant bars and "too few pairs" where a category was not scored."""
    metric_names = list(dict.fromkeys(r["metric"] for r in rows if r["metric"]))
    cats = list(dict.fromkeys(r["category"] for r in rows))
    fig, axes = plt.subplots(len(metric_names) or 1, 1, squeeze=False,
                             figsize=(1.2 + 0.8 * len(cats), 1.2 + 2.2 * max(1, len(metric_names))))
    for ax, name in zip(axes[:, 0], metric_names or [""]):
        for i, cat in enumerate(cats):
            r = next((x for x in rows if x["category"] == cat and x["metric"] == name), None)
            if r is None or r["observed"] is None:
                n = next(x["n_pairs"] for x in rows if x["category"] == cat)
                ax.text(i, 0.02, f"too few\npairs ({n})", ha="center", va="bottom", fontsize=6,
                        color="grey", rotation=90)
                continue
            ax.bar(i, r["observed"], color="tab:blue", width=0.35, zorder=3)
            sd = r.get("random_sd") or 0.0
            ax.add_patch(plt.Rectangle((i - 0.4, r["random_mean"] - 2 * sd), 0.8, 4 * sd,
                                       color="tab:orange", alpha=0.35, lw=0, zorder=1))
            ax.plot([i - 0.4, i + 0.4], [r["shuffle_mean"]] * 2, color="dimgrey", lw=2,
                    zorder=4)
            if r["significant"]:
                ax.text(i, r["observed"], "*", ha="center", va="bottom", fontsize=12)
        ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(name)
        ax.axhline(0, color="black", lw=0.5)
    axes[0, 0].set_title(title, fontsize=9)
    fig.text(0.01, 0.01, "bars: observed; grey line: shuffled-pairing null mean; orange: "
             "random subspaces, mean ± 2 sd; * q < 0.05 against both", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def subspace_grid(rows: list[dict], metric: str, categories: list[str], layers_a: list[int],
                  layers_b: list[int], title: str):
    """One panel per category: A layers x B layers, z against random subspaces (blank: not
    scored), * where significant."""
    ncols = min(4, len(categories))
    nrows = -(-len(categories) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(
        ncols * (1.2 + 0.3 * len(layers_b)), nrows * (1.0 + 0.3 * len(layers_a)) + 0.6))
    im = None
    for ax, cat in zip(axes.ravel(), categories):
        grid = np.full((len(layers_a), len(layers_b)), np.nan)
        for r in rows:
            if r["metric"] == metric and r["category"] == cat and r["random_z"] is not None:
                i, j = layers_a.index(r["layer_a"]), layers_b.index(r["layer_b"])
                grid[i, j] = np.clip(r["random_z"], -10, 10)
                if r["significant"]:
                    ax.text(j, i, "*", ha="center", va="center", fontsize=9)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="coolwarm", vmin=-5, vmax=5,
                       aspect="auto", origin="lower")
        ax.set_title(cat, fontsize=9)
        ax.set_xticks(range(len(layers_b)), [str(layer) for layer in layers_b], fontsize=6)
        ax.set_yticks(range(len(layers_a)), [str(layer) for layer in layers_a], fontsize=6)
    for ax in axes.ravel()[len(categories):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("A layer", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("B layer", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="z against random subspaces (clipped ±5 in "
                 "colour)")
    return fig


def trend(series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
          title: str, xlabel: str, ylabel: str):
    """Scores against a model size on a log axis, one line per metric with its null band:
    name -> (x, score, null_mean, null_sd), the band null mean ± 2 sd."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (x, y, mean, sd) in series.items():
        order = np.argsort(x, kind="stable")
        x, y, mean, sd = (np.asarray(v, dtype=float)[order] for v in (x, y, mean, sd))
        line, = ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, mean - 2 * sd, mean + 2 * sd, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ticks = _spread(sorted({float(v) for x, *_ in series.values() for v in x}))
    ax.set_xticks(ticks, [_short(v) for v in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (band: null mean ± 2 sd)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _spread(values: list[float], gap: float = 0.05) -> list[float]:
    """Sorted positive values, each at least ``gap`` decades above the one kept before it
    (tick labels that would overlap on a log axis are dropped)."""
    kept: list[float] = []
    for v in values:
        if not kept or np.log10(v) - np.log10(kept[-1]) >= gap:
            kept.append(v)
    return kept


def _short(value: float) -> str:
    """A tick label: 3 significant digits with k, M or B for thousands, millions, billions."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def model_matrix(grid: np.ndarray, labels: list[str], title: str):
    """A models x models matrix (smaller model as row); unscored cells show "-"."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n, 1.2 + 0.7 * n))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_title(title, fontsize=10)
    for i in range(n):
        for j in range(n):
            text = "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="grey" if np.isnan(grid[i, j]) else "white")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig
