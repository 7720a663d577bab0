"""What every benchmark times with: thread limits, warm median-of-N timing, and the machine.

Both sides of a ratio run inside the same ``threads(n)`` block, each after one untimed
warm-up call, and each is the median of several timed calls. A baseline timed on part of
its work and scaled up (a naive loop over permutations, a dense method over some columns)
is scaled by at most ``MAX_EXTRAPOLATION``; ``scale_up`` refuses more. The machine is shared,
so each benchmark prints the load average when it starts and when it ends.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    from threadpoolctl import threadpool_limits
except ImportError as e:  # without it BLAS threads cannot be set, and ratios mean less
    raise ImportError("the benchmarks need threadpoolctl to set BLAS threads; it comes with "
                      "the test extra: pip install -e '.[test]'") from e

MAX_EXTRAPOLATION = 10.0


@dataclass(frozen=True)
class Timed:
    """The median of ``times`` (seconds) and what the calls returned: the last call's value
    (``median_time``) or the list of every timed call's (``median_per_call``)."""

    seconds: float
    times: tuple[float, ...]
    out: object


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages, as /proc/loadavg gives them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    """CPU model, usable cores, memory, Python and numpy versions, in one line."""
    import numpy as np

    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{cpu}; {len(os.sched_getaffinity(0))} usable cores of {os.cpu_count()}; "
            f"{mem:.1f} GiB RAM; python {platform.python_version()}, numpy {np.__version__}")


def start(mode: str) -> None:
    """Print the machine, the mode and the load average before any timing."""
    print(f"machine: {machine()}")
    print(f"mode: {mode}; load average (1, 5, 15 min) at start: {loadavg()}", flush=True)


def end() -> None:
    print(f"\nload average (1, 5, 15 min) at end: {loadavg()}", flush=True)


def method(n_threads: int, repeats: int, extra: str = "") -> str:
    """The one-line description of how the figures below it were timed."""
    line = (f"method: {n_threads} thread(s) for BLAS/OpenMP (threadpoolctl) and torch, the same "
            f"on both sides of every ratio; one untimed warm-up call of each side; median of "
            f"{repeats} timed repeats")
    return f"{line}; {extra}" if extra else line


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """BLAS and OpenMP pools (threadpoolctl) and torch's intra-op pool at ``n`` threads."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    with threadpool_limits(n):
        if torch:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch:
                torch.set_num_threads(before)


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: bool = True) -> Timed:
    """Call ``fn`` once untimed (if ``warmup``), then ``repeats`` times; the median time."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return Timed(statistics.median(times), tuple(times), out)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3) -> dict[str, Timed]:
    """Each of ``fns`` once untimed, then ``repeats`` rounds calling each in turn; the median
    per name. Interleaving puts every side under the same load when another process's use
    of the CPU drifts, which timing one side after the other does not."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: Timed(statistics.median(ts), tuple(ts), outs[name])
            for name, ts in times.items()}


def median_per_call(fn: Callable[[object], object], items: list) -> Timed:
    """Warm up with ``fn(items[0])``, then time ``fn(item)`` for every item; the median call.

    For a naive loop of equal calls (one per permutation or draw) each timed call is a
    repeat, so the median is robust to one call slowed by another process."""
    if not items:
        raise ValueError("median_per_call needs at least one item")
    fn(items[0])
    times, outs = [], []
    for item in items:
        t = time.perf_counter()
        outs.append(fn(item))
        times.append(time.perf_counter() - t)
    return Timed(statistics.median(times), tuple(times), outs)


def scale_up(seconds: float, done: float, total: float) -> float:
    """``seconds`` for ``done`` units of work scaled linearly to ``total`` units.

    Refuses a factor above MAX_EXTRAPOLATION: time more of the baseline instead."""
    factor = total / done
    if factor > MAX_EXTRAPOLATION + 1e-9:
        raise ValueError(f"extrapolating {done:g} -> {total:g} is {factor:.1f}x, over the "
                         f"{MAX_EXTRAPOLATION:g}x allowed; time more of the baseline")
    return seconds * factor


def thread_list(text: str) -> list[int]:
    """'1,2' -> [1, 2]: the thread counts a benchmark repeats its figures at."""
    counts = [int(x) for x in text.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"--threads wants positive counts like 1,2; got {text!r}")
    return counts


def add_arguments(parser, repeats: int = 3) -> None:
    """The --threads and --repeats options every benchmark takes."""
    parser.add_argument("--threads", type=thread_list, default=[1, 2],
                        help="thread counts to measure at, comma-separated (default 1,2)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed repeats per figure, median reported (default {repeats})")
