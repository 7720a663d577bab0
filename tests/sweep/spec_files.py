"""What the sweep tests share: a small sweep spec on the tiny config, as a file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# A sweep on the tiny config: ranges where every trial keeps enough pairs to be scored.
TINY_SPEC = {
    "study": "tiny-thresholds",
    "base": {"config": "tiny"},
    "n_trials": 3,
    "sampler": {"name": "tpe", "seed": 0},
    "objectives": [{"metric": "rsa", "field": "z", "layers": "middle"}],
    "params": {"match.threshold": {"type": "float", "low": 0.0, "high": 0.1},
               "match.policy": {"type": "categorical",
                                "choices": ["one_to_one", "max"]}},
}


def write_spec(folder: Path, name: str = "spec", **changes) -> Path:
    data = json.loads(json.dumps(TINY_SPEC))
    data.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
