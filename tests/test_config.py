"""Config loading, validation and packaging metadata."""

import re
from pathlib import Path

import pytest
import tomllib
import yaml

from saeuniv.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_default_loads_and_hash_is_stable():
    cfg = load_config("default")
    assert cfg.model_a.name == "tiny-s" and cfg.model_b.name == "tiny-l"
    assert cfg.hash() == load_config("default").hash()
    assert cfg.hash() != cfg.replace(**{"match.threshold": 0.2}).hash()


@pytest.mark.parametrize("overrides, message", [
    ({"match.policy": "best"}, r"match.policy 'best' is unknown.*one_to_one"),
    ({"match.threshold": 1.5}, r"match.threshold must be in \[-1, 1\], got 1.5"),
    ({"layers_a": [0, -1]}, r"layers_a has a negative layer index"),
    ({"layers_b": "middle"}, r"layers_b must be 'all', 'stride:N' or a non-empty list"),
    ({"similarity.metrics": ["svcca", "cca"]}, r"unknown name\(s\) \['cca'\]"),
    ({"similarity.n_perm": 0}, r"similarity.n_perm must be >= 1"),
    ({"similarity.n_perm": 18}, r"similarity.n_perm=18 is too few null draws to calibrate at "
                                r"similarity.alpha=0.05.*use n_perm >= 19"),
    ({"similarity.n_perm": 98, "similarity.alpha": 0.01}, r"use n_perm >= 99"),
    ({"similarity.alpha": 1.0}, r"similarity.alpha must be in \(0, 1\), got 1.0"),
    ({"similarity.band": [0.7, 0.3]}, r"similarity.band must be \[lo, hi\] with 0 <= lo < hi"),
    ({"similarity.band": [0.3]}, r"similarity.band must be \[lo, hi\], two relative depths"),
    ({"similarity.n_halves": 3}, r"similarity.n_halves must be 0 \(no interval\) or >= 10"),
    ({"model_b.init": "untrained"}, r"model_b.init 'untrained' is unknown.*'random'"),
    ({"extract.n_tokens": 10}, r"extract.n_tokens must be >= 100"),
    ({"model_b.name": "gpt-9"}, r"'gpt-9' is not a member of the built-in family"),
    ({"sae.architecture": "gated"}, r"sae.architecture 'gated' is unknown"),
    ({"match.tresh": 0.2}, r"unknown config key 'match.tresh'"),
    ({"extract.n_tokens": "many"}, r"extract.n_tokens must be int"),
    ({"match.top_k": True}, r"match.top_k must be int, got True"),
    ({"match.threshold": float("nan")}, r"match.threshold must be a finite number, got nan"),
    ({"extract.batch_size": 0}, r"extract.batch_size must be >= 1, got 0"),
    ({"execution.device": "gpu"}, r"execution.device 'gpu' is unknown.*'cuda'"),
    ({"family.lr": -0.1}, r"family.lr must be > 0, got -0.1"),
    ({"sae.topk": 0}, r"sae.topk must be >= 1, got 0"),
    ({"extract.context": 256}, r"extract.context=256 exceeds family.context=128.*lower "
                               r"extract.context to at most 128"),
    ({"family.members": [{"name": "m", "n_layers": 1, "d_model": 16, "d_mlp": 8,
                          "d_head": 0}]}, r"family member 'm' needs .*d_head=0"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("match: {policy: max, thresh: 0.3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'match.thresh'"):
        load_config(path)


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "c.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"the YAML tag 'tag:yaml.org,2002:python/object/apply:"
                       r"os.system' \(line 1, column 7\) is not allowed.*remove the tag"):
        load_config(path)
    assert not marker.exists()
    path.write_text("match: {policy: max\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML: .*line \d+.*fix the syntax"):
        load_config(path)


def test_unknown_config_name():
    with pytest.raises(ConfigError, match=r"neither a file nor a built-in config.*default"):
        load_config("no-such-config")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("tiny", {"match.threshold": 0.3})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg


def _requirement_names_and_specs(reqs):
    return {re.split(r"[<>=!\[ ]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in reqs}


def test_conda_yaml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_reqs = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pip_reqs = [r for r in pip_reqs if not r.startswith("-e")]
    assert _requirement_names_and_specs(pip_reqs) == \
        _requirement_names_and_specs(project["dependencies"])


def test_mlproject_declares_entry_points_with_typed_params():
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    assert mlproject["conda_env"] == "conda.yaml"
    points = mlproject["entry_points"]
    for name in ("main", "extract", "saes", "match", "similarity"):
        params = points[name]["parameters"]
        assert params["config"] == {"type": "string", "default": "default"}
        for p in ("policy", "threshold", "n_perm", "seed", "n_tokens"):
            # the default "config" keeps the config file's value
            assert params[p] == {"type": "string", "default": "config"}
        for p in params:
            assert "{" + p + "}" in points[name]["command"]


def test_cli_shortcut_default_keeps_the_config_value():
    from saeuniv.cli import _config, build_parser

    args = build_parser().parse_args(["run", "--config", "tiny", "--threshold", "config",
                                      "--n-perm", "77"])
    cfg = _config(args)
    assert cfg.match.threshold == load_config("tiny").match.threshold
    assert cfg.similarity.n_perm == 77


def test_mlproject_compare_entry_point_takes_run_ids():
    from saeuniv.compare import parse_run_ids

    point = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["compare"]
    assert point["parameters"] == {"runs": {"type": "string"}}
    assert point["command"].endswith("compare {runs}")
    # mlflow run quotes the value: one argument holding every id
    assert parse_run_ids(["a1 b2,c3"]) == ["a1", "b2", "c3"]


def test_caveats_are_sentences():
    cfg = load_config("default", {"caveats": ["Quantized.", "Instruct."]})
    assert cfg.caveats == ("Quantized.", "Instruct.")
    assert load_config("default", {"caveats": "One."}).caveats == ("One.",)
    for bad in ([3], [""], [None]):
        with pytest.raises(ConfigError, match="caveats must be a list of sentences"):
            load_config("default", {"caveats": bad})
