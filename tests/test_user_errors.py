"""Every configuration the schema accepts runs or is refused before any job, and errors caused by
a user's files or flags end as one line naming the file or flag and the fix (never "report it").

* one model, one dataset, one site: the dry run's every command parses and ``attnspace plan``
  sums them; Figure 8, with no other pair to draw, draws a note;
* a checkout under a path with a space and non-ASCII letters, run from another directory: every
  path in a shell command is quoted, and a real job runs;
* user errors: corpora (bytes that are not UTF-8, an empty JSONL file, a missing or null text
  field), SAELens and llamascopium folders (mistyped config fields, integer weights, metadata not
  a mapping), the dead-features flags, ``attnspace plan`` on a broken or impossible configuration.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import yaml

from attnspace.cli import build_parser, main
from attnspace.config import check_config
from attnspace.plan import command_argv

from conftest import REPO, tiny_config
from test_workflow import snakemake_cli


def one_line_error(capsys, argv: list[str], *words) -> str:
    """Run ``attnspace argv``: exit status 1 and one stderr line that names ``words`` and a fix."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("error: ") and "Fix:" in line, err
    assert "report it" not in line and "Traceback" not in "\n".join(err), err
    for word in words:
        assert word in line, line
    return line


# ----------------------------------------------------------------------------- configurations that must run

def single(tiny_llama, what: str) -> dict:
    """The tests' tiny configuration cut to one model and one dataset, or also to one site and layer."""
    cfg = copy.deepcopy(tiny_config(tiny_llama))
    del cfg["datasets"]["pycode"]
    if what == "site":
        cfg["models"]["tiny"]["layers"] = [2]
        cfg["cache"]["sites"] = ["attn_out", "attn_z", "attn_in"]  # attn_z for Figure 3, attn_in for Lorsa
        cfg["spectrum"]["sites"] = cfg["interventions"]["sites"] = ["attn_out"]
        cfg["suite"] = {"sites": ["attn_out"]}
    return cfg


@pytest.mark.parametrize("what", ["model_and_dataset", "site"])
def test_single_model_dataset_and_site_configurations_plan_every_job(tiny_llama, tmp_path, capsys, monkeypatch,
                                                                     what):
    """``attnspace plan`` runs the dry run and parses every job's command with the CLI's parser."""
    from attnspace import plan

    planned, dry_run = [], plan.planned_commands
    monkeypatch.setattr(plan, "planned_commands", lambda *a, **k: planned.extend(dry_run(*a, **k)) or planned)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(single(tiny_llama, what)))
    assert main(["plan", "--configfile", str(tmp_path / "c.yaml"), "--directory", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| total |" in table and "| cache_activations | 1 |" in table, table
    parsed = [build_parser().parse_args(argv) for argv in planned]
    assert {"cache", "figure", "train-sae-group", "train-lorsa", "claims"} <= {a.command for a in parsed}
    fig8 = [a for a in parsed if a.command == "figure" and a.name == "fig8"]
    assert len(fig8) == 1 and fig8[0].spectra == []


def test_figure8_with_no_other_pair_draws_a_note(tmp_path):
    out = tmp_path / "fig8.pdf"
    assert main(["figure", "fig8", "--caption", str(REPO / "docs" / "captions" / "fig8.rst"), "--spectra",
                 "--focus-layers", '{"tiny": 2}', "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".png").is_file()
    assert out.with_suffix(".csv").read_text().strip() == "model,dataset,layer,site,i,rel_s,n_above_5pct,focus"
    assert "no rows drawn" in out.with_suffix(".caption.rst").read_text()


def test_a_job_command_that_does_not_parse_is_named_not_exited(capsys):
    """The plan a real run prints first reports such a command on one line; the run goes on."""
    from types import SimpleNamespace

    from attnspace.cli import build_parser
    from attnspace.plan import plan_jobs, print_run_plan

    with pytest.raises(ValueError, match="does not parse .*expected at least one argument.*attnspace cache"):
        plan_jobs([["cache", "--layers"]], {}, build_parser())
    print_run_plan([SimpleNamespace(shellcmd="attnspace cache --layers > log 2>&1")], {}, build_parser())
    err = capsys.readouterr().err
    assert "(no plan: ValueError: a planned job's command does not parse" in err and "usage:" not in err, err


def odd_checkout(tmp_path: Path) -> Path:
    """The workflow's files copied under a folder whose name has a space and a non-ASCII letter."""
    base = tmp_path / "dir é"
    ignore = shutil.ignore_patterns("__pycache__", "gallery")
    for name in ("rules", "docs", "src", "profiles", "envs"):
        shutil.copytree(REPO / name, base / name, ignore=ignore)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(REPO / name, base / name)
    return base


def test_a_checkout_path_with_a_space_and_non_ascii_run_from_elsewhere(tiny_llama, tmp_path):
    base, work = odd_checkout(tmp_path), tmp_path / "work"
    work.mkdir()
    (work / "c.yaml").write_text(yaml.safe_dump(single(tiny_llama, "model_and_dataset")))
    snakefile = base / "Snakefile"
    r = snakemake_cli("-n", "-p", "--configfile", "c.yaml", cwd=work, snakefile=snakefile)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    captions = [a.caption for line in r.stdout.splitlines() if (argv := command_argv(line))
                for a in [build_parser().parse_args(argv)] if a.command == "figure"]
    assert len(captions) == len(check_config(single(tiny_llama, "model_and_dataset"))["figures"])
    assert all((work / c).resolve().parent == (base / "docs" / "captions").resolve() for c in captions), captions
    # a real job through the shell: Figure 8 (it needs only its caption and the drawing code)
    r = snakemake_cli("results/figures/fig8.pdf", "--cores", "1", "--configfile", "c.yaml", cwd=work,
                      snakefile=snakefile)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (work / "results" / "figures" / "fig8.pdf").is_file()
    assert "no plan" not in r.stderr


def test_shell_commands_quote_every_path():
    """Every input, output, log and path parameter in a rule's shell command is quoted (``:q``); the
    f-strings of input functions quote with shlex themselves."""
    unquoted = re.compile(r"\{(input|output|log)(\.\w+)?\}|\{params\.(model_dir|out_dir|store|sae_dir|readme)\}"
                          r"|--heldout \{params\.heldout\}")
    found = [f"{path.name}: {line.strip()}" for path in sorted((REPO / "rules").glob("*.smk"))
             for line in path.read_text().splitlines() if unquoted.search(line) and 'f"' not in line]
    assert not found, found


# ----------------------------------------------------------------------------- corpora

def corpus(folder: Path, data: bytes) -> dict:
    """A local corpus folder (datasets reads it like a hub dataset) holding one JSONL file."""
    folder.mkdir()
    (folder / "data.jsonl").write_bytes(data)
    return {"kind": "hub", "path": str(folder)}


E_ACUTE = "é".encode("latin-1")
LATIN1 = b'{"text": "a plain line of text"}\n{"text": "caf' + E_ACUTE + b' au lait"}\n'


@pytest.mark.parametrize("data, words", [
    (b"", ["holds no data", "JSONL"]),
    (LATIN1, [f"data.jsonl (byte {LATIN1.index(E_ACUTE)}): not UTF-8", "convert the file to UTF-8"]),
    (b'{"content": "a plain line of text"}\n', ["a row has no field 'text' (columns ['content'])", "text_field"]),
    (b'{"text": "a plain line of text"}\n{"text": null}\n', ["a row has null in 'text'", "text_field"]),
    (b'{"text": 12}\n', ["a row has a int, not text, in 'text'"]),
])
def test_broken_local_corpus_is_one_line_naming_the_file(tmp_path, data, words):
    from attnspace.corpora import CorpusError, documents

    source = corpus(tmp_path / "corpus", data)
    with pytest.raises(CorpusError) as e:
        list(documents(source, seed=0))
    line = e.value.line()
    assert str(tmp_path / "corpus") in line and "Fix:" in line, line
    for word in words:
        assert word in line, line


def test_a_good_local_corpus_reads_every_document(tmp_path):
    from attnspace.corpora import documents

    texts = [f"document number {i} é" for i in range(5)]
    source = corpus(tmp_path / "corpus", "".join(f'{{"text": "{t}"}}\n' for t in texts).encode())
    assert sorted(documents(source, seed=0)) == sorted(texts)


def test_tokenize_command_reports_a_broken_corpus_on_one_line(tiny_llama, tmp_path, capsys):
    import json

    source = corpus(tmp_path / "corpus", b'{"body": "x"}\n')
    one_line_error(capsys, ["tokenize", "--model-dir", str(tiny_llama), "--source", json.dumps(source),
                            "--max-doc-tokens", "64", "--train-tokens", "256", "--heldout-tokens", "64",
                            "--out", str(tmp_path / "t.npz")], "no field 'text'")
    assert not (tmp_path / "t.npz").exists()


# ----------------------------------------------------------------------------- SAE folders of other libraries

def test_saelens_and_llamascopium_fields_are_type_checked(tmp_path):
    import torch

    from test_interop import D, N, llamascopium_folder, saelens_folder

    cases = {
        "string_bool": (saelens_folder, {"apply_b_dec_to_input": "false"}, None,
                        "apply_b_dec_to_input is 'false' (str), not true or false"),
        "string_rescale": (saelens_folder, {"architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": "no"},
                           None, "rescale_acts_by_decoder_norm is 'no'"),
        "metadata_list": (saelens_folder, {"metadata": ["blocks.0.hook_attn_out"]}, None,
                          "metadata is a list, not a mapping"),
        "dtype": (saelens_folder, {"dtype": "int8"}, None, "dtype is 'int8'"),
        "int_weights": (saelens_folder, {}, {"W_enc": torch.ones(D, N, dtype=torch.int32)},
                        "encoder.weight has dtype int32"),
        "ls_string_bool": (llamascopium_folder, {"sparsity_include_decoder_norm": "true"}, None,
                           "sparsity_include_decoder_norm is 'true' (str)"),
        "ls_bool_top_k": (llamascopium_folder, {"top_k": True}, None, "top_k is missing or not a positive integer (got True)"),
    }
    for name, (make, cfg, tensors, words) in cases.items():
        folder = make(tmp_path / name, cfg, tensors)
        with pytest.raises(SystemExit) as e:  # export-sae's refusals end the command with their line
            main(["export-sae", str(folder), "--to", "llamascopium", str(tmp_path / "x")])
        line = str(e.value.code)
        assert str(folder) in line and words in line and "Fix:" in line and "\n" not in line, line
    assert not (tmp_path / "x").exists()


def test_a_real_false_is_read_as_false(tmp_path):
    """apply_b_dec_to_input false against true on the same weights: x - b_dec enters the encoder or not."""
    import torch

    from attnspace.interop import read_sae_files
    from test_interop import D, saelens_folder

    b_dec = torch.arange(D, dtype=torch.float32)
    read = {flag: read_sae_files(saelens_folder(tmp_path / str(flag), {"apply_b_dec_to_input": flag},
                                                {"b_dec": b_dec}))
            for flag in (False, True)}
    assert read[False].hyper["apply_decoder_bias_to_pre_encoder"] is False
    assert read[True].hyper["apply_decoder_bias_to_pre_encoder"] is True


# ----------------------------------------------------------------------------- flags

@pytest.fixture(scope="module")
def sae_and_store(tmp_path_factory):
    """A LlamaScope-format SAE (d 8, 24 features) and a held-out store of 64 rows at attn_out."""
    import numpy as np

    from attnspace.store import StoreWriter
    from test_llamascope import write_folder

    root = tmp_path_factory.mktemp("dead")
    rng = np.random.default_rng(0)
    sae = write_folder(root / "sae", rng.standard_normal((24, 8)), np.zeros(24), rng.standard_normal((8, 24)),
                       np.zeros(8), jump_relu_threshold=0.1, hook_point_in="blocks.0.hook_attn_out",
                       hook_point_out="blocks.0.hook_attn_out")
    rows = 64
    with StoreWriter(root / "L0.zarr", model="m", dataset="d", layer=0, split="heldout", n_rows=rows,
                     sites={"attn_out": 8}, logical_dtype="float32", chunk_rows=32, shard_rows=64) as w:
        w.append({"attn_out": rng.standard_normal((rows, 8)).astype(np.float32)}, np.zeros(rows, np.int32),
                 np.zeros(rows, np.int32), np.arange(rows, dtype=np.int32), np.ones(rows, bool))
    return sae, root / "L0.zarr"


@pytest.mark.parametrize("flags, words", [
    (["--site", "attn_out", "--tokens", "1"], ["--tokens 1", "at least 2"]),
    (["--site", "attn_out", "--tokens", "0"], ["--tokens 0", "leave it out"]),
    (["--site", "bogus"], ["--site bogus", "holds the sites ['attn_out']"]),
])
def test_dead_features_flags_are_refused_naming_the_flag(sae_and_store, tmp_path, capsys, flags, words):
    sae, store = sae_and_store
    one_line_error(capsys, ["dead-features", str(sae), str(store), *flags, "--out", str(tmp_path / "r.json")], *words)
    assert not (tmp_path / "r.json").exists()
    assert main(["dead-features", str(sae), str(store), "--site", "attn_out", "--tokens", "2",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert '"n_tokens": 2' in (tmp_path / "r.json").read_text()


def test_plan_of_a_broken_or_impossible_configuration_is_one_line(tiny_llama, tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("models: {tiny: [1, 2}\n")
    one_line_error(capsys, ["plan", "--configfile", str(tmp_path / "broken.yaml")], "broken.yaml, line 1",
                   "not valid YAML")
    cfg = single(tiny_llama, "model_and_dataset")
    cfg["tokens"]["max_doc_tokens"] = 4096
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(cfg))
    one_line_error(capsys, ["plan", "--configfile", str(tmp_path / "long.yaml"), "--directory", str(tmp_path)],
                   "tokens.max_doc_tokens = 4096 exceeds the context of tiny")
