"""Time and peak memory of each stage of a config, cold and then warm, as a user runs them.

    python benchmarks/stage_costs.py CONFIG --store DIR [--tracking-uri URI]

Each stage runs as its own ``saeuniv <stage>`` process, in the pipeline's order, under
``/usr/bin/time`` (wall seconds and the process's peak resident memory); a stage computes
what it needs that is not in the store yet, so with an empty ``--store`` the first pass
is the cold run. Then ``saeuniv run`` runs the whole pipeline once more on the same store:
the warm run, which finds every artefact and reuses every finished stage run. Prints one
table; exits non-zero when a stage fails.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import end, start

from saeuniv import stages

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one ``saeuniv`` command; raises when it fails."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        cmd = ["/usr/bin/time", "-f", "%e %M", "-o", out.name,
               sys.executable, "-m", "saeuniv.cli", *command]
        if subprocess.run(cmd, env=env).returncode != 0:
            raise SystemExit(f"stage_costs: `saeuniv {' '.join(command)}` failed")
        wall, kb = out.read().split()[-2:]
    return float(wall), int(kb) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--store", required=True, help="artefact store (empty: a cold run)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: sqlite beside the store)")
    args = parser.parse_args()
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE, "MLFLOW_TRACKING_URI":
           args.tracking_uri or f"sqlite:///{store.resolve().parent / 'mlflow.db'}"}
    common = ["--config", args.config, "--store", str(store)]
    had_entries = any(store.iterdir())
    start("each stage once as its own process, then `saeuniv run` once (one measurement "
          "each: a cold run happens once); wall time and peak RSS from /usr/bin/time")
    rows = []
    t0 = time.time()
    for stage in stages.NAMES:
        rows.append((stage, *timed([stage, *common], env)))
        print(f"stage_costs: {stage} done, {rows[-1][1]:.0f} s", flush=True)
    rows.append(("all stages", time.time() - t0, max(r[2] for r in rows)))
    rows.append(("warm `saeuniv run`", *timed(["run", *common], env)))
    state = "the store had entries before" if had_entries else "cold (empty store)"
    print(f"\n{args.config}: {state}")
    print(f"{'stage':<22}{'seconds':>10}{'peak RSS GB':>14}")
    for name, wall, rss in rows:
        print(f"{name:<22}{wall:>10.1f}{rss:>14.2f}")
    end()


if __name__ == "__main__":
    main()
