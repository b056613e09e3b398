"""Per-stage times of a run, from Snakemake's ``benchmark:`` files (results/benchmarks/).

A stage is the first folder under the benchmarks root (one per rule; figure rules share
``figures``), or the file's stem for rules that write a single file there. For each:
the number of jobs, their total and longest wall time (s) and the largest peak RSS (MB).
``make times`` prints the table the README records.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def stage_times(root: Path | str) -> pd.DataFrame:
    """``stage, jobs, total_s, longest_s, peak_rss_mb`` per stage, longest total first."""
    root = Path(root)
    rows = []
    for tsv in sorted(root.rglob("*.tsv")):
        rel = tsv.relative_to(root)
        stage = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        bench = pd.read_csv(tsv, sep="\t")
        rows.append(dict(stage=stage, s=float(bench["s"].iloc[-1]), rss=float(bench["max_rss"].iloc[-1])))
    if not rows:
        raise FileNotFoundError(f"no benchmark files under {root}. Fix: run the pipeline first (make run).")
    jobs = pd.DataFrame(rows)
    table = jobs.groupby("stage").agg(jobs=("s", "size"), total_s=("s", "sum"), longest_s=("s", "max"),
                                      peak_rss_mb=("rss", "max"))
    return table.sort_values("total_s", ascending=False).reset_index()


def stage_times_markdown(table: pd.DataFrame) -> str:
    lines = ["| stage (rule) | jobs | total s | longest job s | peak RSS MB |", "|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.stage} | {r.jobs} | {r.total_s:,.0f} | {r.longest_s:,.0f} | {r.peak_rss_mb:,.0f} |")
    total = table["total_s"].sum()
    lines.append(f"| **all** | {table['jobs'].sum()} | {total:,.0f} ({total / 60:.1f} min) | | |")
    return "\n".join(lines)
