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


def test_a_job_command_that_does_not_parse_is_named_not_exited():
    from attnspace.plan import plan_jobs

    with pytest.raises(ValueError, match="does not parse .*expected at least one argument.*attnspace cache"):
        plan_jobs([["cache", "--layers"]], {})


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
    assert len(captions) == 10
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
