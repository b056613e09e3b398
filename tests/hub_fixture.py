"""A local hub cache and local dataset repositories that stand in for the hub, offline.

Models: for every model of ``config/paper.yaml`` a tiny random model of the same architecture
(``llama``, ``qwen3``, ``gemma2``, ``gpt_neox``), saved with ``save_pretrained`` into
``<root>/hf_home/hub`` laid out as huggingface_hub lays out its cache
(``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` -> blob, ``refs/<ref>``),
under the paper's own ids and revisions: a pinned commit is a snapshot folder, a tag such as
``step143000`` is a ref, and an unpinned model resolves through ``refs/main``.
With ``HF_HOME=<root>/hf_home`` and ``HF_HUB_OFFLINE=1`` transformers loads them by id.

Datasets: local dataset repositories with the real file layout and field names of
SlimPajama (JSON Lines: ``text``, ``meta.redpajama_set_name``), the GitHub slice of RedPajama
(JSON Lines under ``github/``: ``text``, ``meta``, ``red_pajama_subset``; exposed as config
``github``) and CCI3-Data (parquet: ``id``, ``text``, ``meta``), read by the same
``datasets.load_dataset(path, name, split=..., streaming=True)`` call as the hub ids.
The text comes from the embedded corpora (English prose, Python code) plus a Chinese
passage per document for CCI3.

Usage: python tests/hub_fixture.py <root>   (writes <root>/hf_home, <root>/datasets,
<root>/config.yaml: config/paper.yaml's structure at tiny sizes, pointing at them; then run
HF_HOME=<root>/hf_home HF_HUB_OFFLINE=1 snakemake --configfile <root>/config.yaml ...).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Commit a ref resolves to, for revisions that are not themselves commits (fixed, so reruns agree).
TAG_COMMIT = "0" * 39 + "1"
MAIN_COMMIT = "0" * 39 + "2"

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3)
"""Every fixture model: d_model 32, three layers (TINY_HEADS of conftest give the attention shape)."""


def _is_commit(revision: str | None) -> bool:
    return bool(revision) and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def write_hub_repo(hub: Path, repo_id: str, revision: str | None, files_dir: Path) -> str:
    """Lay out ``files_dir``'s files as the hub cache holds repo ``repo_id`` at ``revision``.

    Returns the commit the revision resolves to."""
    commit = revision if _is_commit(revision) else (TAG_COMMIT if revision else MAIN_COMMIT)
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(files_dir.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    if revision and not _is_commit(revision):
        (repo / "refs" / revision).write_text(commit)
    return commit


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> None:
    """A tiny random ``family`` model with the embedded-corpus tokenizer, via save_pretrained."""
    from conftest import build_tokenizer, tiny_causal_lm

    tokenizer = build_tokenizer()
    model = tiny_causal_lm(family, seed=seed, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, max_position_embeddings=256, **TINY_MODEL)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


CCI3_TEXT = ("人工智能是计算机科学的一个分支，它试图理解智能的实质，并生产出一种新的能以人类智能相似的方式"
             "做出反应的智能机器。该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。")


def write_datasets(root: Path, n_docs: int = 200) -> dict[str, Path]:
    """Dataset repositories with the real layouts and field names; returns {paper name: folder}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attnspace.corpora import python_code, python_docs

    prose = [d for _, d in zip(range(n_docs), python_docs())]
    code = [d for _, d in zip(range(n_docs), python_code())]

    slim = root / "cerebras" / "SlimPajama-627B"
    (slim / "train" / "chunk1").mkdir(parents=True, exist_ok=True)
    with open(slim / "train" / "chunk1" / "example_train_0.jsonl", "w") as f:
        for text in prose:
            f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}) + "\n")

    red = root / "togethercomputer" / "RedPajama-Data-1T"
    (red / "github").mkdir(parents=True, exist_ok=True)
    with open(red / "github" / "filtered_0.sampled.jsonl", "w") as f:
        for i, text in enumerate(code):
            meta = {"content_hash": hashlib.md5(text.encode()).hexdigest(), "language": "Python",
                    "license": "psf-2.0", "path": f"Lib/file{i}.py", "repo_name": "python/cpython"}
            f.write(json.dumps({"text": text, "meta": meta, "red_pajama_subset": "github"}) + "\n")
    (red / "README.md").write_text("---\nconfigs:\n- config_name: github\n  data_files:\n"
                                   "  - split: train\n    path: github/*.jsonl\n---\n")

    cci3 = root / "BAAI" / "CCI3-Data"
    (cci3 / "data").mkdir(parents=True, exist_ok=True)
    texts = [f"{CCI3_TEXT}\n{text}" for text in prose]
    table = pa.table({"id": [hashlib.md5(t.encode()).hexdigest() for t in texts], "text": texts,
                      "meta": [json.dumps({"source": "fixture"}) for _ in texts]})
    pq.write_table(table, cci3 / "data" / "part_00000.parquet")
    return {"slimpajama": slim, "redpajama-github": red, "cci3": cci3}


E2E_MODELS = ("llama-3.1-8b", "pythia-2.8b")
E2E_DATASETS = ("slimpajama", "cci3")
"""The models and corpora the end-to-end run keeps: the focus model and one of another family,
English and Chinese text. On 2 CPU cores each job costs seconds of start-up, so all 4 x 3 (94 jobs)
would take a quarter of an hour; every model and corpus is loaded by tests/test_hub.py."""


def hub_test_config(paper: dict, datasets: dict[str, Path]) -> dict:
    """``config/paper.yaml`` at tiny sizes: same keys, the paper's models (ids, revisions) and
    corpora (read from ``datasets``) of E2E_MODELS and E2E_DATASETS, one SAE from the live source."""
    cfg = copy.deepcopy(paper)
    cfg["models"] = {name: cfg["models"][name] for name in E2E_MODELS}
    cfg["datasets"] = {name: cfg["datasets"][name] for name in E2E_DATASETS}
    for m in cfg["models"].values():
        m.update(n_layers=TINY_MODEL["num_hidden_layers"], d_model=TINY_MODEL["hidden_size"], layers=[2],
                 dtype="float32")
    for name, d in cfg["datasets"].items():
        d["source"]["path"] = str(datasets[name])
    assert cfg["focus"]["model"] in cfg["models"] and cfg["focus"]["dataset"] in cfg["datasets"]
    cfg["tokens"].update(max_doc_tokens=128, train_tokens=1024, heldout_tokens=384)
    cfg["cache"].update(chunk_rows=256, shard_rows=512)
    cfg["focus"]["layer"] = 2
    cfg["interventions"].update(heldout_tokens=128, batch=4)
    cfg["sae"].update(expansion=2, k=4, batch_size=64, train_tokens=256, buffer_rows=128, eval_tokens=128,
                      lm_eval_tokens=64, live_batch_docs=4)
    cfg["sae"]["auxk"].update(k_aux=8, dead_threshold_tokens=128)
    cfg["fig5"]["d_init"] = [4, 8]
    cfg["fig6"].update(expansion=2, k=[2, 4], d_init=8)
    cfg["fig7"].update(expansion=[1, 2], k=4, d_init=8)
    cfg["lorsa"].update(expansion=2, n_qk_heads=4, d_qk=8, k=4, d_init=8, batch_tokens=128)
    return cfg


def build(root: Path) -> Path:
    """Write the fixture under ``root``; returns the test configuration's path."""
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    hub = root / "hf_home" / "hub"
    for i, (name, m) in enumerate(sorted(paper["models"].items())):
        staging = root / "staging" / name
        save_tiny_model(m["architecture"], staging, seed=i)
        write_hub_repo(hub, m["source"]["id"], m["source"]["revision"], staging)
    datasets = write_datasets(root / "datasets")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(hub_test_config(paper, datasets), sort_keys=False))
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1]).resolve()))
