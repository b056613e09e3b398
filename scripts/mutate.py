"""Mutation testing of the modules that compute published numbers and verdicts (``make mutate``).

Each group below names modules and the test files that cover them. A group runs in a copy of the
repository under ``build/mutate/<group>/`` (never the working tree): mutmut writes every mutant of
the group's modules into ``mutants/`` there and runs the group's tests against each one, killing a
mutant when a test fails. Tests that start a subprocess import the mutated copy too (PYTHONPATH).
A group that runs past ``--timeout`` keeps the mutants it finished; a second run resumes there.

Per group it prints killed / survived / timed out / not yet run, the score (killed and timed out
over those run) and each survivor's name (``mutmut show NAME`` in the group's folder prints the
change); the table goes to ``build/mutate/summary.md``. docs/testing.md records the last full run
and why each survivor is equivalent or which test kills it now.

    python scripts/mutate.py                       # every group, in the order below
    python scripts/mutate.py claims spectrum       # some groups
    python scripts/mutate.py --timeout 1200 --jobs 2 sae_step
    python scripts/mutate.py claims --only 'attnspace.claims.x_c5*'   # the mutants of some functions
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutate"
COPY = ["src", "tests", "schemas", "pyproject.toml", "config.yaml"]
"""What a group's copy holds (the tests read the schema's defaults and the embedded config)."""

GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "claims": (["claims.py"], ["test_claims.py", "test_numbers_claims.py", "test_convergence.py", "test_intervals.py"]),
    "spectrum": (["spectrum.py", "intervals.py"], ["test_spectrum.py", "test_intervals.py", "test_numbers_spectrum.py"]),
    "interventions": (["interventions.py"], ["test_interventions.py", "test_numbers_spectrum.py"]),
    "sae_step": (["sae/losses.py", "sae/train.py"],
                 ["test_numbers_sae.py", "test_sae_train.py", "test_sae_fast.py", "test_sae_sparse.py", "test_sae_io.py"]),
    "sae_model": (["sae/model.py", "sae/sparse.py", "sae/fast.py"],
                  ["test_sae_sparse.py", "test_sae_fast.py", "test_numbers_sae.py"]),
    "sae_optim": (["sae/optim.py"], ["test_sae_optim.py", "test_sae_fast.py"]),
    "wo_decomposition": (["wo_decomposition.py"], ["test_wo.py", "test_numbers_spectrum.py"]),
    "moments": (["moments.py"], ["test_moments.py"]),
    "store": (["store.py"], ["test_store.py", "test_numbers_store.py"]),
    "lorsa_model": (["lorsa/model.py"], ["test_lorsa.py"]),
}
"""Group -> (modules under src/attnspace, test files under tests/). The numeric core first."""


def prepare(group: str) -> Path:
    """A fresh copy of the repository for ``group`` with its mutmut settings in setup.cfg."""
    work = WORK / group
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy(src, work / name)
    write_settings(group, work)
    # On PYTHONPATH from the start (mutmut fills it), so that the mutants, not the installed package, are imported.
    (work / "mutants" / "src").mkdir(parents=True)
    return work


def write_settings(group: str, work: Path) -> None:
    """The group's mutmut settings in ``work/setup.cfg``."""
    modules, tests = GROUPS[group]
    lines = ["[mutmut]", "source_paths=src", "also_copy=", "    schemas", "    config.yaml",
             "only_mutate=", *[f"    src/attnspace/{m}" for m in modules],
             "pytest_add_cli_args_test_selection=", *[f"    tests/{t}" for t in tests],
             "pytest_add_cli_args=", "    -p", "    no:cacheprovider", "    -x", "    -q",
             "process_isolation=forkserver", "use_git_change_detection=false"]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")


RUN_MUTMUT = """
import sys
from mutmut.mutation import mutators
if not {strings}:  # string literals: the wording of messages and labels, not a number or a verdict
    mutators.mutation_operators[:] = [op for op in mutators.mutation_operators if op[1] is not mutators.operator_string]
from mutmut.__main__ import cli
sys.argv[0] = "mutmut"
cli()
"""
"""mutmut's command line, without its string-literal mutants unless asked for."""


def survivors(work: Path, mutmut: list[str], env: dict) -> list[str]:
    """Names of the mutants of ``work`` that survived their tests."""
    listing = subprocess.run(mutmut + ["results"], cwd=work, env=env, capture_output=True, text=True, check=False)
    return [line.split(":")[0].strip() for line in listing.stdout.splitlines() if line.strip().endswith("survived")]


def run(group: str, timeout: float, jobs: int, fresh: bool, strings: bool, only: list[str], retest: bool) -> dict:
    """Run one group, resuming a previous run unless ``fresh`` (with the tests as they are now; ``retest``: its
    survivors again); its counts and survivors."""
    work = WORK / group
    env = dict(os.environ, PYTHONPATH=str(work / "mutants" / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mutmut = [sys.executable, "-c", RUN_MUTMUT.format(strings=strings)]
    if fresh or not (work / "mutants").is_dir():
        prepare(group)
    else:
        shutil.rmtree(work / "tests")
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        write_settings(group, work)
        if retest:
            only = only + survivors(work, mutmut, env)
    start = time.monotonic()
    with open(work / "mutmut.log", "ab") as log:
        # In a process group of its own, so that at the time limit the whole tree (fork server, workers) is stopped.
        proc = subprocess.Popen(mutmut + ["run", "--max-children", str(jobs), *only], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            finished = True
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            finished = False
    seconds = time.monotonic() - start
    subprocess.run(mutmut + ["export-cicd-stats"], cwd=work, env=env, check=False, capture_output=True)
    stats_path = work / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    return dict(group=group, finished=finished, seconds=round(seconds), stats=stats,
                survivors=survivors(work, mutmut, env))


def row(r: dict) -> str:
    s = r["stats"]
    killed, survived = s.get("killed", 0), s.get("survived", 0)
    timeout = s.get("timeout", 0)
    run_ = killed + survived + timeout + s.get("suspicious", 0)
    score = f"{(killed + timeout) / run_:.0%}" if run_ else "-"
    left = s.get("total", 0) - run_ - s.get("skipped", 0)
    modules = ", ".join(GROUPS[r["group"]][0])
    return (f"| {r['group']} | {modules} | {s.get('total', 0)} | {killed} | {timeout} | {survived} | {left} | {score} "
            f"| {r['seconds']} s{'' if r['finished'] else ' (time limit)'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", help=f"groups to run (default all): {', '.join(GROUPS)}")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per group (default 1800)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants tested at once")
    ap.add_argument("--fresh", action="store_true", help="discard a previous run's results")
    ap.add_argument("--retest", action="store_true", help="test a previous run's survivors again (tests changed)")
    ap.add_argument("--strings", action="store_true", help="mutate string literals too (messages, labels)")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="mutants whose name matches (fnmatch), e.g. 'attnspace.claims.x_compare*'; repeatable")
    args = ap.parse_args(argv)
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    header = ["| group | modules | mutants | killed | timed out | survived | not run | score | wall |",
              "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    lines = []
    for group in args.groups or GROUPS:
        r = run(group, args.timeout, args.jobs, args.fresh, args.strings, args.only, args.retest)
        lines.append(row(r))
        print(lines[-1], flush=True)
        for name in r["survivors"]:
            print(f"    survived: {name}", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "summary.md").write_text("\n".join(header + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
