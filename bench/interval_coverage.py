"""Measured coverage of the interval rules (attnspace.intervals) on planted populations, and the rule the
spectra use chosen by it: writes docs/coverage.md's table (and prints it).

Populations: the measured spectrum shapes of bench/data/spectrum_shapes.csv (SmolLM2-135M layer 15,
attention output and residual stream, the latter with its one dominant direction holding 45% of the
variance), as d = 96 spectra. Samples: documents with the measured within-document correlation
(between-document share rho = 0.1 and lag-one correlation 0.55 of the top directions: phi = 0.5), 64
document groups, 100 replicates, 90% intervals; the default's ratio of tokens to width (16,384 / 576,
63 documents of 259 tokens, as 63 documents of 43 tokens at d = 96) and four times as many documents.

    python bench/interval_coverage.py                 # 200 repetitions per setting (minutes)
    python bench/interval_coverage.py --reps 20 --out /tmp/coverage.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from threadpoolctl import threadpool_limits

from attnspace.coverage import Setting, choose, coverage
from attnspace.intervals import METHODS

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "bench" / "data" / "spectrum_shapes.csv"
LEVEL, MARGIN = 0.9, 0.03
DEFAULT_DOCS, DOC_LEN = 63, 43


def settings() -> list[Setting]:
    shapes = pd.read_csv(SHAPES, comment="#")
    out = []
    for site in ("attn_out", "resid_post"):
        shape = tuple(shapes.loc[shapes["site"] == site].sort_values("i")["share"])
        for n_docs in (DEFAULT_DOCS, 4 * DEFAULT_DOCS):
            out.append(Setting(f"{site}-like", shape, n_docs, DOC_LEN))
    return out


def markdown(table: pd.DataFrame, chosen: tuple[str, bool], reps: int, seconds: float) -> str:
    lines = ["| population | tokens (n/d) | statistic | rule | coverage | below | above | truth | mean estimate "
             "| mean corrected | mean interval | width |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.setting} | {r.n_tokens:,} ({r.n_tokens / r.d:.0f}) | {r.statistic} | {r.method} | "
                     f"**{r.coverage:.3f}** | {r.below:.3f} | {r.above:.3f} | {r.truth:.4f} | {r.estimate:.4f} | "
                     f"{r.corrected:.4f} | [{r.mean_lo:.4f}, {r.mean_hi:.4f}] | {r.width:.4f} |")
    rule, within = chosen
    verdict = (f"Chosen rule: **{rule}**, closest to {LEVEL:.0%} in its worst setting and never under it by more than "
               "the margin" if within else f"No rule stays within the margin in every setting; chosen: **{rule}**, "
               "whose worst shortfall is the smallest")
    return "\n".join([
        "# Coverage of the intrinsic-dimension intervals", "",
        "Written by `python bench/interval_coverage.py` (its docstring gives the planted populations and the "
        "sample design; the rules are those of `src/attnspace/intervals.py`, run on replicates drawn exactly as "
        "the spectrum job draws them). *coverage*: the share of samples whose 90% interval of k/d at tau = 0.99 "
        "holds the population's exact value; *below* / *above*: the interval lies wholly below / above it. "
        "*integer* is the table's k; *interpolated* reads k off the cumulative variance between whole "
        "directions, a continuous version of it: at d = 96 one direction is 0.010 of d, about the width of "
        "the intervals, so the integer statistic's coverage mostly measures where the grid falls (at d = 576 "
        "one direction is 0.0017, a sixth of the default's interval widths).", "",
        f"{reps} repetitions per setting, nominal coverage {LEVEL:.0%}, margin {MARGIN:.2f} (binomial standard "
        f"error at {reps} repetitions: {(LEVEL * (1 - LEVEL) / reps) ** 0.5:.3f}); {seconds / 60:.1f} min on "
        "the 2-core development machine. Rules: " + ", ".join(METHODS) + ". "
        f"{verdict} (interpolated statistic).", "", *lines, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--resamples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    a = p.parse_args()
    start = time.time()
    rows = []
    with threadpool_limits(limits=1):
        for i, setting in enumerate(settings()):
            rows += coverage(setting, a.reps, a.resamples, LEVEL, seed=a.seed + i)
            print(f"{setting.name} {setting.n_tokens} tokens done at {time.time() - start:.0f} s", flush=True)
    table = pd.DataFrame(rows).sort_values(["setting", "n_tokens", "statistic"], kind="stable")
    text = markdown(table, choose(rows, LEVEL, MARGIN), a.reps, time.time() - start)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
