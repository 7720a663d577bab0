"""``saeuniv plan CONFIG``: the cost plan of a config (or a ladder), printed before anything
runs: per stage, tasks, tokens, bytes on disk and in memory, FLOPs, and the estimated time on
this machine's CPU and on a named GPU class."""

from __future__ import annotations

import sys

from . import costs, rates
from .config import ConfigError, load_config
from .config.loading import read_config
from .ladder.spec import load_ladder
from .shapes import ShapeError


def add_plan_parser(sub, store_option) -> None:
    """The ``plan`` subcommand of the ``saeuniv`` parser (``store_option`` adds --store)."""
    plan = sub.add_parser(
        "plan", help="print what a config will cost, per stage, before running anything",
        description="Print, for each stage of CONFIG (a config or a ladder file), its tasks, "
        "tokens, bytes on disk and in memory, FLOPs, and the estimated time on this "
        "machine's CPU and on a GPU class, from per-operation rates measured by a short "
        "calibration (cached in the store folder). Nothing is downloaded or built.")
    plan.add_argument("config", help="config or ladder file, or a built-in name")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set pairs=all")
    plan.add_argument("--gpu", default="H100", choices=sorted(rates.GPU_CLASSES),
                      help="GPU class of the GPU column (default: %(default)s)")
    plan.add_argument("--calibrate", action="store_true",
                      help="measure this machine's rates again instead of using the cache")
    store_option(plan)


HEAD = ("stage", "tasks", "tokens", "disk", "memory", "FLOPs", "CPU", "GPU")


def configs_of(path: str, overrides: dict) -> list:
    """The configs a file describes: itself, or each pair of a ladder."""
    data = read_config(path)
    if isinstance(data, dict) and "ladder" in data:
        ladder = load_ladder(path, overrides)
        return [ladder.config(i, j) for i, j in ladder.pairs()]
    return [load_config(path, overrides)]


def duration(seconds: float) -> str:
    """``seconds`` as s, min or h, three significant digits."""
    if seconds < 90:
        return f"{seconds:.3g} s"
    if seconds < 5400:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def rows(plan: dict, cpu, gpu) -> list[tuple[str, ...]]:
    """One row of text per stage with work, then the total."""
    total = costs.Cost()
    out = []
    for stage, c in plan.items():
        total.add(c)
        if c.tasks or c.work:
            out.append(_row(stage, c, cpu, gpu))
    out.append(_row("total", total, cpu, gpu))
    return out


def _row(name: str, c, cpu, gpu) -> tuple[str, ...]:
    return (name, str(c.tasks), costs.human(c.tokens), costs.human(c.disk, "B"),
            costs.human(c.memory, "B"), costs.human(c.flops), duration(c.seconds(cpu)),
            duration(c.seconds(gpu)))


def table(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [HEAD, *lines]) for i in range(len(HEAD))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [HEAD, *lines])


def render(configs: list, cpu, gpu) -> str:
    """The plan as text: what is compared, the table, and how it was estimated."""
    plan = costs.plan(configs)
    head = []
    for cfg in configs:
        n_pairs, n_saes = costs.grid_counts(cfg)
        head.append(f"{cfg.name}: {cfg.model_a.name} vs {cfg.model_b.name}, {n_pairs} layer "
                    f"pair(s), {n_saes} SAE(s), {cfg.extract.n_tokens:,} analysis tokens")
    body = table(rows(plan, cpu, gpu))  # before the notes: it may measure rates
    notes = [f"CPU: this machine ({rates.machine()}), {cpu.note()}",
             f"GPU: {gpu.how}", "assumed: " + "; ".join(costs.ASSUMPTIONS)]
    return "\n".join([*head, "", body, "", *notes])


def plan_main(path: str, overrides: dict, gpu_class: str, calibrate: bool, cache) -> int:
    """Print the plan of config (or ladder) ``path``; 2 when it or a shape cannot be read.

    ``cache`` is the calibration's JSON file; ``calibrate`` measures the rates again."""
    try:
        configs = configs_of(path, overrides)
        costs.plan(configs)  # every shape known before the calibration's seconds
        cpu = rates.CPURates(cache, refresh=calibrate)
        gpu = rates.GPURates(gpu_class, cpu)
    except (ConfigError, ShapeError, ValueError) as err:
        print(f"saeuniv: error: {err}", file=sys.stderr)
        return 2
    print(render(configs, cpu, gpu))
    return 0
