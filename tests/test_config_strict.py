"""Values that validate but would poison a run: the strict YAML reader that Snakemake's config and
attnspace share (duplicate keys, YAML 1.1 octal and sexagesimal numbers, alias bombs), names, lists
that must be distinct, a loss-recovered k grid too coarse to measure, a budget no corpus can give
and documents longer than the model's context, each refused before any job in one short line."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import yaml

from attnspace.config import ConfigError, check_config, check_models_on_disk, load_config
from attnspace.strict_yaml import MAX_EXPANDED_NODES, load_yaml, read_config_files

from conftest import REPO, tiny_config
from test_workflow import snakemake_cli


def refused(path, *words) -> str:
    """The one-line message of the ConfigError that reading ``path`` raises; it holds ``words``."""
    with pytest.raises(ConfigError) as e:
        load_yaml(path)
    line = e.value.line()
    assert "\n" not in line and "Fix:" in line, line
    for word in words:
        assert word in line, line
    return line


# ----------------------------------------------------------------------------- the reader

@pytest.mark.parametrize("text, words", [
    ("models: {a: 1}\ndatasets: {}\nmodels: {b: 2}\n", ["line 3", "'models' is given twice", "first on line 1"]),
    ("tokens:\n  seed: 010\n", ["line 2", "010", "octal", "read as 8"]),
    ("tokens:\n  seed: 25:36\n", ["25:36", "sexagesimal", "read as 1536"]),
    ("spectrum:\n  threshold: 1:30.5\n", ["1:30.5", "sexagesimal", "read as 90.5"]),
    ("models:\n  m:\n    source: {kind: hub, trust_remote_code: yes}\n", ["line 3", "yes is a boolean in YAML 1.1",
                                                                          "read as True", "write true or false"]),
    ("a: [1, 2\n", ["line 2", "not valid YAML"]),
    ("a: &x [1, *x]\n", ["recursive alias"]),
])
def test_reader_refuses_what_pyyaml_reads_silently(tmp_path, text, words):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    refused(path, str(path), *words)


def test_reader_reads_plain_yaml_as_pyyaml_does(tmp_path):
    text = ("a: 0\nb: 10\nc: 0.5\nd: '010'\ne: '25:36'\nf: -3\ng: 1_000\nbase: &b {x: 1}\nh:\n  <<: *b\n  y: 2\n"
            "i: true\nj: False\nk: 'no'\n")
    (tmp_path / "c.yaml").write_text(text)
    assert load_yaml(tmp_path / "c.yaml") == yaml.safe_load(text)
    for name in ("config.yaml", "config/paper.yaml"):
        assert load_yaml(REPO / name) == yaml.safe_load((REPO / name).read_text())


def test_reader_refuses_other_encodings_and_non_mappings(tmp_path):
    (tmp_path / "latin.yaml").write_bytes("description: caf\xe9\n".encode("latin-1"))
    refused(tmp_path / "latin.yaml", "not UTF-8", "save the file as UTF-8")
    (tmp_path / "list.yaml").write_text("- models\n- datasets\n")
    with pytest.raises(ConfigError, match="list.yaml: the configuration is empty or not a mapping \\(got list\\)"):
        read_config_files([tmp_path / "list.yaml"])


def alias_bomb(levels: int) -> str:
    """``levels`` nested aliases of ten each inside cache.layers: about 1 KB, 10^(levels+1) values."""
    items = ["&b0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"] + [
        f"&b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "cache:\n  layers:\n    attn_out: [" + ", ".join(items) + "]\n"


def test_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(7))
    assert path.stat().st_size < 1500
    start = time.perf_counter()
    line = refused(path, "aliases", f"{MAX_EXPANDED_NODES:,}")
    assert time.perf_counter() - start < 1.0 and len(line) < 300, line
    # a few shared values are fine: 10 + 100 + 1000 values
    path.write_text(alias_bomb(2))
    assert len(load_yaml(path)["cache"]["layers"]["attn_out"]) == 3


def test_snakemake_reads_config_files_with_the_same_reader(tmp_path):
    cfg = (REPO / "config.yaml").read_text()
    (tmp_path / "dup.yaml").write_text(cfg + "\nfocus: {model: gemma3-270m, dataset: pydocs, layer: 9}\n")
    r = snakemake_cli("-n", "--configfile", "dup.yaml", cwd=tmp_path)
    assert r.returncode != 0
    assert "key 'focus' is given twice in one mapping" in r.stdout + r.stderr
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- values

def _tiny(tiny_llama, **changes) -> dict:
    cfg = copy.deepcopy(tiny_config(tiny_llama))
    for dotted, value in changes.items():
        *head, last = dotted.split("__")
        node = cfg
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


def check_refused(cfg, *words) -> str:
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    line = e.value.line()
    for word in words:
        assert word in line, line
    assert "Fix:" in line and len(line) < 600, line
    return line


def test_names_are_anchored_at_the_true_end(tiny_llama):
    cfg = tiny_config(tiny_llama)
    cfg["models"]["tiny\n"] = cfg["models"].pop("tiny")
    check_refused(cfg, "models: the name 'tiny\\n' is not allowed")
    check_refused(_tiny(tiny_llama, focus__model="tiny\n"), "focus.model = 'tiny\\n'")
    cfg = tiny_config(tiny_llama)
    cfg["datasets"][7] = cfg["datasets"].pop("pycode")
    check_refused(cfg, "datasets: the name 7 is not allowed")


def test_reserved_and_case_folded_names_are_refused(tiny_llama):
    cfg = tiny_config(tiny_llama)
    cfg["datasets"]["pydocs.sae"] = cfg["datasets"].pop("pycode")
    check_refused(cfg, "datasets.pydocs.sae", "reserved")
    cfg = tiny_config(tiny_llama)
    cfg["datasets"]["PyDocs"] = cfg["datasets"].pop("pycode")
    check_refused(cfg, "datasets.pydocs and datasets.PyDocs differ only in case")


@pytest.mark.parametrize("key, value, repeated", [
    ("spectrum__thresholds", [0.5, 0.9, 0.9, 0.99], "0.9"),
    ("figures__fig9__thresholds", [0.5, 0.5], "0.5"),
    ("fig5__d_init", [4, 8, 4], "4"),
    ("lorsa__models", ["tiny", "tiny"], "'tiny'"),
])
def test_lists_that_name_outputs_are_distinct(tiny_llama, key, value, repeated):
    cfg = _tiny(tiny_llama, **{key: value})
    if key.startswith("figures"):
        cfg["figures"] = {"fig9": {"thresholds": value}}
    check_refused(cfg, key.replace("__", "."), f"lists {repeated} more than once")


def test_k_grid_must_step_by_at_most_a_quarter_of_d(tiny_llama):
    zero = {"dense": 0, "log_points": 0, "linear_points": 0}
    check_refused(_tiny(tiny_llama, interventions__k_grid=zero), "k = [0, 48]", "step of 48", "linear_points")
    # linear_points n alone gives k = 0, d/n, ..., d (d = 48): steps of 16 at n = 3, of 12 at n = 4
    check_refused(_tiny(tiny_llama, interventions__k_grid={**zero, "linear_points": 3}), "step of 16")
    check_config(_tiny(tiny_llama, interventions__k_grid={**zero, "linear_points": 4}))
    check_config(_tiny(tiny_llama, interventions__k_grid={**zero, "dense": 48}))


def test_a_budget_no_corpus_can_give_is_refused(tiny_llama):
    check_refused(_tiny(tiny_llama, tokens__sae_train_tokens=10 ** 15), "datasets.pydocs gives at most",
                  "1,000,000,000,000,384", "tokens.sae_train_tokens")
    check_refused(_tiny(tiny_llama, tokens__train_tokens=2_000_000), "gives at most", "tokens.train_tokens")
    check_refused(_tiny(tiny_llama, sae__source="live", sae__train_tokens=10 ** 12), "sae.train_tokens")


def test_token_supply_bounds_what_the_tokenizer_gives(tiny_llama):
    """Independent of the bound's code: real documents tokenised by the tests' BPE tokenizer."""
    from transformers import AutoTokenizer

    from attnspace.corpora import _embedded, document_ids, token_supply

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    cap = 64
    docs = list(_embedded("python_code"))[::30]
    counts = [len(ids) for ids in document_ids(iter(docs), tokenizer, cap)]
    assert len(counts) == len(docs)
    bounds = [min(len(d.encode("utf-8")) + 1, cap) for d in docs]
    assert all(c <= b for c, b in zip(counts, bounds))
    assert np.mean(counts) > 0.9 * np.mean(bounds)  # tight where documents are longer than the cap
    supply = token_supply({"kind": "embedded", "name": "python_code"}, cap)
    assert supply >= sum(min(len(d.encode("utf-8")) + 1, cap) for d in _embedded("python_code"))
    assert token_supply({"kind": "hub", "path": "owner/name"}, cap) is None


def test_documents_longer_than_the_models_context_are_refused(tiny_llama, tmp_path):
    cfg = check_config(_tiny(tiny_llama, tokens__max_doc_tokens=1024))  # the schema alone cannot know
    with pytest.raises(ConfigError, match="tokens.max_doc_tokens = 1024 exceeds the context of tiny, 512 tokens"):
        check_models_on_disk(cfg, tmp_path)
    check_models_on_disk(check_config(_tiny(tiny_llama, tokens__max_doc_tokens=512)), tmp_path)


def test_a_long_value_is_not_repeated_in_the_message(tiny_llama):
    line = check_refused(_tiny(tiny_llama, cache__layers={"attn_out": [[1, 2]] * 10_000}), "cache.layers.attn_out")
    assert len(line) < 400


def test_load_config_is_the_strict_reader(tmp_path):
    (tmp_path / "c.yaml").write_text((REPO / "config.yaml").read_text().replace("seed: 0", "seed: 010", 1))
    with pytest.raises(ConfigError, match="010 is an octal number"):
        load_config(tmp_path / "c.yaml")


def test_the_tokens_job_refuses_documents_beyond_a_model_prepared_in_the_same_run(tiny_llama, tmp_path, capsys):
    import json

    from attnspace.cli import main

    argv = ["tokenize", "--model-dir", str(tiny_llama), "--source", json.dumps({"kind": "embedded",
            "name": "python_docs"}), "--train-tokens", "64", "--heldout-tokens", "64", "--out", str(tmp_path / "t.npz")]
    assert main([*argv, "--max-doc-tokens", "513"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: tokens.max_doc_tokens = 513 exceeds the model's context, 512 tokens (max_position_embeddings "
                   f"of {tiny_llama / 'config.json'}). Fix: set tokens.max_doc_tokens to at most 512.")
    assert not (tmp_path / "t.npz").exists()
