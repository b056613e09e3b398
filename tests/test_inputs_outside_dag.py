"""Inputs outside the DAG: the prepared model folder carries a SHA-256 per file, checked at every
load; a ``kind: local`` model folder is read only through safetensors and refused, naming the file
and the fix, when it is not a whole save_pretrained folder; NaN or infinite weights are refused
when the model is prepared; local model folders and local corpora are rule inputs, so a change
reruns what depends on them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import REPO, tiny_config

from attnspace.models import FILES_RECORD, ModelError, load_model, prepare_model, recorded_identity, verify_prepared

TINY = dict(architecture="llama", n_layers=4, d_model=48, dtype="float32")


def prepare(folder: Path, out: Path) -> dict:
    return prepare_model({"kind": "local", "path": str(folder)}, out, **TINY)


@pytest.fixture(scope="module")
def prepared(tiny_llama, tmp_path_factory) -> tuple[Path, dict]:
    """A prepared copy of the tiny model, as prepare_model leaves it (resources/models/tiny/hf)."""
    out = tmp_path_factory.mktemp("resources") / "tiny" / "hf"
    record = prepare(tiny_llama, out)
    (out.parent / "prepared.json").write_text(json.dumps(record))
    return out, record


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


# --- the prepared folder -----------------------------------------------------------------------

def test_the_prepared_folder_records_the_sha256_of_every_file(prepared):
    import hashlib

    out, record = prepared
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != FILES_RECORD)
    stored = json.loads((out / FILES_RECORD).read_text())["sha256"]
    assert sorted(stored) == files and "model.safetensors" in files and "config.json" in files
    for name in files:  # against hashlib, read here
        assert stored[name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert record["files"] == stored and record["identity"] == recorded_identity(out) == verify_prepared(out)


def test_flipped_bytes_in_the_prepared_weights_are_refused_at_load(prepared, tmp_path, capsys):
    """The reported case: 64 flipped bytes in model.safetensors of the prepared folder."""
    out, _ = prepared
    copy = copy_of(out.parent, tmp_path) / "hf"
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 64, len(data)):
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="model.safetensors: SHA-256 differs") as e:
        load_model(copy)
    assert "rm " in e.value.line() and "prepared.json" in e.value.line()
    # the reported path: a forced rerun of the caching job stops there, on one line, writing nothing
    from attnspace.cli import main

    rc = main(["cache", "--model-dir", str(copy), "--tokens", str(tmp_path / "tokens.npz"), "--model", "tiny",
               "--dataset", "d", "--layers", "1", "--sites", "attn_out", "--out-dir", str(tmp_path / "acts"),
               "--record", str(tmp_path / "cache.json")])
    assert rc == 1 and not (tmp_path / "acts").exists() and not (tmp_path / "cache.json").exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "model.safetensors: SHA-256 differs" in err and "Fix: rm " in err


@pytest.mark.parametrize("damage", ["config.json", "tokenizer.json", FILES_RECORD])
def test_any_changed_or_missing_file_of_the_prepared_folder_is_refused(prepared, tmp_path, damage):
    out, _ = prepared
    copy = copy_of(out.parent, tmp_path) / "hf"
    if damage == "config.json":
        config = json.loads((copy / damage).read_text())
        (copy / damage).write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
        match = "config.json: SHA-256 differs"
    elif damage == "tokenizer.json":
        (copy / damage).unlink()
        match = "tokenizer.json is missing"
    else:
        (copy / damage).unlink()  # a prepared.json beside it says the folder was prepared
        match = f"no readable {FILES_RECORD}"
    with pytest.raises(ModelError, match=match):
        load_model(copy)


def test_the_intact_prepared_folder_loads(prepared):
    model, tok = load_model(prepared[0])
    assert model.config.hidden_size == 48 and tok.bos_token_id is not None


# --- local model folders -----------------------------------------------------------------------

def broken(tiny_llama: Path, tmp_path: Path, case: str) -> Path:
    folder = copy_of(tiny_llama, tmp_path, case)
    if case == "config not JSON":
        (folder / "config.json").write_text("{model_type: llama")
    elif case == "config a list":
        (folder / "config.json").write_text("[1, 2]")
    elif case == "sizes disagree":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    elif case == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "no tokenizer":
        for p in folder.glob("*token*"):
            p.unlink()
    elif case == "bin only":
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


CASES = {
    "config not JSON": r"config.json is not JSON",
    "config a list": r"config.json holds a JSON list, not an object",
    "sizes disagree": r"model.embed_tokens.weight is \[384, 48\] in model.safetensors but config.json .* \[384, 64\]",
    "truncated weights": r"model.safetensors is not a whole safetensors file",
    "no tokenizer": r"holds no tokenizer",
    "bin only": r"holds its weights only as pytorch_model.bin \(a pickle, which attnspace never loads\)",
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_local_folder_is_refused_on_one_line(tiny_llama, tmp_path, case):
    folder = broken(tiny_llama, tmp_path, case)
    with pytest.raises(ModelError, match=CASES[case]) as e:
        prepare(folder, tmp_path / "hf")
    line = e.value.line()
    assert "\n" not in line and "Fix:" in line and "weights_only" not in line and "--debug" not in line
    assert not (tmp_path / "hf").exists()
    if case == "bin only":  # the conversion command it names works, and the folder then prepares
        command = shlex.split(line.split("with: ", 1)[1])
        assert command[:2] == ["python", "-c"] and len(command) == 3
        exec(command[2], {})  # its code, in this process (a new interpreter would take 15 s to import torch)
        assert prepare(folder, tmp_path / "hf")["d_model"] == 48


@pytest.mark.parametrize("case", ["config not JSON", "config a list"])
def test_a_broken_local_config_is_refused_when_the_workflow_loads(tiny_llama, tmp_path, case):
    """Snakemake's config checks read the folder's config.json before any job: one line, no traceback."""
    from attnspace.config import ConfigError, check_config, check_models_on_disk

    cfg = tiny_config(broken(tiny_llama, tmp_path, case))
    for check in (check_config, lambda c: check_models_on_disk(c, tmp_path)):
        with pytest.raises(ConfigError, match="models.tiny.source.path: .*" + CASES[case]) as e:
            check(cfg)
        assert "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_a_bin_beside_safetensors_is_never_read(tiny_llama, tmp_path):
    """A pickle planted beside the safetensors weights: the safetensors are what is loaded."""
    folder = copy_of(tiny_llama, tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle that anyone should open")
    assert prepare(folder, tmp_path / "hf")["n_layers"] == 4


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_when_the_model_is_prepared(tiny_llama, tmp_path, value):
    folder = copy_of(tiny_llama, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model.layers.1.self_attn.o_proj.weight holds 1 NaN or infinite"):
        prepare(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --- local folders as rule inputs --------------------------------------------------------------

def planned(root: Path, *targets: str) -> list[tuple[str, str]]:
    """(rule, reason) of each job a dry run of ``targets`` plans, sorted."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml",
                        "-n", *targets], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs, rule = [], None
    for line in r.stdout.splitlines():
        if line.startswith("rule "):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("reason:"):
            jobs.append((rule, line.split("reason:", 1)[1].strip()))
    return sorted(jobs)


def test_a_changed_local_model_folder_or_corpus_reruns_what_depends_on_it(tiny_llama, tmp_path):
    """A finished prepare and tokenize (outputs newer than every input), then one file of a local
    corpus changes: only that corpus's tokens are planned, naming the file; then one file of the
    local model folder changes: the model is prepared again, naming the file."""
    model = copy_of(tiny_llama, tmp_path, "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-0.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(60)))
    cfg = tiny_config(model)
    cfg["datasets"] = {"pydocs": cfg["datasets"]["pydocs"], "mine": {"source": {"kind": "hub", "path": "corpus"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    prepared = tmp_path / "resources" / "models" / "tiny" / "prepared.json"
    prepared.parent.mkdir(parents=True)
    prepared.write_text(json.dumps({"source": cfg["models"]["tiny"]["source"], "n_layers": 4, "d_model": 48}))
    tokens = [tmp_path / "results" / "tokens" / "tiny" / f"{name}.npz" for name in ("pydocs", "mine")]
    tokens[0].parent.mkdir(parents=True)
    for path in tokens:
        path.write_bytes(b"")
    now = prepared.stat().st_mtime
    for path in [*model.iterdir(), *corpus.iterdir()]:
        os.utime(path, (now - 1000, now - 1000))
    os.utime(prepared, (now - 500, now - 500))
    targets = [str(p.relative_to(tmp_path)) for p in tokens]

    (corpus / "part-0.jsonl").write_text((corpus / "part-0.jsonl").read_text().replace("document 7 ", "changed 7 "))
    assert planned(tmp_path, *targets) == [("tokenize", "Updated input files: corpus/part-0.jsonl")]

    for path in tokens:
        path.touch()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    jobs = planned(tmp_path, *targets)
    assert [rule for rule, _ in jobs] == ["prepare_model", "tokenize", "tokenize"]
    assert jobs[0][1] == f"Updated input files: {model / 'config.json'}"
