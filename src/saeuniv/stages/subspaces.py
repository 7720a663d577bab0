"""The ``subspaces`` stage: label features by concept, score each category at each layer
pair against two nulls, and log the table.

Inputs: the concept set (``subspaces.concepts``), the codes, the matched pairs of the layer
pair and both SAEs' decoder rows. Build: a ``labels`` entry per (side, layer), each
feature's hits per category among its top activations (``core.subspaces.label_features``),
and a ``subspaces`` entry per layer pair: each category's features paired by the layer
pair's matching rule (``core.subspaces.category_pairs``) and scored against shuffled
pairings and random subspaces (``core.subspaces.score_category``). The significance rule
(Benjamini-Hochberg over every cell of one metric, q < alpha against both nulls) is
``core.significance.significant_against_both``.

Logged: the ``subspaces.*`` params, ``concepts.yaml``, ``subspaces.csv``, one
``subspaces_<metric>.png`` per metric, ``subspaces_summary.md`` and
``concept_significant/<metric>``; under it one nested run per layer pair
(``subspaces:aI-bJ``) with ``concept_<metric>/<category>`` and its null fields,
``concept_pairs/<category>``, ``categories.json``, ``categories.png`` and
``labelled_features.csv``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
from tqdm.auto import tqdm

from ..concepts import load_concepts
from ..config import digest
from ..core import matching, subspaces
from ..core.significance import ALPHA, significant_against_both
from ..store import Entry
from ..tracking import csv_text, metric_name, pair_key, stage_run
from . import match
from .similarity import json_default

FIELDS = ("layer_a", "layer_b", "category", "n_features_a", "n_features_b",
          "n_pairs", "status", "metric", "observed", "svcca_k", "shuffle_mean",
          "shuffle_z", "shuffle_p", "shuffle_q", "random_mean", "random_sd",
          "random_z", "random_p", "random_q", "significant")
LOGGED = ("observed", "shuffle_z", "shuffle_p", "random_mean", "random_z", "random_p",
          "random_q")  # the fields of a table row logged as concept_<metric>[_<field>]


def extra_inputs(cfg) -> dict:
    """The concept set's content (not only its name) is an input of the stage's runs."""
    return {"concepts": asdict(load_concepts(cfg.subspaces.concepts))}


# -- labels -------------------------------------------------------------------------------

def labels_entry(pipe, side, layer: int) -> Entry:
    """Concept labels of the side's SAE features at ``layer`` (from their top activations)."""
    sub, codes = pipe.cfg.subspaces, side.codes[layer]
    spec = {"codes": codes.key, "side": side.name, "concepts": digest(asdict(pipe.concepts)),
            "top_k": sub.top_k, "min_hits": sub.min_hits, "rows": pipe.n_rows}

    def build(out: Path) -> dict:
        top = matching.top_activations(pipe.analysis_codes(codes), sub.top_k)
        lab = subspaces.label_features(top.rows, pipe.row_spans[side.name], pipe.occurrences,
                                       sub.min_hits)
        np.savez(out / "labels.npz", hits=lab.hits, phrase=lab.phrase, rows=top.rows,
                 values=top.values)
        return {"n_features": int(lab.hits.shape[0]), "categories": list(
            pipe.concepts.categories), "n_labelled": lab.member.sum(0).tolist()}

    return pipe.store.get_or_create("labels", spec, build)[0]


def load_labels(e: Entry, min_hits: int) -> tuple[subspaces.Labels, matching.TopActivations]:
    """A labels entry: the labels (members: ``min_hits`` or more hits) and top activations."""
    with np.load(e.file("labels.npz")) as npz:
        data = dict(npz)
    lab = subspaces.Labels(data["hits"], data["phrase"], data["hits"] >= min_hits,
                           data["rows"].shape[1])
    return lab, matching.TopActivations(data["rows"], data["values"])


# -- per-category scores ----------------------------------------------------------------

def entry(pipe, la: int, lb: int) -> Entry:
    """Per-category pairs and scores (both nulls) at one layer pair."""
    sub, mc = pipe.cfg.subspaces, pipe.cfg.match
    lab_a, lab_b = labels_entry(pipe, pipe.a, la), labels_entry(pipe, pipe.b, lb)
    m = match.entry(pipe, la, lb)
    spec = {"labels_a": lab_a.key, "labels_b": lab_b.key, "matches": m.key,
            "sae_a": pipe.a.sae_keys[la], "sae_b": pipe.b.sae_keys[lb],
            "policy": mc.policy, "threshold": mc.threshold,
            "subspaces": {k: v for k, v in asdict(sub).items()
                          if k not in ("concepts", "pairs", "context")}, **pipe.device_key}
    return pipe.store.get_or_create(
        "subspaces", spec, lambda out: build(pipe, la, lb, lab_a, lab_b, m, out))[0]


def cell(pipe, la: int, lb: int) -> None:
    """Build the layer pair's concept subspaces and the labels they read
    (``saeuniv.tasks``)."""
    entry(pipe, la, lb)


def build(pipe, la: int, lb: int, lab_a: Entry, lab_b: Entry, m_entry: Entry,
          out: Path) -> dict:
    sub = pipe.cfg.subspaces
    codes_a = pipe.analysis_codes(pipe.a.codes[la])
    codes_b = pipe.analysis_codes(pipe.b.codes[lb])
    dec_a, dec_b = pipe.a.decoder(la), pipe.b.decoder(lb)
    pool = match.load(m_entry)
    top_a, top_b = match.load_top(m_entry)  # the token filters' top activations
    tokens_a, tokens_b = pipe.a.top_tokens(top_a), pipe.b.top_tokens(top_b)
    member_a = load_labels(lab_a, sub.min_hits)[0].member
    member_b = load_labels(lab_b, sub.min_hits)[0].member
    result = {"layer_a": la, "layer_b": lb, "n_pool": pool.n, "categories": []}
    pairs = {}
    for c, cat in enumerate(pipe.concepts.categories):
        fa, fb = np.flatnonzero(member_a[:, c]), np.flatnonzero(member_b[:, c])
        corr = (matching.correlation(codes_a[:, fa], codes_b[:, fb], device=pipe.device)
                if fa.size and fb.size
                else np.zeros((fa.size, fb.size)))
        m = subspaces.category_pairs(corr, fa, fb, pipe.cfg.match.rule(), tokens_a, tokens_b)
        score = subspaces.score_category(
            cat, dec_a, dec_b, m, fa.size, fb.size, pool.a, pool.b, sub.metrics, sub.n_perm,
            sub.seed, sub.min_pairs, sub.svcca_k, sub.cka_debiased, pipe.device)
        result["categories"].append(asdict(score))
        pairs.update({f"{cat}.a": m.a, f"{cat}.b": m.b, f"{cat}.corr": m.corr})
    np.savez(out / "pairs.npz", **pairs)
    (out / "subspaces.json").write_text(json.dumps(result, indent=1, default=json_default))
    return {"n_scored": sum(c["status"] == "ok" for c in result["categories"])}


def load(e: Entry) -> dict:
    return json.loads(e.file("subspaces.json").read_text())


# -- the table ----------------------------------------------------------------------------

def _rows(res: dict) -> list[dict]:
    """A stored layer pair's table rows: one per (category, metric), or one per category
    that was not scored."""
    rows = []
    for cat in res["categories"]:
        base = {"layer_a": res["layer_a"], "layer_b": res["layer_b"],
                "category": cat["category"], "n_features_a": cat["n_features_a"],
                "n_features_b": cat["n_features_b"], "n_pairs": cat["n_pairs"],
                "status": cat["status"]}
        if cat["status"] != "ok":
            rows.append({**base, "metric": ""})
            continue
        for name, r in cat["metrics"].items():
            if "error" in r:
                rows.append({**base, "metric": name, "status": r["error"]})
                continue
            rows.append({**base, "metric": name, "observed": r["observed"],
                         "svcca_k": r.get("k"),
                         "shuffle_mean": r["shuffle"]["null_mean"],
                         "shuffle_z": r["shuffle"]["z"], "shuffle_p": r["shuffle"]["p"],
                         "random_mean": r["random"]["null_mean"],
                         "random_sd": r["random"]["null_sd"],
                         "random_z": r["random"]["z"], "random_p": r["random"]["p"]})
    return rows


def table(results: list[dict]) -> list[dict]:
    """One row per (layer pair, category, metric) from stored subspace results, with
    q-values per metric and null over every scored row and ``significant`` (the rule of
    ``core.significance.significant_against_both``)."""
    rows = [row for res in results for row in _rows(res)]
    for name in dict.fromkeys(r["metric"] for r in rows if "observed" in r):
        scored = [r for r in rows if r["metric"] == name and "observed" in r]
        q_shuffle, q_random, significant = significant_against_both(
            [r["shuffle_p"] for r in scored], [r["random_p"] for r in scored])
        for r, qs, qr, sig in zip(scored, q_shuffle, q_random, significant):
            r.update(shuffle_q=float(qs), random_q=float(qr), significant=bool(sig))
    return [{k: r.get(k) for k in FIELDS} for r in rows]


# -- logging --------------------------------------------------------------------------------

def labelled_rows(pipe, la: int, lb: int, pairs_npz: dict) -> list[dict]:
    """Every labelled feature of A at ``la`` and B at ``lb``, per category: the phrase it
    hit most, how many of its top-k did, its partner in the category and top contexts."""
    sub, concepts = pipe.cfg.subspaces, pipe.concepts
    out = []
    for side, layer, other in ((pipe.a, la, "b"), (pipe.b, lb, "a")):
        lab, top = load_labels(labels_entry(pipe, side, layer), sub.min_hits)
        n_tokens = {}  # phrase -> tokens it takes in this side's tokenizer
        for c, cat in enumerate(concepts.categories):
            mine, theirs = pairs_npz[f"{cat}.{side.name}"], pairs_npz[f"{cat}.{other}"]
            corr = pairs_npz[f"{cat}.corr"]
            for f in lab.features(c):
                phrase = concepts.phrases[c][lab.phrase[f, c]]
                if phrase not in n_tokens:
                    n_tokens[phrase] = len(side.tokenizer.encode(" " + phrase,
                                                                 add_special_tokens=False))
                where = np.flatnonzero(mine == f)
                contexts = [side.context(int(r), sub.context, sub.context)
                            for r in top.rows[f] if r >= 0]
                out.append({"side": side.name, "layer": layer, "feature": int(f),
                            "category": cat, "phrase": phrase, "hits": int(lab.hits[f, c]),
                            "top_k": lab.top_k,
                            "multi_word": concepts.multi_word(c, int(lab.phrase[f, c])),
                            "phrase_tokens": n_tokens[phrase],
                            "partner": int(theirs[where[0]]) if where.size else "",
                            "corr": round(float(corr[where[0]]), 4) if where.size else "",
                            "top_contexts": " || ".join(contexts)})
    return out


def log_pair(pipe, la: int, lb: int, e: Entry, rows: list[dict]) -> None:
    """One layer pair's nested run: its metrics, table, bar chart and labelled features."""
    from ..plots import category_bars, plt

    sub, key = pipe.cfg.subspaces, pair_key(la, lb)
    with stage_run("subspaces.pair", run_name=f"subspaces:{key}",
                   tags={"saeuniv.layer_a": str(la), "saeuniv.layer_b": str(lb),
                         "saeuniv.concepts": pipe.concepts.name}):
        mlflow.log_params({"layer_a": la, "layer_b": lb})
        mlflow.log_metrics(pair_metrics(rows))
        mlflow.log_table({k: [r[k] for r in rows] for k in FIELDS}, "categories.json")
        fig = category_bars(rows, f"{pipe.a.model_name} layer {la} vs {pipe.b.model_name} "
                            f"layer {lb}: concept subspaces (n_perm={sub.n_perm})")
        mlflow.log_figure(fig, "categories.png")
        plt.close(fig)
        with np.load(e.file("pairs.npz")) as npz:
            pairs_npz = dict(npz)
        mlflow.log_text(csv_text(labelled_rows(pipe, la, lb, pairs_npz)),
                        "labelled_features.csv")


def pair_metrics(rows: list[dict]) -> dict[str, float]:
    """A layer pair's table rows as metrics: ``concept_pairs/<category>``, the features of
    each side, and ``concept_<metric>[_<field>]/<category>`` for the fields of ``LOGGED``."""
    out = {}
    for r in rows:
        cat = metric_name(r["category"])
        out.update({f"concept_pairs/{cat}": r["n_pairs"],
                    f"concept_features_a/{cat}": r["n_features_a"],
                    f"concept_features_b/{cat}": r["n_features_b"]})
        if r["observed"] is None:
            continue
        for field in LOGGED:
            v = r[field]
            if v is not None and np.isfinite(v):
                suffix = "" if field == "observed" else "_" + field
                out[f"concept_{r['metric']}{suffix}/{cat}"] = v
    return out


def run(pipe) -> None:
    """Label, score and log every layer pair of ``subspace_pairs``, then the whole table."""
    from ..plots import plt, subspace_grid

    sub, concepts = pipe.cfg.subspaces, pipe.concepts
    mlflow.log_params({f"subspaces.{k}": (json.dumps(list(v)) if isinstance(v, tuple) else v)
                       for k, v in asdict(sub).items()})
    mlflow.log_dict({"name": concepts.name, "categories": {
        c: list(p) for c, p in zip(concepts.categories, concepts.phrases)}}, "concepts.yaml")
    pairs = pipe.subspace_pairs
    entries = {pair: entry(pipe, *pair) for pair in tqdm(pairs, desc="subspaces",
                                                          unit="layer pair")}
    rows = table([load(e) for e in entries.values()])
    for (la, lb), e in entries.items():
        log_pair(pipe, la, lb, e, [r for r in rows if (r["layer_a"], r["layer_b"]) == (la, lb)])
    mlflow.log_text(csv_text(rows), "subspaces.csv")
    for name in sub.metrics:
        fig = subspace_grid(rows, name, list(concepts.categories), pipe.a.layers,
                            pipe.b.layers, f"{name} of concept subspaces: z against random "
                            "subspaces (* q < 0.05 against both nulls; blank: too few pairs)")
        mlflow.log_figure(fig, f"subspaces_{name}.png")
        plt.close(fig)
    text = summary(pipe, rows, pairs)
    mlflow.log_text(text, "subspaces_summary.md")
    mlflow.set_tag("mlflow.note.content", text)
    mlflow.log_metrics({f"concept_significant/{name}": sum(
        bool(r["significant"]) for r in rows if r["metric"] == name) for name in sub.metrics})


# -- the summaries --------------------------------------------------------------------------

def summary(pipe, rows: list[dict], pairs) -> str:
    """``subspaces_summary.md``: the settings, then per metric and category how many layer
    pairs are significant and the strongest cell against random subspaces."""
    sub, concepts = pipe.cfg.subspaces, pipe.concepts
    directions = (f"{sub.svcca_k} directions" if sub.svcca_k
                  else "a quarter of the pairs as directions (at least 2)")
    cka = ("debiased" if sub.cka_debiased
           else "biased (near 1 for few pairs in many dimensions)")
    lines = [f"# Concept subspaces: {pipe.a.model_name} vs {pipe.b.model_name}", "",
             f"- concept set `{concepts.name}`: {len(concepts.categories)} categories; a feature "
             f"belongs to a category when {sub.min_hits} or more of its top {sub.top_k} "
             "activations fall inside one of its phrases",
             f"- {len(pairs)} layer pairs; pairs within a category by {pipe.cfg.match.policy}, "
             f"correlation > {pipe.cfg.match.threshold}; categories with fewer than "
             f"{sub.min_pairs} pairs are not scored",
             f"- SVCCA keeps {directions}; CKA is {cka}",
             f"- nulls: {sub.n_perm} shuffled pairings and {sub.n_perm} random subspaces of the "
             f"same size (seed {sub.seed}); significant = Benjamini-Hochberg q < {ALPHA} "
             "against both, over all layer pairs and categories of a metric", ""]
    for name in sub.metrics:
        lines += _metric_lines(name, [r for r in rows if r["metric"] == name
                                      and r["observed"] is not None], concepts.categories)
    skipped = sorted({r["category"] for r in rows if r["status"] != "ok"})
    if skipped:
        lines.append("Too few pairs somewhere: " + ", ".join(skipped))
    return "\n".join(lines) + "\n"


def _metric_lines(name: str, rows: list[dict], categories) -> list[str]:
    sig = [r for r in rows if r["significant"]]
    lines = [f"## {name}: {len(sig)} of {len(rows)} scored (category, layer pair) cells "
             "significant"]
    for cat in categories:
        mine = [r for r in rows if r["category"] == cat]
        hits = [r for r in mine if r["significant"]]
        if not mine:
            lines.append(f"- {cat}: never enough pairs to score")
            continue
        best = max(mine, key=lambda r: -np.inf if r["random_z"] is None
                   or not np.isfinite(r["random_z"]) else r["random_z"])
        lines.append(
            f"- {cat}: significant at {len(hits)}/{len(mine)} layer pairs; highest z vs "
            f"random at A{best['layer_a']}/B{best['layer_b']}: {best['observed']:.3f} "
            f"(random {best['random_mean']:.3f}, z {best['random_z']:.1f}, q "
            f"{best['random_q']:.3g}; shuffle q {best['shuffle_q']:.3g})")
    return lines + [""]


def main_summary_lines(pipe) -> list[str]:
    """The concept-subspace counts for the main run's summary (the subspaces run has more)."""
    rows = table([load(entry(pipe, la, lb)) for la, lb in pipe.subspace_pairs])
    lines = ["", f"## Concept subspaces (`{pipe.concepts.name}`: significant = BH q < {ALPHA} "
             "against shuffled pairing and random subspaces)", ""]
    for name in pipe.cfg.subspaces.metrics:
        scored = [r for r in rows if r["metric"] == name and r["observed"] is not None]
        per_cat = [f"{c} {sum(r['significant'] for r in scored if r['category'] == c)}/"
                   f"{sum(r['category'] == c for r in scored)}" for c in pipe.concepts.categories
                   if any(r["category"] == c for r in scored)]
        lines.append(f"- {name}: {sum(r['significant'] for r in scored)} of {len(scored)} "
                     "scored (category, layer pair) cells"
                     + (f"; {', '.join(per_cat)}" if per_cat else ""))
    return lines
