"""Fault injection for the crash tests: stop this process at a named point.

``SAEUNIV_FAULT=POINT:N[:ACTION][,POINT:N[:ACTION]...]`` acts the N-th time this
process passes ``POINT``. Points:

* ``shard``: a code shard index of an extraction pass is written (every layer of the pass);
* ``sae_step``: an SAE training step draws its batch;
* ``entry``: a store entry is complete in its temporary folder, just before the rename
  that makes it visible.

Actions: ``kill`` (SIGKILL to itself: nothing runs after it, the default), ``term``
(SIGTERM to itself), ``raise`` (a RuntimeError) and ``pause`` (print a line and sleep
until a signal comes, for a test that sends the signal from outside). Each action
first prints ``saeuniv fault: ACTION at POINT N (pid P)`` to stderr. Unset, a point
costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter

ENV = "SAEUNIV_FAULT"
_passed: Counter = Counter()


def point(name: str) -> None:
    """Count one pass through ``name``; act when ``$SAEUNIV_FAULT`` asks for this pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _passed[name] += 1
    for item in spec.split(","):
        parts = item.strip().split(":")
        if parts[0] != name or len(parts) < 2 or int(parts[1]) != _passed[name]:
            continue
        action = parts[2] if len(parts) > 2 else "kill"
        sys.stderr.write(f"saeuniv fault: {action} at {name} {_passed[name]} "
                         f"(pid {os.getpid()})\n")
        sys.stderr.flush()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "raise":
            raise RuntimeError(f"injected fault at {name} {_passed[name]}")
        elif action == "pause":
            while True:
                time.sleep(0.2)
        else:
            raise ValueError(f"{ENV}: unknown action {action!r} (kill, term, raise, pause)")
