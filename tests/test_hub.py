"""The paper configuration's hub paths through the real loaders, offline: tiny random models in a
local hub cache (tests/hub_fixture.py) loaded by id and pinned revision with HF_HUB_OFFLINE=1,
and dataset shards with the real field names streamed through datasets.load_dataset."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from hub_fixture import MAIN_COMMIT, TAG_COMMIT, build, save_tiny_model, write_hub_repo

PAPER = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())


@pytest.fixture(scope="session")
def hub_fixture(tmp_path_factory) -> Path:
    """The fixture root: hf_home/, datasets/, config.yaml."""
    root = tmp_path_factory.mktemp("hub")
    build(root)
    return root


def hub_env(root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return dict(env, HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                PATH=f"{Path(sys.executable).parent}:{env['PATH']}", **extra)


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter: huggingface_hub reads HF_* variables once, at import."""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


PREPARE = """
import json, sys
from pathlib import Path
from attnspace.models import prepare_model, ModelError
models, root = json.loads(sys.argv[1]), Path(sys.argv[2])
out = {}
for name, m in models.items():
    try:
        out[name] = prepare_model(m["source"], root / "prepared" / name, architecture=m["architecture"],
                                  n_layers=m["n_layers"], d_model=m["d_model"], dtype="float32")
    except ModelError as e:
        out[name] = {"error": str(e)}
print(json.dumps(out, default=str))
"""


def prepare(root: Path, models: dict, env: dict) -> dict:
    """prepare_model for each of ``models``, in a fresh interpreter with ``env``: {name: record or error}."""
    r = subprocess.run([sys.executable, "-c", PREPARE, json.dumps(models), str(root)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def tiny(models: dict) -> dict:
    return {name: {**m, "n_layers": 3, "d_model": 32} for name, m in models.items()}


def test_every_paper_model_loads_by_id_at_its_pinned_revision(hub_fixture):
    records = prepare(hub_fixture, tiny(PAPER["models"]), hub_env(hub_fixture))
    expected = {"llama-3.1-8b": PAPER["models"]["llama-3.1-8b"]["source"]["revision"],
                "qwen3-8b": PAPER["models"]["qwen3-8b"]["source"]["revision"],
                "gemma-2-9b": MAIN_COMMIT,      # revision null: refs/main
                "pythia-2.8b": TAG_COMMIT}      # revision step143000: refs/step143000
    for name, commit in expected.items():
        assert "error" not in records[name], records[name]
        assert records[name]["commit"] == commit
        assert records[name]["architecture"] == PAPER["models"][name]["architecture"]
        written = json.loads((hub_fixture / "prepared" / name / "config.json").read_text())
        assert written["hidden_size"] == 32


def test_the_pinned_revision_is_the_one_loaded_not_main(tmp_path):
    """A repo whose main moved on after the tag: the tag's weights are loaded, and its commit recorded."""
    from safetensors.numpy import load_file

    hub = tmp_path / "hf_home" / "hub"
    save_tiny_model("gpt_neox", tmp_path / "tagged", seed=1)
    save_tiny_model("gpt_neox", tmp_path / "later", seed=2)
    write_hub_repo(hub, "EleutherAI/pythia-2.8b", "step143000", tmp_path / "tagged")
    later = "f" * 40
    write_hub_repo(hub, "EleutherAI/pythia-2.8b", later, tmp_path / "later")  # refs/main -> later commit
    assert (hub / "models--EleutherAI--pythia-2.8b" / "refs" / "main").read_text() == later
    models = tiny({"pythia-2.8b": PAPER["models"]["pythia-2.8b"]})
    record = prepare(tmp_path, models, hub_env(tmp_path))["pythia-2.8b"]
    assert record["commit"] == TAG_COMMIT
    loaded = load_file(tmp_path / "prepared" / "pythia-2.8b" / "model.safetensors")
    for folder, same in (("tagged", True), ("later", False)):
        ref = load_file(tmp_path / folder / "model.safetensors")
        key = next(k for k in ref if k.endswith("query_key_value.weight"))
        assert np.array_equal(loaded[key], ref[key]) is same, folder


def test_an_unknown_revision_is_an_error_naming_the_key(hub_fixture, tmp_path):
    models = tiny({"llama-3.1-8b": PAPER["models"]["llama-3.1-8b"]})
    models["llama-3.1-8b"]["source"] = {**models["llama-3.1-8b"]["source"], "revision": "a" * 40}
    record = prepare(tmp_path, models, hub_env(hub_fixture))["llama-3.1-8b"]
    assert "models.<name>.source.revision" in record["error"] and "a" * 40 in record["error"]
    assert not (tmp_path / "prepared" / "llama-3.1-8b").exists()


class GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers one for a gated repo without an accepted token."""

    def _gated(self):
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model meta-llama/Llama-3.1-8B is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _gated

    def log_message(self, *args):
        pass


def test_a_gated_model_without_token_names_hf_token(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = hub_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
        env["HF_HUB_OFFLINE"] = "0"
        record = prepare(tmp_path, tiny({"llama-3.1-8b": PAPER["models"]["llama-3.1-8b"]}), env)["llama-3.1-8b"]
    finally:
        server.shutdown()
    assert "gated" in record["error"] and "HF_TOKEN" in record["error"]


STREAM = """
import json, datasets
from attnspace.corpora import hub_documents
out = {}
for name, d in json.loads(%r).items():
    s = d["source"]
    ds = datasets.load_dataset(s["path"], s.get("name"), split=s["split"], streaming=True)
    first = next(iter(ds))
    docs = [t for _, t in zip(range(5), hub_documents(s, seed=0))]
    out[name] = {"streaming": isinstance(ds, datasets.IterableDataset), "fields": sorted(first),
                 "docs": docs, "first_text": first[s["text_field"]]}
print(json.dumps(out))
"""


def test_hub_datasets_stream_through_load_dataset_with_the_real_fields(hub_fixture):
    # the paper's dataset settings, the hub id replaced by the local repository of the same name
    datasets = {name: {"source": {**d["source"], "path": str(hub_fixture / "datasets" / d["source"]["path"])}}
                for name, d in PAPER["datasets"].items()}
    r = run_python(STREAM % json.dumps(datasets), hub_env(hub_fixture))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["slimpajama"]["fields"] == ["meta", "text"]
    assert out["redpajama-github"]["fields"] == ["meta", "red_pajama_subset", "text"]
    assert out["cci3"]["fields"] == ["id", "meta", "text"]
    for name, d in out.items():
        assert d["streaming"], name
        assert len(d["docs"]) == 5 and all(isinstance(t, str) and t for t in d["docs"]), name
    assert "def " in "".join(out["redpajama-github"]["docs"])       # code
    assert all("人工智能" in t for t in out["cci3"]["docs"])          # Chinese web text
    # the end-to-end configuration reads its corpora with the paper's settings, only the path differs
    cfg = yaml.safe_load((hub_fixture / "config.yaml").read_text())
    for name, d in cfg["datasets"].items():
        paper = PAPER["datasets"][name]["source"]
        assert {k: v for k, v in d["source"].items() if k != "path"} == {k: v for k, v in paper.items() if k != "path"}


# The end-to-end run of the paper configuration's structure on the fixtures. The cluster test
# (tests/test_cluster.py) runs the same configuration and uses check_hub_run on its local run.
HUB_TARGETS = ("fig1", "fig2a", "fig2b", "fig3", "fig8", "fig9", "table1",
               "results/saes/llama-3.1-8b/slimpajama/L2/attn_out/base-d0-adam-n64-k4/metrics.json")


def run_hub_config(root: Path, workdir: Path, *args, targets=HUB_TARGETS, timeout=1500) -> subprocess.CompletedProcess:
    # targets first: --configfile and --set-threads take every word after them
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *targets,
                           "--configfile", str(root / "config.yaml"), *args],
                          cwd=workdir, env=hub_env(root), capture_output=True, text=True, timeout=timeout)


def check_hub_run(root: Path, workdir: Path) -> None:
    """What a run of the hub configuration must have produced."""
    import pandas as pd

    cfg = yaml.safe_load((root / "config.yaml").read_text())
    for name, m in cfg["models"].items():
        record = json.loads((workdir / f"resources/models/{name}/prepared.json").read_text())
        revision = m["source"]["revision"]
        assert record["commit"] == (revision if revision and len(revision) == 40 else
                                    TAG_COMMIT if revision else MAIN_COMMIT), name
    idim = pd.read_csv(workdir / "results/tables/intrinsic_dim.csv")
    assert set(idim["model"]) == set(cfg["models"]) and set(idim["dataset"]) == set(cfg["datasets"])
    assert (idim["d"] == 32).all()
    assert len(idim) == len(cfg["models"]) * len(cfg["datasets"]) * 3 * len(cfg["spectrum"]["thresholds"])
    for name in ("fig1", "fig2a", "fig2b", "fig3", "fig8", "fig9"):
        assert (workdir / f"results/figures/{name}.pdf").stat().st_size > 0, name
    metrics = json.loads((workdir / "results/saes/llama-3.1-8b/slimpajama/L2/attn_out/base-d0-adam-n64-k4/"
                                    "metrics.json").read_text())
    assert metrics["tokens_trained"] >= cfg["sae"]["train_tokens"]
    assert (workdir / "results/tables/table1_lorsa.md").read_text().strip()


@pytest.mark.hub
def test_paper_structure_runs_end_to_end_on_the_hub_fixture(hub_fixture, tmp_path):
    r = run_hub_config(hub_fixture, tmp_path, "--cores", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    check_hub_run(hub_fixture, tmp_path)
