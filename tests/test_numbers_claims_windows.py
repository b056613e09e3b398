"""C4's and C6's statements at the shorter dead-fraction windows, on hand-built runs whose verdict at each
window is known by construction (seeds spread 0.01 apart, so 2 sd = 0.02 decides)."""

from __future__ import annotations

import pandas as pd

from attnspace.claims import _c4_windows, _c6_windows, _tokens, _windows

SEEDS = (-0.01, 0.0, 0.01)  # offsets of three seeds: sd 0.01 (ddof 1)


def rows(values: dict, **fields) -> list[dict]:
    """Three seeds of one setting: ``values`` maps each window column to the seeds' mean."""
    return [{**fields, **{col: mean + off for col, mean in values.items()}} for off in SEEDS]


def c4_runs(windows: tuple[str, ...], tokens: float | None = 4096) -> pd.DataFrame:
    """Base init, and ASI / random subspace at d_init 8 and 16, over the given window columns.

    quarter window: ASI 0.5 below random 0.8 and base 0.7 at d_init 8; at d_init 16 ASI ties random (0.51 vs 0.5).
    half window:    ASI below both at both d_init (random 0.8 at 8, 0.9 at 16; ASI 0.5 at 8, 0.85 at 16: only
                    d_init 8 is below base 0.7, and reading random at the other d_init flips d_init 16).
    full window:    ASI below both at both d_init.
    """
    table = {  # column -> (base, {d: (asi, random)})
        "dead_fraction_quarter_window": (0.7, {8: (0.5, 0.8), 16: (0.51, 0.5)}),
        "dead_fraction_half_window": (0.9, {8: (0.5, 0.8), 16: (0.85, 0.95)}),
        "dead_fraction": (0.7, {8: (0.3, 0.6), 16: (0.2, 0.5)}),
    }
    out = rows({c: table[c][0] for c in windows}, init="base", d_init=0, dead_window_tokens=tokens)
    for d in (8, 16):
        out += rows({c: table[c][1][d][0] for c in windows}, init="asi", d_init=d, dead_window_tokens=tokens)
        out += rows({c: table[c][1][d][1] for c in windows}, init="random_subspace", d_init=d,
                    dead_window_tokens=tokens)
    return pd.DataFrame(out)


def test_c4_counts_each_window_with_ties_and_the_same_d_init():
    runs = c4_runs(("dead_fraction_quarter_window", "dead_fraction_half_window", "dead_fraction"))
    assert _c4_windows(runs, [8, 16]) == ("; ASI below both over 1,024 tokens: 1/2 d_init, 2,048 tokens: 2/2 d_init, "
                                          "4,096 tokens: 2/2 d_init")


def test_c4_with_two_windows_lists_two_and_with_one_nothing():
    two = c4_runs(("dead_fraction_half_window", "dead_fraction"))
    assert _c4_windows(two, [8, 16]) == "; ASI below both over 2,048 tokens: 2/2 d_init, 4,096 tokens: 2/2 d_init"
    assert _c4_windows(c4_runs(("dead_fraction",)), [8, 16]) == ""


def test_a_window_without_a_token_count_is_named_the_window():
    runs = c4_runs(("dead_fraction_half_window", "dead_fraction"), tokens=None)
    assert _windows(runs) == [("dead_fraction_half_window", 0), ("dead_fraction", 0)]
    assert _tokens(0) == "the window" and _tokens(4096) == "4,096 tokens"
    assert _c4_windows(runs, [8]) == "; ASI below both over the window: 1/1 d_init, the window: 1/1 d_init"


def test_a_window_column_with_a_missing_value_is_not_a_window():
    runs = c4_runs(("dead_fraction_half_window", "dead_fraction"))
    runs.loc[0, "dead_fraction_half_window"] = float("nan")
    assert _windows(runs) == [("dead_fraction", 4096)]


def test_c6_says_at_each_window_whether_asi_sparseadam_is_below_every_other():
    table = {  # variant -> means at (quarter, half, full): below every other at the full window only
        "topk": (0.8, 0.8, 0.8), "topk_auxk": (0.85, 0.85, 0.85), "asi": (0.6, 0.5, 0.7),
        "asi_sparseadam": (0.61, 0.49, 0.5),  # quarter: above asi; half: a tie with asi (0.01 < 2 sd)
    }
    cols = ("dead_fraction_quarter_window", "dead_fraction_half_window", "dead_fraction")
    runs = pd.DataFrame([r for v, means in table.items()
                         for r in rows(dict(zip(cols, means)), variant=v, dead_window_tokens=4096)])
    assert _c6_windows(runs) == ("; ASI + SparseAdam below every other over 1,024 tokens: no, 2,048 tokens: no, "
                                 "4,096 tokens: yes")
    assert _c6_windows(runs.drop(columns=list(cols[:2]))) == ""
