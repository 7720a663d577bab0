"""Bad input at every entry point: refused in seconds, in one line naming the value and the
fix, with exit status 2, nothing trained, no partial artefact, and no MLflow run left RUNNING.

One table drives the test. Each row is a command of ``saeuniv`` (run in this process through
``saeuniv.cli.main``) or of an MLproject entry point (the entry point's own command from
``MLproject``, run as ``python -m saeuniv.cli ...`` in a subprocess), the patterns its
error must match, and how many MLflow runs it opens: a config error opens none; an error found
by ``Pipeline.validate`` opens the stage's (or main) run, which must end FAILED with the error
in its ``saeuniv.error`` tag.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

import saeuniv
from saeuniv import cli
from saeuniv.store import Store

from helpers import private_runs

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(saeuniv.__file__).resolve().parents[1]  # the saeuniv under test, for subprocesses
# store kinds that only training or analysis makes: bad input must never produce one
HEAVY = ("model", "sae", "preflight", "codes", "matches", "scores", "labels", "subspaces")
FAST_S = 10  # an in-process row must fail within this many seconds (2 shared cores)
FAST_SUBPROCESS_S = 60  # a new interpreter importing torch and mlflow


def _sae_folder(root: Path, name: str, d_in: int, hooks: dict[int, str] | None = None,
                weights: bool = True) -> str:
    """sae-lens folders ``root/name_L`` for layers 0..2 (untrained), path with {layer}."""
    from sae_lens import StandardSAE, StandardSAEConfig

    for layer in range(3):
        dest = root / f"{name}_{layer}"
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=4 * d_in))
        sae.cfg.metadata.hook_name = (hooks or {}).get(layer, f"blocks.{layer}.hook_resid_post")
        sae.save_model(str(dest))
        if not weights:
            (dest / "sae_weights.safetensors").unlink()
    return str(root / f"{name}_{{layer}}")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, corpus_dir):
    """A private MLflow database and store, and the bad files the rows point at."""
    root = tmp_path_factory.mktemp("bad")
    with private_runs(root, chdir=True):
        from saeuniv.tracking import setup_tracking

        setup_tracking()  # the database's tables, once, outside the timed rows
        (root / "binary.txt").write_bytes(b"a text with a NUL \x00 byte " * 5)
        (root / "latin1.txt").write_bytes("Caf\u00e9 au lait. ".encode("latin-1") * 20)
        (root / "empty").mkdir()
        (root / "one.txt").write_text("only one document here")
        (root / "evil.yaml").write_text(
            f"name: !!python/object/apply:os.system ['touch {root / 'pwned'}']\n")
        (root / "list.yaml").write_text("- name: tiny\n")
        (root / "no-corpus.yaml").write_text(yaml.safe_dump(
            {"name": "no-corpus", "corpus": {"source": str(root / "no-such-corpus")}}))
        (root / "file").write_text("a file, not a folder")
        base = {"config": "tiny", "set": {"corpus.source": str(corpus_dir)}}
        spec = {"study": "s", "base": base, "n_trials": 2,
                "objectives": [{"metric": "rsa", "layers": "all"}],
                "params": {"match.threshold": {"type": "float", "low": 0.0, "high": 0.5}}}
        specs = {
            "spec_range": {**spec, "params": {"match.threshold": {"type": "float", "low": 0.5,
                                                                  "high": 0.1}}},
            "spec_section": {**spec, "params": {"sae.expansion": {"type": "int", "low": 2,
                                                                  "high": 8}}},
            "spec_metric": {**spec, "objectives": [{"metric": "bleu"}]},
            "spec_ok": spec,
        }
        for name, data in specs.items():
            (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
        (root / "spec_tag.yaml").write_text("study: !!python/name:os.system\n")
        saes = root / "saes"
        saes.mkdir()
        paths = {"sae_width": _sae_folder(saes, "width", 99),
                 "sae_hook": _sae_folder(saes, "hook", 32, {1: "blocks.0.hook_resid_post"}),
                 "sae_pickle": _sae_folder(saes, "noweights", 16, weights=False)}
        yield {"root": root, "corpus": str(corpus_dir), **paths}


def tiny(c, *extra):
    """``--config tiny`` on the synthetic corpus, plus ``extra``."""
    return ["--config", "tiny", "--set", f"corpus.source={c['corpus']}", *extra]


def entry(point: str, **params) -> list[str]:
    """The MLproject entry point's own command, its parameters filled like ``mlflow run``."""
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][point]
    values = {k: v.get("default") for k, v in spec["parameters"].items()}
    values.update(params)
    command = spec["command"].format(**{k: shlex.quote(str(v)) for k, v in values.items()})
    return [sys.executable if word == "python" else word for word in shlex.split(command)]


# (id, argv from the context, patterns the error must match, MLflow runs it opens)
ROWS = [
    # -- parameters and config values: refused before any run ------------------------------
    ("threshold", lambda c: ["run", *tiny(c), "--threshold", "1.5"],
     [r"match.threshold must be in \[-1, 1\], got 1.5"], 0),
    ("n_perm_zero", lambda c: ["similarity", *tiny(c), "--n-perm", "0"],
     [r"similarity.n_perm must be >= 1, got 0"], 0),
    ("policy", lambda c: ["match", *tiny(c), "--policy", "best"],
     [r"match.policy 'best' is unknown; choose one of .*one_to_one"], 0),
    ("metric", lambda c: ["run", *tiny(c, "--set", "similarity.metrics=[svcca, cca]")],
     [r"unknown name\(s\) \['cca'\]; choose from .*'rsa'"], 0),
    ("unknown_key", lambda c: ["extract", *tiny(c, "--set", "match.tresh=0.2")],
     [r"unknown config key 'match.tresh'; known keys here: .*'threshold'"], 0),
    ("bad_type", lambda c: ["run", *tiny(c, "--set", "extract.n_tokens=many")],
     [r"extract.n_tokens must be int, got 'many'"], 0),
    ("bool_as_int", lambda c: ["run", *tiny(c, "--set", "match.top_k=true")],
     [r"match.top_k must be int, got True"], 0),
    ("nan_float", lambda c: ["models", *tiny(c, "--set", "family.lr=.nan")],
     [r"family.lr must be a finite number, got nan"], 0),
    ("negative_batch", lambda c: ["extract", *tiny(c, "--set", "extract.batch_size=-4")],
     [r"extract.batch_size must be >= 1, got -4"], 0),
    ("context", lambda c: ["run", *tiny(c, "--set", "extract.context=64")],
     [r"extract.context=64 exceeds family.context=32.*lower extract.context to at most 32"], 0),
    ("stride", lambda c: ["run", *tiny(c, "--set", "layers_a=stride:0")],
     [r"layers_a='stride:0': the stride must be a positive integer, e.g. 'stride:2'"], 0),
    ("pairs", lambda c: ["run", *tiny(c, "--set", "pairs=diagonal")],
     [r"pairs 'diagonal' is unknown; choose one of \('all', 'depth'\)"], 0),
    ("match_n_tokens", lambda c: ["match", *tiny(c, "--set", "match.n_tokens=5000")],
     [r"match.n_tokens=5000 exceeds extract.n_tokens=1500; raise extract.n_tokens"], 0),
    ("unknown_model", lambda c: ["run", *tiny(c, "--set", "model_b.name=gpt-9")],
     [r"model_b.name 'gpt-9' is not a member of the built-in family; choose one of "
      r"\['xs', 's'\]"], 0),
    ("model_source", lambda c: ["run", *tiny(c, "--set", "model_a.source=onnx")],
     [r"model_a.source 'onnx' is unknown; choose one of \('family'"], 0),
    ("dtype", lambda c: ["run", *tiny(c, "--set", "model_a.dtype=int8")],
     [r"model_a.dtype 'int8' is unknown; choose one of \('float32'"], 0),
    ("set_syntax", lambda c: ["run", *tiny(c, "--set", "match.threshold")],
     [r"--set expects key.path=value, got 'match.threshold'"], 0),
    ("set_yaml", lambda c: ["run", *tiny(c, "--set", "layers_a=[0,")],
     [r"--set 'layers_a=\[0,' is not valid YAML: .*\(line 1, column 4\); fix the syntax"], 0),
    ("set_python_tag", lambda c: ["run", *tiny(c, "--set",
                                              "name=!!python/object/apply:os.getpid []")],
     [r"the YAML tag 'tag:yaml.org,2002:python/object/apply:os.getpid' \(line 1, column 1\) "
      r"is not allowed.*remove the tag"], 0),
    ("config_python_tag", lambda c: ["run", "--config", str(c["root"] / "evil.yaml")],
     [r"evil.yaml: the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' "
      r"\(line 1, column 7\) is not allowed: .*safe YAML loader"], 0),
    ("config_missing", lambda c: ["run", "--config", "no-such-config"],
     [r"config 'no-such-config' is neither a file nor a built-in config; built-ins: "
      r"\['default', 'tiny'\]"], 0),
    ("config_not_mapping", lambda c: ["saes", "--config", str(c["root"] / "list.yaml")],
     [r"config must be a mapping, got list"], 0),
    ("concepts_missing", lambda c: ["subspaces", *tiny(c, "--set",
                                                    "subspaces.concepts=no-such-set")],
     [r"subspaces.concepts='no-such-set' names no concept-set file .*'reference'"], 0),
    ("argparse_int", lambda c: ["run", *tiny(c), "--n-tokens", "abc"],
     [r"argument --n-tokens: invalid int value: 'abc'"], 0),
    ("store_not_dir", lambda c: ["run", *tiny(c), "--store", str(c["root"] / "file" / "s")],
     [r"store folder .*file/s is not writable .*Not a directory.*give a writable folder "
      r"\(--store DIR or SAEUNIV_HOME\)"], 0),
    # -- found by Pipeline.validate inside the stage's run: FAILED, error tagged ------------
    ("corpus_missing", lambda c: ["run", *tiny(c, "--set",
                                              f"corpus.source={c['root'] / 'nope'}")],
     [r"corpus source '.*nope' is not a file, a folder, 'hf:NAME' or a built-in"], 1),
    ("corpus_empty", lambda c: ["models", *tiny(c, "--set",
                                                f"corpus.source={c['root'] / 'empty'}")],
     [r"empty holds no .txt or .jsonl files; give a UTF-8 .txt file"], 1),
    ("corpus_binary", lambda c: ["run", *tiny(c, "--set",
                                             f"corpus.source={c['root'] / 'binary.txt'}")],
     [r"binary.txt is binary, not text \(NUL byte at offset 18\); give UTF-8 .txt"], 1),
    ("corpus_encoding", lambda c: ["extract", *tiny(c, "--set",
                                                   f"corpus.source={c['root'] / 'latin1.txt'}")],
     [r"latin1.txt is not valid UTF-8 \(byte 0xe9 at offset 3: .*re-encode it as UTF-8"], 1),
    ("corpus_one_doc", lambda c: ["run", *tiny(c, "--set",
                                              f"corpus.source={c['root'] / 'one.txt'}")],
     [r"has 1 non-empty document\(s\); at least 2 are needed .*give more documents"], 1),
    ("token_budget", lambda c: ["extract", *tiny(c), "--n-tokens", "100000"],
     [r"the analysis split has only \d+ tokens but extract.n_tokens=100000; lower "
      r"extract.n_tokens"], 1),
    ("layer_range", lambda c: ["match", *tiny(c, "--set", "layers_b=[0, 7]")],
     [r"layers_b: layer\(s\) \[7\] are out of range for 's', which has 3 layers "
      r"\(valid: 0..2\)"], 1),
    ("sae_width", lambda c: ["run", *tiny(c, "--set",
                                         f"sae_a={{source: folder, path: '{c['sae_width']}'}}")],
     [r"SAE d_in=99 but 'xs' has d_model=16; use an SAE trained on this model"], 1),
    ("sae_hook", lambda c: ["saes", *tiny(c, "--set",
                                          f"sae_b={{source: folder, path: '{c['sae_hook']}'}}")],
     [r"SAE reads 'blocks.0.hook_resid_post' but layer 1 is 'blocks.1.hook_resid_post'; "
      r"pick the SAE of that layer"], 1),
    ("sae_no_safetensors", lambda c: ["run", *tiny(
        c, "--set", f"sae_a={{source: folder, path: '{c['sae_pickle']}'}}")],
     [r"noweights_0/sae_weights.safetensors does not exist; SAE weights are read from "
      r"safetensors only"], 1),
    ("sae_release", lambda c: ["run", *tiny(
        c, "--set", "sae_a={source: release, release: no-such-release, id: 'l{layer}'}")],
     [r"sae-lens has no release 'no-such-release'"], 1),
    ("hf_folder", lambda c: ["run", *tiny(
        c, "--set", f"model_a={{source: hf, name: m, path: '{c['root'] / 'no-model'}'}}")],
     [r"model folder '.*no-model' does not exist; give a folder holding config.json"], 1),
    ("concepts_python_tag", lambda c: ["run", *tiny(
        c, "--set", f"subspaces.concepts={c['root'] / 'evil.yaml'}")],
     [r"concept set .*evil.yaml: the YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'"
      r" \(line 1, column 7\) is not allowed"], 1),
    ("topk_width", lambda c: ["saes", *tiny(c, "--set", "sae.architecture=topk",
                                            "--set", "sae.topk=999")],
     [r"sae.topk=999 exceeds the width of model_a's SAEs \(sae.expansion x d_model = 4 x 16\); "
      r"lower sae.topk"], 1),
    ("disk_full", lambda c: ["run", *tiny(c)],
     [r"not enough disk space in the store .*: the planned artefacts need about [\d,]+ bytes "
      r"\(.*codes .*\) but 1,000 bytes \(1.0 kB\) are free; lower extract.n_tokens, .*"
      r"--store DIR or SAEUNIV_HOME\); SAEUNIV_SKIP_DISK_CHECK=1 skips this check"], 1),
    # -- sweeps: the spec is checked before the study or any run ---------------------------
    ("sweep_missing", lambda c: ["sweep", str(c["root"] / "no-spec.yaml")],
     [r"cannot read sweep spec .*no-spec.yaml: No such file or directory"], 0),
    ("sweep_range", lambda c: ["sweep", str(c["root"] / "spec_range.yaml")],
     [r"params\['match.threshold'\]: low must be < high, got low=0.5, high=0.1"], 0),
    ("sweep_section", lambda c: ["sweep", str(c["root"] / "spec_section.yaml")],
     [r"params\['sae.expansion'\]: sweeps vary analysis settings only.*set them in base.set"],
     0),
    ("sweep_metric", lambda c: ["sweep", str(c["root"] / "spec_metric.yaml")],
     [r"unknown objective metric 'bleu'; choose one of \['svcca'"], 0),
    ("sweep_python_tag", lambda c: ["sweep", str(c["root"] / "spec_tag.yaml")],
     [r"spec_tag.yaml: the YAML tag 'tag:yaml.org,2002:python/name:os.system' .*is not "
      r"allowed"], 0),
    ("sweep_n_trials", lambda c: ["sweep", str(c["root"] / "spec_ok.yaml"), "--n-trials", "0"],
     [r"--n-trials must be >= 1, got 0"], 0),
    # -- audit and compare: unknown runs --------------------------------------------------
    ("audit_unknown", lambda c: ["audit", "0" * 32],
     [r"run '0{32}' not found in sqlite:.*; check the run id and MLFLOW_TRACKING_URI"], 0),
    ("compare_one", lambda c: ["compare", "0" * 32],
     [r"compare needs at least two run ids, got \['0{32}'\]"], 0),
    ("compare_twice", lambda c: ["compare", "a" * 32, "a" * 32],
     [r"a run id is given twice"], 0),
    ("compare_unknown", lambda c: ["compare", "0" * 32, "1" * 32],
     [r"run '0{32}' not found in sqlite:.*; check the run id and MLFLOW_TRACKING_URI"], 0),
    # -- MLproject entry points: the real command in a new interpreter ---------------------
    ("mlproject_main", lambda c: entry("main", config="tiny", threshold="5"),
     [r"match.threshold must be in \[-1, 1\], got 5.0"], 0),
    ("mlproject_similarity", lambda c: entry("similarity", config="tiny", n_perm="-1"),
     [r"similarity.n_perm must be >= 1, got -1"], 0),
    ("mlproject_extract", lambda c: entry("extract", config=str(c["root"] / "no-corpus.yaml")),
     [r"corpus source '.*no-such-corpus' is not a file, a folder"], 1),
    ("mlproject_compare", lambda c: entry("compare", runs="only-one"),
     [r"compare needs at least two run ids, got \['only-one'\]"], 0),
    ("mlproject_sweep", lambda c: entry("sweep", spec=str(c["root"] / "spec_range.yaml")),
     [r"low must be < high, got low=0.5, high=0.1"], 0),
]


def _runs() -> dict[str, object]:
    return {r.info.run_id: r for r in mlflow.search_runs(search_all_experiments=True,
                                                         output_format="list")}


def _store_state(store: Path) -> tuple[list[str], list[str]]:
    """(finished heavy entries, stray temporary or partial files) in the store."""
    heavy = sorted(str(p) for kind in HEAVY for p in (store / kind).glob("*/manifest.json"))
    stray = sorted(str(p) for p in store.rglob("*")
                   if p.name.startswith((".tmp-", ".probe-")) or p.name.endswith(".tmp")
                   or p.name.startswith("shard-"))
    return heavy, stray


def test_the_table_covers_every_entry_point(ctx):
    assert len(ROWS) >= 25 and len({r[0] for r in ROWS}) == len(ROWS)
    commands = {r[1](ctx)[0] for r in ROWS if not r[0].startswith("mlproject_")}
    assert commands == {"run", "models", "saes", "extract", "match", "similarity", "subspaces",
                        "sweep", "audit", "compare"}
    entry_points = {r[1](ctx)[3] for r in ROWS if r[0].startswith("mlproject_")}
    assert len(entry_points) >= 4  # python -m saeuniv.cli COMMAND ...


@pytest.mark.parametrize("name, argv, patterns, n_runs", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_fast_and_leaves_nothing(ctx, name, argv, patterns, n_runs,
                                                      capsys, monkeypatch):
    args = argv(ctx)
    store = Path(os.environ["SAEUNIV_HOME"])
    if name == "disk_full":
        monkeypatch.setattr(Store, "free_bytes", lambda self: 1000)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    before = _runs()
    t0 = time.monotonic()
    if name.startswith("mlproject_"):
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        code, err, limit = proc.returncode, proc.stderr, FAST_SUBPROCESS_S
    else:
        try:
            code = cli.main(args)
        except SystemExit as exit_:  # argparse refuses a value of the wrong type
            code = exit_.code
        err, limit = capsys.readouterr().err, FAST_S
    elapsed = time.monotonic() - t0
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if re.match(r"saeuniv( \w+)?: error: ", line)]
    assert len(lines) == 1, err[-3000:]  # one line names the problem
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert elapsed < limit, f"{name} took {elapsed:.1f}s"
    heavy, stray = _store_state(store)
    assert heavy == [] and stray == []  # nothing trained, nothing half-written
    after = _runs()
    new = {i: r for i, r in after.items() if i not in before}
    assert len(new) == n_runs, {i: r.data.tags.get("saeuniv.stage") for i, r in new.items()}
    assert all(r.info.status != "RUNNING" for r in after.values())
    for run in new.values():
        assert run.info.status == "FAILED"
        tag = run.data.tags.get("saeuniv.error", "")
        assert re.search(patterns[0], tag), (patterns[0], tag)
    assert not (ctx["root"] / "pwned").exists()  # no YAML tag was ever executed


UNSAFE = {
    r"\bimport pickle\b|\bpickle\.load": "pickle",
    r"\bdill\b|\bjoblib\.load": "pickle-based loader",
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True)",
    r"yaml\.(load|full_load|unsafe_load|load_all)\(|yaml\.(Unsafe|Full)?Loader\b": "unsafe YAML",
}


def test_no_source_file_deserialises_untrusted_bytes_unsafely():
    """Weights come from safetensors, arrays from np.load without pickles, YAML from
    yaml.safe_load: no code path of saeuniv can run code hidden in a file it reads."""
    files = sorted((SRC / "saeuniv").rglob("*.py"))
    assert len(files) > 10
    found = [f"{f.name}: {what}" for f in files for pattern, what in UNSAFE.items()
             if re.search(pattern, f.read_text())]
    assert found == []
    assert re.search(r"torch\.load\((?![^)]*weights_only=True)", "torch.load(p)")  # the check bites
    assert not re.search(r"torch\.load\((?![^)]*weights_only=True)",
                         "torch.load(p, weights_only=True)")
