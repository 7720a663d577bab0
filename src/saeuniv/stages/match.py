"""The ``match`` stage: pair the SAE features of A and B at every layer pair.

Inputs: the codes of A layer ``la`` and B layer ``lb`` (the first ``match.n_tokens`` rows,
or all). Build (``matches`` store entry): the exact correlation of every A feature with
every B feature, each feature's top activations, and the pairs of the matching rule
(``saeuniv.core.matching.pair``: policy, threshold, junk and shared-token filters), with
the pairs left after each step. With ``match.basis: decoder`` the policy reads the cosine
of the decoder rows after a stitch fitted on residual vectors (``saeuniv.residuals``)
instead of the correlation. Logged per layer pair, as a row of the table
``match_cells.json`` (and as keys ``<name>/aI-bJ`` with ``tracking.per_cell_metrics``, see
``saeuniv.cells``): ``n_tokens``, ``n_dead_a``, ``n_dead_b``, ``n_policy``,
``mean_corr_before``, ``n_threshold``, ``n_junk``, ``n_shared_token``, ``n_pairs``,
``mean_corr_after``, ``unique_a_fraction`` (and ``stitch_r2`` with the decoder basis); the
table ``top_pairs.json`` (the ten best pairs of each layer pair with their top tokens and
contexts).

With ``match.compare`` on, each layer pair also gets a ``matchers`` entry (see
``saeuniv.matchers``): the pairs of every matcher of ``MATCHERS``, their agreement,
the fan-out of features, the statistics of the pairs and the cross-reconstruction.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from tqdm.auto import tqdm

from .. import matchers
from ..cells import log_cells
from ..core import matching
from ..store import Entry
from ..tracking import pair_key, warn


def spec(pipe, la: int, lb: int) -> dict:
    return {"codes_a": pipe.a.codes[la].key, "codes_b": pipe.b.codes[lb].key,
            "match": pipe.cfg.match.keyed(), **pipe.device_key}


def entry(pipe, la: int, lb: int) -> Entry:
    """The ``matches`` entry of A layer ``la`` and B layer ``lb``, built when missing."""
    return pipe.store.get_or_create("matches", spec(pipe, la, lb),
                                    lambda out: build(pipe, la, lb, out))[0]


def build(pipe, la: int, lb: int, out: Path) -> dict:
    """Correlate, pair and filter; write ``pairs.npz`` and ``top.npz``; return the counts."""
    mc = pipe.cfg.match
    codes_a = pipe.analysis_codes(pipe.a.codes[la])
    codes_b = pipe.analysis_codes(pipe.b.codes[lb])
    extra, sim = {}, None
    if mc.basis == "decoder":
        sim, st = matchers.decoder_cosine(pipe, la, lb)
        extra = {"stitch_r2": st.r2_heldout}
    else:
        sim = matching.correlation(codes_a, codes_b, device=pipe.device)
    top_a = matching.top_activations(codes_a, mc.top_k)
    top_b = matching.top_activations(codes_b, mc.top_k)
    paired = matching.pair(sim, mc.rule(), pipe.a.top_tokens(top_a), pipe.b.top_tokens(top_b),
                           **mc.options())
    m = paired.matches
    counts = {"n_tokens": int(codes_a.shape[0]),
              "n_dead_a": int(matching.dead_features(codes_a).sum()),
              "n_dead_b": int(matching.dead_features(codes_b).sum()), **paired.counts, **extra}
    np.savez(out / "pairs.npz", a=m.a, b=m.b, corr=m.corr)
    np.savez(out / "top.npz", rows_a=top_a.rows, values_a=top_a.values, rows_b=top_b.rows,
             values_b=top_b.values)
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in counts.items()}


def load(entry: Entry) -> matching.Matches:
    """The pairs of a ``matches`` entry."""
    data = np.load(entry.file("pairs.npz"))
    return matching.Matches(data["a"], data["b"], data["corr"])


def load_top(entry: Entry) -> tuple[matching.TopActivations, matching.TopActivations]:
    """The top activations of every A and B feature stored with a ``matches`` entry."""
    with np.load(entry.file("top.npz")) as npz:  # each array read once
        return (matching.TopActivations(npz["rows_a"], npz["values_a"]),
                matching.TopActivations(npz["rows_b"], npz["values_b"]))


def cell(pipe, la: int, lb: int) -> None:
    """Build the layer pair's entries: its pairs and, with ``match.compare``, the
    matchers entry (``saeuniv.tasks``)."""
    e = entry(pipe, la, lb)
    if pipe.cfg.match.compare:
        compare_entry(pipe, la, lb, e)


def run(pipe) -> None:
    rows, compared, counts = [], {}, {}
    for la, lb in tqdm(pipe.pairs, desc="match", unit="layer pair"):
        e = entry(pipe, la, lb)
        counts[la, lb] = numbers(e.meta)
        if e.meta["n_pairs"] == 0:
            warn(f"match.{pair_key(la, lb)}", no_pairs_message(pipe, la, lb, e.meta))
        rows += top_pairs(pipe, la, lb, e, 10)
        if pipe.cfg.match.compare:
            compared[(la, lb)] = compare_entry(pipe, la, lb, e)
    log_cells(counts, "match", pipe.cfg.tracking.per_cell_metrics)
    if rows:
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "top_pairs.json")
    if compared:
        log_comparison(pipe, compared)


def numbers(meta: dict) -> dict[str, float]:
    """The numbers of a store entry's metadata (not its flags, lists or missing values)."""
    return {k: v for k, v in meta.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_entry(pipe, la: int, lb: int, e: Entry) -> Entry:
    """The layer pair's ``matchers`` entry (``saeuniv.matchers``)."""
    top_a, top_b = load_top(e)
    tokens = (pipe.a.top_tokens(top_a), pipe.b.top_tokens(top_b))
    return matchers.entry(pipe, la, lb, e, tokens)


def log_comparison(pipe, compared: dict) -> None:
    """Per layer pair, every number of the matchers entries (the table
    ``matchers_cells.json``, see ``saeuniv.cells``); run-wide, their medians over layer
    pairs (``<name>_median``); the table ``top_splits.json``."""
    values: dict[str, list[float]] = {}
    rows, cells = [], {}
    for (la, lb), e in compared.items():
        cells[la, lb] = numbers(e.meta)
        for k, v in cells[la, lb].items():
            values.setdefault(k, []).append(v)
        rows += split_rows(pipe, la, lb, e.meta["splits"])
    log_cells(cells, "matchers", pipe.cfg.tracking.per_cell_metrics)
    mlflow.log_metrics({f"{k}_median": float(np.median(v)) for k, v in values.items()})
    if rows:
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "top_splits.json")


def split_rows(pipe, la: int, lb: int, splits: list[dict]) -> list[dict]:
    """One row per child of each top split, with both features' strongest contexts."""
    if not splits:
        return []
    top_a, top_b = load_top(entry(pipe, la, lb))
    out = []
    for s in splits:
        for child, corr in zip(s["children"], s["corr"]):
            ra, rb = top_a.rows[s["a"], 0], top_b.rows[child, 0]
            out.append({"layer_a": la, "layer_b": lb, "a": s["a"], "n_children":
                        len(s["children"]), "b": child, "corr": round(corr, 4),
                        "context_a": pipe.a.context(int(ra)) if ra >= 0 else "",
                        "context_b": pipe.b.context(int(rb)) if rb >= 0 else ""})
    return out


def no_pairs_message(pipe, la: int, lb: int, meta: dict) -> str:
    mc = pipe.cfg.match
    return (f"A layer {la} / B layer {lb}: no pairs left after matching ({meta['n_policy']} "
            f"by policy {mc.policy}, {meta['n_threshold']} above match.threshold="
            f"{mc.threshold}, {meta['n_junk']} after the junk filter; dead or constant "
            f"features: {meta['n_dead_a']} of A, {meta['n_dead_b']} of B); lower "
            "match.threshold, or check the SAEs")


def top_pairs(pipe, la: int, lb: int, e: Entry, n: int | None) -> list[dict]:
    """The ``n`` best pairs of a layer pair (all: None), best first, with each feature's
    top tokens and the context of its strongest activation."""
    m = load(e)
    rows_a, rows_b = (t.rows for t in load_top(e))
    order = np.argsort(-m.corr)[:n]

    def words(side, rows):
        return " | ".join(repr(side.row_text[r]) for r in rows if r >= 0)

    def context(side, row):
        return side.context(int(row)) if row >= 0 else ""

    a, b = pipe.a, pipe.b
    return [{"layer_a": la, "layer_b": lb, "a": int(m.a[i]), "b": int(m.b[i]),
             "corr": round(float(m.corr[i]), 4), "top_tokens_a": words(a, rows_a[m.a[i]]),
             "top_tokens_b": words(b, rows_b[m.b[i]]),
             "context_a": context(a, rows_a[m.a[i], 0]),
             "context_b": context(b, rows_b[m.b[i], 0])} for i in order]


def compare_summary_lines(pipe, middle: dict) -> list[str]:
    """The matchers compared (``match.compare``), for the main run's summary; ``middle``:
    the middle band's calibrated score per (metric, matcher) (``similarity.by_matcher``)."""
    names = matchers.names(pipe)
    short = {"decoder": "dec", "transport": "ot", "vocab": "vocab"}
    others = [n for n in names if n != "correlation"]
    lines = ["", "## Matchers compared", "",
             "Pairs of each matcher (" + ", ".join(names) + "), "
             "their Jaccard overlap with correlation's, the stitch's held-out R², the share "
             "of matched features with two or more partners above match.split_threshold="
             f"{pipe.cfg.match.split_threshold} (split), and B's SAE on A's "
             "activations as explained variance of B's: raw, through the stitch, and B's own.",
             "", "| layer pair | pairs " + " / ".join(names) + " | "
             + " | ".join(f"J corr-{short[n]}" for n in others)
             + " | stitch R² | A split | B split | EV raw | EV aligned | EV own |",
             "|---" * (8 + len(others)) + "|"]
    for la, lb in pipe.pairs:
        m = compare_entry(pipe, la, lb, entry(pipe, la, lb)).meta
        cells = [" / ".join(str(m.get(f"n_pairs_{n}", "–")) for n in names),
                 *(m.get(f"jaccard_correlation_vs_{n}") for n in others),
                 m.get("stitch_r2"), m.get("split_share_a"), m.get("split_share_b"),
                 m.get("xrecon_raw"), m.get("xrecon_aligned"), m.get("xrecon_own")]
        lines.append(f"| {pair_key(la, lb)} | " + " | ".join(
            c if isinstance(c, str) else ("–" if c is None else f"{c:.3f}") for c in cells) + " |")
    lines += ["", "Middle band, mean calibrated score by matcher:", "",
              "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in pipe.cfg.similarity.metrics:
        vals = [middle.get((metric, n), float("nan")) for n in names]
        lines.append(f"| {metric} | " + " | ".join(
            "–" if not np.isfinite(v) else f"{v:.3f}" for v in vals) + " |")
    return lines


def splits(pipe) -> list[dict]:
    """Every layer pair's top splits with contexts (``match.compare``), for the report."""
    return [row for la, lb in pipe.pairs for row in split_rows(
        pipe, la, lb, compare_entry(pipe, la, lb, entry(pipe, la, lb)).meta["splits"])]
