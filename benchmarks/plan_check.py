"""How far the cost plan (``saeuniv plan``) is from the time a config really takes here.

    python benchmarks/plan_check.py CONFIG --store DIR          # plan, then a cold run
    python benchmarks/plan_check.py CONFIG --measured models=120,saes=1920,...

Calibrates this machine's rates afresh, prints the plan's CPU estimate of each stage, then
runs each stage as its own ``saeuniv <stage>`` process on ``--store`` (empty: a cold run, as
``stage_costs.py`` does) and prints estimate / measured per stage and in total. A config too
long to run again can be checked against stage times measured before (``--measured``,
seconds per stage); the table then says so. Both sides run on this machine, in one process
tree; the load average is printed at the start and the end.
"""

import argparse
import os
import tempfile
from pathlib import Path

from stage_costs import OFFLINE, timed
from timing import end, start

from saeuniv import costs, rates, stages
from saeuniv.costreport import configs_of, duration


def estimate(config: str, cache: Path) -> dict[str, float]:
    """Stage -> the plan's CPU seconds, at rates measured now into ``cache``."""
    cpu = rates.CPURates(cache, refresh=True)
    out = {name: c.seconds(cpu) for name, c in costs.plan(configs_of(config, {})).items()}
    print(f"plan_check: CPU {cpu.note()}", flush=True)
    return out


def measured_now(config: str, store: Path) -> dict[str, float]:
    store.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE,
           "MLFLOW_TRACKING_URI": f"sqlite:///{store.resolve().parent / 'plan_check.db'}"}
    out = {}
    for stage in stages.NAMES:
        out[stage] = timed([stage, "--config", config, "--store", str(store)], env)[0]
        print(f"plan_check: {stage} done, {out[stage]:.0f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--store", help="store for the cold run (empty folder)")
    parser.add_argument("--measured", help="stage=seconds,... measured before, instead of a run")
    args = parser.parse_args()
    if not (args.store or args.measured):
        parser.error("give --store (a cold run now) or --measured (stage times from before)")
    start("the plan's CPU estimate per stage (rates calibrated now) against the stage's wall "
          "time" + (" measured before (--measured)" if args.measured else ", cold, now"))
    with tempfile.TemporaryDirectory() as tmp:
        est = estimate(args.config, Path(tmp) / "calibration.json")
    if args.measured:
        real = {k: float(v) for k, v in (kv.split("=") for kv in args.measured.split(","))}
    else:
        real = measured_now(args.config, Path(args.store))
    print(f"\n{args.config} (total: the stages measured)")
    print(f"{'stage':<14}{'plan':>11}{'measured':>11}{'plan/measured':>15}")
    for stage in [*real, "total"]:
        e = sum(est[s] for s in real) if stage == "total" else est[stage]
        m = sum(real.values()) if stage == "total" else real[stage]
        print(f"{stage:<14}{duration(e):>11}{duration(m):>11}{e / m:>15.2f}")
    end()


if __name__ == "__main__":
    main()
