"""Sweep specs: every problem refused before any work, in one line from the command;
the shipped specs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from saeuniv import cli
from saeuniv.sweep import SpecError, load_spec

from .spec_files import write_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("change, message", [
    ({"params": {"match.thresh": {"type": "float", "low": 0, "high": 1}}},
     r"unknown config path 'match.thresh'; known keys in match: \[.*'threshold'"),
    ({"params": {"foo.bar": {"type": "bool"}}}, r"unknown config path 'foo.bar'"),
    ({"params": {"match.threshold": {"type": "float", "low": 0.5, "high": 0.1}}},
     r"params\['match.threshold'\]: low must be < high, got low=0.5, high=0.1"),
    ({"params": {"match.top_k": {"type": "int", "low": 3, "high": 3}}},
     r"params\['match.top_k'\]: low must be < high"),
    ({"params": {"match.threshold": {"type": "float", "low": 0.0, "high": 0.5,
                                     "log": True}}},
     r"params\['match.threshold'\]: log: true needs low > 0, got low=0.0"),
    ({"params": {"match.threshold": {"type": "float", "low": 0.0, "high": 2.0}}},
     r"2.0 is out of range for the base config: match.threshold must be in \[-1, 1\]"),
    ({"params": {"match.top_k": {"type": "float", "low": 1, "high": 5}}},
     r"type float cannot set match.top_k, which is int"),
    ({"params": {"match.policy": {"type": "categorical", "choices": ["max", "best"]}}},
     r"'best' is out of range.*match.policy 'best' is unknown"),
    ({"params": {"match.n_tokens": {"type": "int", "low": 200, "high": 5000}}},
     r"match.n_tokens=5000 exceeds extract.n_tokens=1500; raise extract.n_tokens"),
    ({"params": {"extract.n_tokens": {"type": "int", "low": 200, "high": 1000}}},
     r"params\['extract.n_tokens'\]: sweeps vary analysis settings only"),
    ({"params": {"model_a.name": {"type": "categorical", "choices": ["xs", "s"]}}},
     r"params\['model_a.name'\]: sweeps vary analysis settings only"),
    ({"params": {"sae.expansion": {"type": "int", "low": 2, "high": 8}}},
     r"params\['sae.expansion'\]: sweeps vary analysis settings only"),
    ({"params": {"match.threshold": {"type": "uniform", "low": 0, "high": 1}}},
     r"unknown type 'uniform'"),
    ({"params": {"match.threshold": {"type": "float", "low": 0, "hi": 1}}},
     r"unknown key\(s\) \['hi'\]"),
    ({"objectives": [{"metric": "cca", "field": "z"}]},
     r"unknown objective metric 'cca'"),
    ({"objectives": [{"metric": "rsa", "field": "p"}]}, r"unknown field 'p'"),
    ({"objectives": [{"metric": "rsa", "layers": "deep"}]}, r"unknown layers 'deep'"),
    ({"objectives": [{"metric": "rsa", "direction": "up"}]}, r"unknown direction 'up'"),
    ({"objectives": [{"metric": "pwcca"}]},
     r"metric 'pwcca' is not computed by the base config \(similarity.metrics"),
    ({"objectives": [{"metric": "rsa"}, {"metric": "rsa"}]}, r"names must be unique"),
    ({"sampler": {"name": "cmaes2", "seed": 0}}, r"unknown sampler 'cmaes2'"),
    ({"sampler": {"name": "tpe", "seed": 0, "options": {"n_startup": 3}}},
     r"sampler.options: TPESampler refuses them"),
    ({"n_trials": 0}, r"n_trials: must be >= 1"),
    ({"n_trial": 3}, r"unknown key\(s\) \['n_trial'\]"),
    ({"base": {"config": "tiny", "set": {"match.tresh": 1}}},
     r"unknown config key 'match.tresh'"),
])
def test_bad_specs_are_refused_with_the_problem_named(tmp_path, change, message):
    path = write_spec(tmp_path, "bad", **change)
    with pytest.raises(SpecError, match=message) as err:
        load_spec(path)
    assert str(path) in str(err.value)


def test_bad_spec_exits_2_with_one_line(tmp_path, capsys):
    path = write_spec(tmp_path, "bad", params={"extract.context": {"type": "bool"}})
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweeps vary analysis settings only" in err
    assert cli.main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read sweep spec" in capsys.readouterr().err


def test_shipped_specs_load_and_validate():
    specs = {p.stem: load_spec(p) for p in sorted((ROOT / "sweeps").glob("*.yaml"))}
    assert {"thresholds", "corpus_size", "pareto"} <= set(specs)
    t = specs["thresholds"]
    assert {p.path for p in t.params} == {"match.policy", "match.threshold",
                                          "match.junk_filter", "match.shared_token",
                                          "match.top_k"}
    assert (t.sampler.name, t.sampler.seed, t.n_trials) == ("tpe", 0, 30)
    assert [(o.metric, o.field, o.layers) for o in t.objectives] == \
        [("rsa", "z", "middle")]
    c = specs["corpus_size"]
    (size,) = c.params
    assert (size.path, size.low, size.high, size.log) == \
        ("match.n_tokens", 2000, 24000, True)
    assert c.config().extract.n_tokens == 24000
    p = specs["pareto"]
    assert p.sampler.name == "nsga2" and p.n_trials == 40
    assert [(o.metric, o.direction) for o in p.objectives] == [("rsa", "maximize"),
                                                               ("n_pairs", "maximize")]
    m = specs["matchers"]
    assert [(o.metric, o.field) for o in m.objectives] == [("rsa", "calibrated")]
    for param in m.params:  # every choice makes a valid config
        for value in param.choices:
            assert getattr(m.config().replace(**{param.path: value}).match,
                           param.path.split(".")[1]) == value
