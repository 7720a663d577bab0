"""The ``main`` run's ``report.html``: one self-contained page (images as data URIs).

Sections: the summary (``summary.md`` rendered as HTML), the heatmaps, the per-layer
curves with null bands, SAE quality per layer (L0, FVU, dead fraction of each side), and
the pair browser: the best matched pairs of every layer pair, both features' top tokens and
strongest contexts side by side (the activating token marked), a link to each feature's
public dashboard where its SAE has a Neuronpedia id, sortable by any column and filtered by
layer pair and by text (a few lines of inline script: MLflow's artefact view runs a page's
own scripts, and nothing is fetched). Every text that comes from data (token text,
contexts, model and corpus names, the summary) is HTML-escaped before it is rendered.
"""

from __future__ import annotations

import base64
import io
import re
from html import escape

import markdown

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 1em; white-space: pre-wrap; }
img { max-width: 100%; margin: 0.5em 0; }
mark { background: #ffe08a; padding: 0 0.1em; }
table.browse th { cursor: pointer; user-select: none; }
table.browse th[data-dir="asc"]::after { content: " \\25B2"; }
table.browse th[data-dir="desc"]::after { content: " \\25BC"; }
table.browse td.ctx { max-width: 28em; }
.filters { margin: 0.5em 0; } .filters * { margin-right: 1em; }
"""

# Sort a browse table by a clicked column (numbers as numbers) and filter its rows by the
# layer-pair menu and the text box.
SCRIPT = """
document.querySelectorAll("table.browse").forEach(function (table) {
  var body = table.tBodies[0], rows = Array.from(body.rows);
  var pick = document.getElementById(table.dataset.pick);
  var find = document.getElementById(table.dataset.find);
  function show() {
    var cell = pick.value, text = find.value.toLowerCase();
    rows.forEach(function (r) {
      r.hidden = (cell !== "" && r.dataset.cell !== cell) ||
                 (text !== "" && r.textContent.toLowerCase().indexOf(text) < 0);
    });
  }
  pick.addEventListener("change", show);
  find.addEventListener("input", show);
  Array.from(table.tHead.rows[0].cells).forEach(function (th, i) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "desc" ? 1 : -1;
      Array.from(table.tHead.rows[0].cells).forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir > 0 ? "asc" : "desc";
      rows.sort(function (x, y) {
        var a = x.cells[i].textContent, b = y.cells[i].textContent;
        var na = parseFloat(a), nb = parseFloat(b);
        return dir * (isNaN(na) || isNaN(nb) ? a.localeCompare(b) : na - nb);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""
BROWSER_COLUMNS = ("layer pair", "a", "b", "corr", "top_tokens_a", "top_tokens_b", "context_a",
                   "context_b")
NEURONPEDIA = "https://www.neuronpedia.org"


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


def summary_html(text: str) -> str:
    """``summary.md`` as HTML: the Markdown (headings, lists, tables) rendered after every
    character of it is escaped, so no text from the data becomes markup; its headings start
    at ``<h3>``."""
    # summary.md nests lists by two spaces (as GitHub reads it); Python-Markdown wants four
    text = re.sub(r"(?m)^((?:  )+)(?=[-*] )", lambda m: m[1] * 2, text)
    html = markdown.markdown(escape(text, quote=False), extensions=["tables"])
    # under the page's own title and "Summary" heading: its headings two levels down
    return re.sub(r"<(/?)h([1-4])>", lambda m: f"<{m[1]}h{int(m[2]) + 2}>", html)


def _untitled(summary: str) -> str:
    """The summary without its own title line (the page has one)."""
    first, _, rest = summary.partition("\n")
    return rest if first.startswith("# ") else summary


def marked(context: str) -> str:
    """A context with its activating token (``[[token]]``) marked, escaped."""
    return escape(context).replace("[[", "<mark>").replace("]]", "</mark>")


def dashboard_link(np_id: str | None, feature: int) -> str:
    """Feature ``feature`` as text, linked to its Neuronpedia dashboard when its SAE has
    the Neuronpedia id ``np_id``."""
    if not np_id:
        return str(feature)
    url = escape(f"{NEURONPEDIA}/{np_id}/{feature}")
    return f'<a href="{url}" target="_blank" rel="noopener" title="Neuronpedia">{feature}</a>'


def pair_browser(pairs: list[dict]) -> str:
    """The pair browser: a layer-pair menu, a text filter and the sortable table.
    ``pairs``: rows of ``stages.match.top_pairs`` with ``neuronpedia_a``/``_b`` (the SAEs'
    Neuronpedia ids, or None)."""
    cells = sorted({(r["layer_a"], r["layer_b"]) for r in pairs})
    options = '<option value="">every layer pair</option>' + "".join(
        f'<option value="a{la}-b{lb}">A {la} / B {lb}</option>' for la, lb in cells)
    head = "".join(f"<th>{escape(c)}</th>" for c in BROWSER_COLUMNS)
    body = []
    for r in pairs:
        key = f"a{r['layer_a']}-b{r['layer_b']}"
        body.append(
            f'<tr data-cell="{key}"><td>{key}</td>'
            f'<td class="num">{dashboard_link(r.get("neuronpedia_a"), r["a"])}</td>'
            f'<td class="num">{dashboard_link(r.get("neuronpedia_b"), r["b"])}</td>'
            f'<td class="num">{r["corr"]:.4g}</td><td>{escape(r["top_tokens_a"])}</td>'
            f'<td>{escape(r["top_tokens_b"])}</td><td class="ctx">{marked(r["context_a"])}</td>'
            f'<td class="ctx">{marked(r["context_b"])}</td></tr>')
    return ('<div class="filters"><label>layer pair <select id="pair-cell">'
            f'{options}</select></label><label>text <input id="pair-find" type="search" '
            'placeholder="token or context"></label></div>'
            '<table class="browse" id="pair-browser" data-pick="pair-cell" '
            f'data-find="pair-find"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            "</tbody></table>")


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
             '<h2 id="summary">Summary</h2>', summary_html(_untitled(summary)),
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
    parts += ['<h2 id="pairs">Matched feature pairs</h2>',
              "<p>Per layer pair, the pairs with the highest activation correlation (every "
              "pair: <code>matched_pairs.csv</code>); the context of each feature&#x27;s "
              "strongest activation marks its token. Click a column to sort; a feature links "
              "to its Neuronpedia dashboard where its SAE has one.</p>",
              pair_browser(pairs)]
    if splits:
        parts += ['<h2 id="splits">Features split across the models</h2>',
                  "<p>Per layer pair, the A features with the most B partners above the "
                  "match threshold (fan-out), each B child with its correlation and both "
                  "features&#x27; strongest contexts.</p>",
                  _table(["layer_a", "layer_b", "a", "n_children", "b", "corr", "context_a",
                          "context_b"], list(splits))]
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)
