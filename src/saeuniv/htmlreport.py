"""The ``main`` run's ``report.html``: one self-contained page (images as data URIs).

Sections: the summary, the heatmaps, the per-layer curves with null bands, SAE quality
per layer (L0, FVU, dead fraction of each side), and the top matched feature pairs with
the top context of each feature. Every text that comes from data (token text, contexts,
model and corpus names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 1em; white-space: pre-wrap; }
img { max-width: 100%; margin: 0.5em 0; }
"""


def png_base64(fig) -> str:
    """A matplotlib figure as base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{escape(str(value))}</td>"


def _table(columns: list[str], rows: list[dict]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, "")) for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(title: str, summary: str, heatmaps: dict[str, str], curves: str,
           quality: list[tuple[str, int, dict]], pairs: list[dict],
           splits: list[dict] = ()) -> str:
    """The page. ``heatmaps``: panel (``<metric>``, ``<metric>_cal``, ``<metric>_index``) ->
    base64 PNG; ``curves``: base64 PNG; ``quality``:
    (side, layer, {l0, fvu, dead_fraction}); ``pairs``: rows of ``stages.match.top_pairs``;
    ``splits``: rows of ``stages.match.splits`` (none: no section)."""
    def img(b64, alt):
        return f'<img alt="{escape(alt)}" src="data:image/png;base64,{b64}">'
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{escape(title)}"
             f"</title><style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>",
             '<h2 id="summary">Summary</h2>', f"<pre>{escape(summary)}</pre>",
             '<h2 id="heatmaps">Heatmaps</h2>',
             "<p>Score of every A layer (rows) against every B layer (columns); * marks "
             "p &lt; 0.05 against the permutation null. Per metric: the raw score, the "
             "calibrated score (0: not above the layer pair&#x27;s chance threshold) and, with "
             "a ceiling, the convergence index (0: the floor, 1: the twin-SAE ceiling).</p>"]
    parts += [f"<h3>{escape(name)}</h3>" + img(b64, f"heatmap_{name}.png")
              for name, b64 in heatmaps.items()]
    parts += ['<h2 id="curves">Per-layer curves</h2>',
              "<p>Each A layer against the B layer at the nearest relative depth; the band is "
              "the null mean &plusmn; 2 sd.</p>", img(curves, "depth_curves.png"),
              '<h2 id="quality">SAE quality per layer</h2>']
    by_layer: dict[tuple[str, int], dict] = {(s, layer): q for s, layer, q in quality}
    rows = [{"side": s, "layer": layer, "sae_l0": float(q["l0"]), "sae_fvu": float(q["fvu"]),
             "sae_dead": float(q["dead_fraction"])} for (s, layer), q in sorted(by_layer.items())]
    parts.append(_table(["side", "layer", "sae_l0", "sae_fvu", "sae_dead"], rows))
    parts += ['<h2 id="pairs">Top matched feature pairs</h2>',
              "<p>Per layer pair, the pairs with the highest activation correlation; the "
              "context marks the token of the feature's strongest activation as "
              "[[token]].</p>",
              _table(["layer_a", "layer_b", "a", "b", "corr", "top_tokens_a", "top_tokens_b",
                      "context_a", "context_b"], pairs)]
    if splits:
        parts += ['<h2 id="splits">Features split across the models</h2>',
                  "<p>Per layer pair, the A features with the most B partners above the "
                  "match threshold (fan-out), each B child with its correlation and both "
                  "features&#x27; strongest contexts.</p>",
                  _table(["layer_a", "layer_b", "a", "n_children", "b", "corr", "context_a",
                          "context_b"], list(splits))]
    parts.append("</body></html>")
    return "\n".join(parts)
