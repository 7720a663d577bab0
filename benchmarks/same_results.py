"""Show that a change leaves every result bit-identical.

    python benchmarks/same_results.py --ref REF [--config tiny] [--config default] [--keep DIR]

For each config, the code at git ``REF`` (checked out in a temporary worktree) and the code
in this working tree each run ``saeuniv run`` twice, cold and then warm (the warm run reuses
the finished stage runs), into a fresh store and MLflow database of their own. Then every
result is compared:

- store entries: the same kinds and keys; every file the same bytes, except ``.npz`` files
  (their zip wrapper carries a timestamp), compared array by array, dtype and bits; the
  manifest's spec and meta (build timings left out);
- MLflow runs, matched by their place in the run tree (parent, stage, name): status,
  params, the whole history (step, value) of every metric, the ``saeuniv.*`` tags that
  describe inputs (code identity and process tags left out), the run description, and the
  bytes of every artefact; the numbers of a per-layer-pair table (``<stage>_cells.json``)
  are compared as the metrics ``<name>/aI-bJ`` they stand for.

Each side runs on one CPU of its own (the two sides at once when there are two), so every
torch operation runs on one thread: with two threads, training the built-in family is not
bit-reproducible from one process to the next, even with the same code (two runs of the
same commit give weights that differ in the last bits, and the SAEs and everything after
them follow); with one thread it is.

It prints what it compared, the number of differences by store kind and by run, and the
first differences of each, and exits with status 1 when anything differs.

Needs the project installed (``pip install -e .``) and, for the default corpus, npm. A
config takes minutes to hours by its size: on one thread of a 2-core machine, ``tiny``
takes about half a minute per run and ``default`` about five.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
REPO = Path(__file__).resolve().parents[1]
RUN = "import sys; from saeuniv.cli import main; sys.exit(main(sys.argv[1:]))"
CELLS = "_cells.json"  # the suffix of a per-layer-pair table artefact
VOLATILE_META = ("train_seconds",)  # wall-clock times recorded in an entry's meta
# tags that name the code or the process, not the inputs: they differ by design
VOLATILE_TAGS = ("saeuniv.code_version", "saeuniv.git_commit", "saeuniv.git_dirty",
                 "saeuniv.host", "saeuniv.boot_id", "saeuniv.pid", "saeuniv.pid_start",
                 "saeuniv.inputs_hash", "saeuniv.reused_from")


def run_side(src: Path, work: Path, config: str, runs: int, cpu: int) -> float:
    """``saeuniv run --config config`` ``runs`` times with the package at ``src``, on CPU
    ``cpu`` alone (one thread); seconds."""
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(src), "SAEUNIV_HOME": str(work / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    t0 = time.time()
    for i in range(runs):
        with open(work / f"run{i + 1}.log", "w") as log:
            proc = subprocess.run([sys.executable, "-c", RUN, "run", "--config", config,
                                   "--experiment", "same-results"], cwd=work, env=env,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        if proc.returncode:
            raise SystemExit(f"saeuniv run --config {config} failed with the code at {src} "
                             f"(exit {proc.returncode}); see {work / f'run{i + 1}.log'}")
    return time.time() - t0


# -- what a run left behind, as comparable values ----------------------------------------

def file_value(path: Path):
    """The bytes' SHA-256, or for .npz every array's dtype, shape and bits' SHA-256."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: [str(z[k].dtype), list(z[k].shape),
                        hashlib.sha256(np.ascontiguousarray(z[k]).tobytes()).hexdigest()]
                    for k in sorted(z.files)}
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_fingerprint(root: Path) -> dict:
    """kind/key -> {spec, meta, files} for every finished entry of the store."""
    out = {}
    for manifest in sorted(root.glob("*/*/manifest.json")):
        entry = manifest.parent
        if entry.name.startswith(".") or ".corrupt-" in entry.name:
            continue
        m = json.loads(manifest.read_text())
        meta = {k: v for k, v in m.get("meta", {}).items() if k not in VOLATILE_META}
        files = {str(p.relative_to(entry)): file_value(p) for p in sorted(entry.rglob("*"))
                 if p.is_file() and p.name != "manifest.json"}
        out[f"{entry.parent.name}/{entry.name}"] = {"spec": m["spec"], "meta": meta,
                                                    "files": files}
    return out


def _number(v: float):
    return "nan" if math.isnan(v) else v


def runs_fingerprint(work: Path) -> dict:
    """Run-tree path -> {status, params, metrics, tags, artefacts} for every MLflow run."""
    import mlflow

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("same-results")
    runs = client.search_runs([exp.experiment_id], max_results=10000,
                              order_by=["attributes.start_time ASC"])
    by_id = {r.info.run_id: r for r in runs}
    names: dict[str, str] = {}

    def path(run) -> str:
        if run.info.run_id not in names:
            parent = run.data.tags.get("mlflow.parentRunId")
            prefix = path(by_id[parent]) + "/" if parent in by_id else ""
            label = f"{prefix}{run.data.tags.get('saeuniv.stage')}:{run.info.run_name}"
            n = sum(v == label or v.startswith(label + "#") for v in names.values())
            names[run.info.run_id] = label + (f"#{n + 1}" if n else "")
        return names[run.info.run_id]

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            rid = run.info.run_id
            metrics = {k: [[m.step, _number(m.value)] for m in sorted(
                client.get_metric_history(rid, k), key=lambda m: (m.step, m.timestamp))]
                for k in sorted(run.data.metrics)}
            tags = {k: v for k, v in sorted(run.data.tags.items())
                    if (k.startswith("saeuniv.") and k not in VOLATILE_TAGS)
                    or k == "mlflow.note.content"}
            local = Path(client.download_artifacts(rid, "", tmp + "/" + rid))
            arts = {str(p.relative_to(local)): file_value(p) for p in sorted(local.rglob("*"))
                    if p.is_file() and not p.name.endswith(CELLS)}
            metrics.update(cell_values(local))
            metrics = dict(sorted(metrics.items()))
            out[path(run)] = {"status": run.info.status, "params": dict(sorted(
                run.data.params.items())), "metrics": metrics, "tags": tags,
                "artifacts": arts}
    return out


def cell_values(local: Path) -> dict:
    """A run's per-layer-pair tables (``*_cells.json``, ``saeuniv.cells``) as the metric
    histories ``<name>/aI-bJ`` -> [[0, value]] that ``tracking.per_cell_metrics`` logs: the
    same numbers compare equal whichever way a version of the code logged them."""
    out = {}
    for path in sorted(local.glob(f"*{CELLS}")):
        table = json.loads(path.read_text())
        for row in table["data"]:
            row = dict(zip(table["columns"], row))
            for name, value in row.items():
                if name not in ("cell", "layer_a", "layer_b") and value is not None:  # text
                    out[f"{name}/{row['cell']}"] = [[0, _number(float(value))]]
    return out


def differences(a, b, where: str = "") -> list[str]:
    """Every place where two fingerprints differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in the reference" for k in a if k not in b]
        out += [f"{where}/{k}: only in the working tree" for k in b if k not in a]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], f"{where}/{k}")
        return out
    return [] if a == b else [f"{where}: {str(a)[:120]} != {str(b)[:120]}"]


def run_both(config: str, base: Path, srcs: dict[str, Path], runs: int) -> dict:
    """Run every side of ``srcs`` (side -> package folder), each on a CPU of its own, and
    fingerprint what they left; side -> fingerprint."""
    cpus = sorted(os.sched_getaffinity(0))
    parallel = len(cpus) >= len(srcs)

    def one(i_side):
        i, (side, src) = i_side
        return run_side(src, base / side, config, runs, cpus[i if parallel else 0])

    with ThreadPoolExecutor(len(srcs) if parallel else 1) as pool:
        seconds = list(pool.map(one, enumerate(srcs.items())))
    fps = {}
    for side, s in zip(srcs, seconds):  # one at a time: MLflow's tracking URI is global
        fps[side] = {"store": store_fingerprint(base / side / "store"),
                     "runs": runs_fingerprint(base / side)}
        (base / f"{side}.json").write_text(json.dumps(fps[side], indent=1))
        print(f"{config} {side}: {runs} runs in {s:.0f} s; {count(fps[side])}", flush=True)
    return fps


def report(diff: list[str], per_group: int = 5) -> None:
    """The number of differences per store kind and per run, then the first of each."""
    groups: dict[str, list[str]] = {}
    for line in diff:
        head = line.split(": ")[0].split("/")
        groups.setdefault("/".join(head[:3] if head[1] == "store" else head[:4]), []).append(line)
    for group, lines in groups.items():
        print(f"  {len(lines):6d}  {group}")
    for lines in groups.values():
        for line in lines[:per_group]:
            print("    " + line)


def count(fp: dict) -> str:
    store, runs = fp["store"], fp["runs"]
    n_files = sum(len(e["files"]) for e in store.values())
    n_values = sum(len(h) for r in runs.values() for h in r["metrics"].values())
    n_arts = sum(len(r["artifacts"]) for r in runs.values())
    return (f"{len(store)} store entries ({n_files} files), {len(runs)} runs, {n_values} "
            f"metric values, {n_arts} artefacts")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, help="git ref of the reference code, e.g. main~3")
    p.add_argument("--config", action="append", default=None,
                   help="config to run (repeatable; default: tiny and default)")
    p.add_argument("--runs", type=int, default=2, help="runs per side: cold, then warm")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the stores, databases and fingerprints in this folder")
    args = p.parse_args(argv)
    configs = args.config or ["tiny", "default"]
    base = args.keep or Path(tempfile.mkdtemp(prefix="same-results-"))
    base.mkdir(parents=True, exist_ok=True)
    tree = base / "ref-tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree),
                    args.ref], check=True)
    status = 0
    try:
        for config in configs:
            fps = run_both(config, base / config, {"ref": tree / "src", "new": REPO / "src"},
                           args.runs)
            diff = differences(fps["ref"], fps["new"])
            print(f"{config}: {'IDENTICAL' if not diff else f'{len(diff)} DIFFERENCES'} "
                  f"(reference {args.ref} vs working tree)")
            report(diff)
            status |= bool(diff)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       check=False)
    print(f"results in {base}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
