"""The claims table on planted data: each claim's verdict follows its stated test, the numbers
match independent computations, absent data gives 'not run'; captions, the README gallery
blocks and the stage-times table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnspace.claims import (COLUMNS, FAILS, HOLDS, INCONCLUSIVE, NOT_RUN, c1, c2, c3, c4, c5, c6, c7,
                              claims_markdown, claims_table, compare, tail_drops)


def idim_rows(model: str, fractions: list[tuple[float, float, float]], half_width: float | None = 0.02) -> list[dict]:
    """Rows of the intrinsic-dimension table: per layer, the (attn, mlp, resid) fractions at 0.99, each with an
    interval of +- half_width (None: no interval)."""
    rows = []
    for layer, trio in enumerate(fractions):
        for site, f in zip(("attn_out", "mlp_out", "resid_post"), trio):
            w = np.nan if half_width is None else half_width
            rows.append(dict(model=model, dataset="ds", layer=layer, site=site, threshold=0.99, fraction=f,
                             fraction_lo=f - w, fraction_hi=f + w, level=0.9))
            rows.append(dict(model=model, dataset="ds", layer=layer, site=site, threshold=0.5, fraction=1 - f,
                             fraction_lo=1 - f - w, fraction_hi=1 - f + w, level=0.9))
    return rows


def test_c1_decides_each_layer_on_the_intervals_and_takes_the_majority():
    idim = pd.DataFrame(idim_rows("a", [(0.4, 0.8, 0.9)] * 3) + idim_rows("b", [(0.5, 0.8, 0.3)] * 2 + [(0.2, 0.8, 0.3)]))
    rows = {r["tested_on"].split(":")[0]: r for r in c1(idim)}
    assert rows["a/ds"]["verdict"] == HOLDS and "3/3 layers" in rows["a/ds"]["measured"]
    assert rows["b/ds"]["verdict"] == FAILS and "above another site in 2/3" in rows["b/ds"]["measured"]
    assert rows["all"]["verdict"] == HOLDS and "4/6" in rows["all"]["measured"]  # 4 of 6 is a strict majority
    assert "0.40 [0.38, 0.42]" in rows["a/ds"]["measured"]


def test_c1_overlapping_intervals_are_inconclusive():
    # attention lowest by its point estimate at every layer, but its interval overlaps the residual's
    idim = pd.DataFrame(idim_rows("a", [(0.40, 0.8, 0.43)] * 3, half_width=0.02))
    assert c1(idim)[0]["verdict"] == INCONCLUSIVE and "inconclusive in 3/3" in c1(idim)[0]["measured"]
    # the same numbers with narrow intervals decide
    assert c1(pd.DataFrame(idim_rows("a", [(0.40, 0.8, 0.43)] * 3, half_width=0.01)))[0]["verdict"] == HOLDS
    # no interval at all (no bootstrap): nothing can be decided
    row = c1(pd.DataFrame(idim_rows("a", [(0.1, 0.8, 0.9)] * 3, half_width=None)))[0]
    assert row["verdict"] == INCONCLUSIVE and "no interval" in row["measured"]


def test_c1_half_is_not_a_majority():
    idim = pd.DataFrame(idim_rows("a", [(0.4, 0.8, 0.9), (0.5, 0.8, 0.3)]))
    assert c1(idim)[0]["verdict"] == INCONCLUSIVE  # one holds, one fails: neither is a strict majority


def test_compare_against_twice_the_larger_seed_deviation():
    assert compare([0.1, 0.2, 0.3], [0.7, 0.8, 0.9]) == -1  # means 0.6 apart, sd 0.1: lower
    assert compare([0.7, 0.8, 0.9], [0.1, 0.2, 0.3]) == 1
    assert compare([0.5, 0.6, 0.7], [0.7, 0.8, 0.9]) == 0  # 0.2 apart = 2 sd: not more, cannot tell
    assert compare([0.5], [0.9]) == 0  # one seed: no spread to compare with
    assert compare([0.5], [0.9], noise=0.1) == -1  # a noise scale measured elsewhere
    assert compare([0.5], [0.9], noise=0.3) == 0


def wo_curve(model: str, n: int, wo_decades: float, z_decades: float) -> pd.DataFrame:
    i = np.arange(1, n + 1)
    wo = 10.0 ** (-wo_decades * i / n)
    z = 10.0 ** (-z_decades * i / n)
    return pd.DataFrame(dict(model=model, dataset="ds", layer=3, i=i, var_o=wo * z, wo_contrib=wo, z_contrib=z))


def test_c2_compares_the_decades_each_term_drops_over_the_tail():
    wo = pd.concat([wo_curve("m1", 200, 30.0, 5.0), wo_curve("m2", 200, 5.0, 30.0)])
    drops = tail_drops(wo).set_index("model")
    # 20 tail directions, ends averaged over 5: the ends are 15 directions apart -> 15/200 of the slope
    assert drops.loc["m1", "drop_wo"] == pytest.approx(30.0 * 15 / 200)
    assert drops.loc["m1", "drop_z"] == pytest.approx(5.0 * 15 / 200)
    assert drops.loc["m1", "drop_o"] == pytest.approx(35.0 * 15 / 200)
    verdicts = {r["tested_on"]: r["verdict"] for r in c2(wo)}
    assert verdicts == {"m1/ds L3": HOLDS, "m2/ds L3": FAILS}


def test_c3_spearman_matches_ranks_computed_with_numpy():
    rng = np.random.default_rng(0)
    idim = rng.random(15)
    dead = 1 - idim + 0.05 * rng.standard_normal(15)
    table = pd.DataFrame(dict(model="m", dataset="ds", layer=np.repeat([0, 1, 2, 3, 4], 3),
                              site=["attn_out", "mlp_out", "resid_post"] * 5, dead_fraction=dead,
                              intrinsic_dim_fraction=idim))
    row = c3(table)[0]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (no ties here)
    rho = np.corrcoef(rank(dead), rank(idim))[0, 1]
    assert f"rho = {rho:+.2f}" in row["measured"] and row["verdict"] == HOLDS
    assert c3(table.assign(dead_fraction=idim))[0]["verdict"] == FAILS  # significant positive correlation
    noise = rng.permutation(15).astype(float)  # unrelated to idim
    assert c3(table.assign(dead_fraction=noise))[0]["verdict"] == INCONCLUSIVE


def runs(rows: list[tuple], seeds=(0,), spread: float = 0.0, centred: bool = False) -> pd.DataFrame:
    """One row per run and seed; seed s shifts both metrics by spread * (s - mean seed)."""
    out = []
    mid = np.mean(seeds)
    for run, variant, init, d_init, d_sae, k, nmse, dead in rows:
        for s in seeds:
            out.append(dict(model="m", dataset="ds", layer=3, site="attn_out", run=f"{run}-s{s}-{centred}",
                            variant=variant, init=init, d_init=d_init, d_sae=d_sae, k=k, seed=s, centred=centred,
                            nmse=nmse + spread * (s - mid), dead_fraction=dead + spread * (s - mid), status="ok"))
    return pd.DataFrame(out)


FIG5 = [("b", "topk", "base", None, 512, 8, 0.4, 0.6),
        ("a1", "asi", "asi", 8, 512, 8, 0.3, 0.7), ("r1", None, "random_subspace", 8, 512, 8, 0.4, 0.8),
        ("a2", "asi", "asi", 16, 512, 8, 0.3, 0.5), ("r2", None, "random_subspace", 16, 512, 8, 0.4, 0.8),
        ("a3", "asi", "asi", 32, 512, 8, 0.3, 0.4), ("r3", None, "random_subspace", 32, 512, 8, 0.4, 0.8)]


def test_c4_per_form_over_seeds():
    # seeds 0..2 with sd 0.01: every difference above (0.1 at least) is far beyond 2 sd
    fig5 = runs(FIG5, seeds=(0, 1, 2), spread=0.01)
    (row,) = c4(fig5)
    assert row["verdict"] == HOLDS and "below both at 2/3" in row["measured"] and "uncentred" in row["tested_on"]
    assert "3 seeds" in row["measured"] and "0.70 ± 0.01" in row["measured"]
    # the same means with sd 0.1: no difference exceeds 2 sd -> inconclusive, not a verdict either way
    assert c4(runs(FIG5, seeds=(0, 1, 2), spread=0.1))[0]["verdict"] == INCONCLUSIVE
    # ASI above base at two d_init: fails
    worse = runs([r if r[0] not in ("a2", "a3") else r[:7] + (0.9,) for r in FIG5], seeds=(0, 1, 2), spread=0.01)
    assert c4(worse)[0]["verdict"] == FAILS
    # one seed: the spread is unknown, nothing is decided
    assert c4(runs(FIG5))[0]["verdict"] == INCONCLUSIVE
    # both forms: one row each, named
    both = pd.concat([runs(FIG5, seeds=(0, 1, 2), spread=0.01), worse.assign(centred=True)])
    rows = c4(both)
    assert [r["verdict"] for r in rows] == [HOLDS, FAILS]
    assert rows[0]["tested_on"].endswith("uncentred") and rows[1]["tested_on"].endswith(", centred")


def sweep_points(values: dict[int, tuple], seeds=(0,), spread=0.0, centred=False) -> pd.DataFrame:
    return runs([(f"{v}-{n}", v, "x", 16, n, 8, nmse, dead)
                 for n, vals in values.items()
                 for v, nmse, dead in zip(("topk", "topk_auxk", "asi", "asi_sparseadam"), vals, (0.5, 0.4, 0.6, 0.3))],
                seeds=seeds, spread=spread, centred=centred)


def test_c5_uses_the_seed_spread_for_points_run_once():
    once = sweep_points({256: (0.30, 0.31, 0.25, 0.24)})
    largest = sweep_points({512: (0.28, 0.27, 0.22, 0.22)}, seeds=(0, 1, 2), spread=0.005)
    row = c5(pd.concat([once, largest]))[0]
    # seed sd 0.005 -> noise 0.01: 256 (0.25 vs 0.30) and 512 (0.22 vs 0.27) both hold
    assert row["verdict"] == HOLDS and "below both at 2/2" in row["measured"] and "seed sd 0.005" in row["measured"]
    wide = sweep_points({512: (0.28, 0.27, 0.22, 0.22)}, seeds=(0, 1, 2), spread=0.05)  # sd 0.05: nothing decided
    assert c5(pd.concat([once, wide]))[0]["verdict"] == INCONCLUSIVE
    assert c5(once)[0]["verdict"] == INCONCLUSIVE  # no replicated point: no noise scale
    worse = sweep_points({512: (0.28, 0.27, 0.35, 0.22)}, seeds=(0, 1, 2), spread=0.005)
    assert c5(worse)[0]["verdict"] == FAILS


def test_c6_at_the_largest_size_per_form():
    sweep = pd.concat([sweep_points({256: (0.30, 0.31, 0.25, 0.24)}),
                       sweep_points({512: (0.28, 0.27, 0.29, 0.22)}, seeds=(0, 1, 2), spread=0.01)])
    (row,) = c6(sweep)
    assert row["verdict"] == HOLDS and "512 latents" in row["measured"] and "asi_sparseadam 0.30 ± 0.01" in row["measured"]
    tie = sweep.copy()
    tie.loc[tie["variant"] == "asi_sparseadam", "dead_fraction"] += 0.1  # 0.4 = AuxK's: cannot tell
    assert c6(tie)[0]["verdict"] == INCONCLUSIVE
    tie.loc[tie["variant"] == "asi_sparseadam", "dead_fraction"] += 0.2  # above TopK + AuxK
    assert c6(tie)[0]["verdict"] == FAILS
    both = pd.concat([sweep, sweep_points({512: (0.28, 0.27, 0.29, 0.22)}, seeds=(0, 1, 2), spread=0.1, centred=True)])
    assert [r["verdict"] for r in c6(both)] == [HOLDS, INCONCLUSIVE]


def test_c7_over_seeds():
    def table(dead_asi, nmse_asi, sd):
        rows = []
        for s, e in enumerate((-sd, 0.0, sd)):
            rows += [dict(model="m", dataset="ds", layer=3, init="vanilla", seed=s, dead_param_fraction=0.6 + e,
                          nmse=0.2 + e / 10),
                     dict(model="m", dataset="ds", layer=3, init="asi", seed=s, dead_param_fraction=dead_asi + e,
                          nmse=nmse_asi + e / 10)]
        return pd.DataFrame(rows)

    assert c7(table(0.4, 0.19, 0.01))[0]["verdict"] == HOLDS
    assert c7(table(0.4, 0.21, 0.01))[0]["verdict"] == FAILS  # NMSE higher beyond the spread
    assert c7(table(0.59, 0.199, 0.01))[0]["verdict"] == INCONCLUSIVE  # within the spread
    assert "3 seeds" in c7(table(0.4, 0.19, 0.01))[0]["measured"]
    # failed (diverged) runs: left out of the comparison and named, never read as numbers
    rows = table(0.4, 0.19, 0.01).assign(status="ok")
    rows.loc[(rows["init"] == "asi") & (rows["seed"] == 2), ["status", "dead_param_fraction", "nmse"]] = \
        ["failed", float("nan"), float("nan")]
    row = c7(rows)[0]
    assert row["verdict"] == HOLDS and "2 seeds" in row["measured"] and "1 failed run(s) left out" in row["measured"]
    rows.loc[rows["init"] == "asi", ["status", "dead_param_fraction", "nmse"]] = ["failed", float("nan"), float("nan")]
    row = c7(rows)[0]
    assert row["verdict"] == INCONCLUSIVE and row["measured"].startswith("no finished run of asi") and "nan" not in \
        row["measured"]


def test_absent_data_is_not_run_and_every_claim_has_a_row():
    table = claims_table({})
    assert list(table.columns) == COLUMNS
    assert list(table["claim"]) == [f"C{i}" for i in range(1, 8)] and (table["verdict"] == NOT_RUN).all()
    md = claims_markdown(table)
    assert "strict majority" in md and md.count("**not run**") == 7


def test_caption_appends_this_runs_numbers():
    from attnspace.captions import caption

    fig7 = runs([("t", "topk", "base", None, 256, 8, 0.3, 0.5), ("a", "asi", "asi", 16, 256, 8, 0.2, 0.4)])
    fig7["fit_exponent"] = [0.11, 0.22]
    text = caption("fig7", "What it shows.\n", fig7)
    assert text.startswith("What it shows.\n\nThis run: ") and "asi 0.220" in text and "asi 0.200 / 0.40" in text


def test_gallery_blocks_and_shrunk_pngs(tmp_path):
    from PIL import Image

    from attnspace.gallery import first_sentence, replace_block, shrink_png, update_readme

    Image.new("RGB", (2000, 600), "white").save(tmp_path / "fig1.png")
    small = shrink_png(tmp_path / "fig1.png", tmp_path / "out" / "fig1.png", 500)
    assert Image.open(small).size == (500, 150)
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- claims:begin -->\nold\n<!-- claims:end -->\nbottom\n")
    assert update_readme(readme, {"claims": "| new |"})
    assert readme.read_text() == "top\n<!-- claims:begin -->\n| new |\n<!-- claims:end -->\nbottom\n"
    with pytest.raises(ValueError, match="gallery:begin"):
        replace_block(readme.read_text(), "gallery", "x")
    assert not update_readme(tmp_path / "missing.md", {"claims": "x"})
    assert first_sentence("Relative singular values: of the three sites. More.") == "Relative singular values"


def test_stage_times_from_benchmark_files(tmp_path):
    from attnspace.stage_times import stage_times

    header = "s\th:m:s\tmax_rss\n"
    for path, s, rss in [("spectrum/a/L1.tsv", 2.0, 300), ("spectrum/a/L2.tsv", 3.0, 400), ("claims.tsv", 1.0, 50)]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(header + f"{s}\t0:00:0{int(s)}\t{rss}\n")
    table = stage_times(tmp_path).set_index("stage")
    assert table.loc["spectrum"].tolist() == [2, 5.0, 3.0, 400.0] and table.loc["claims", "jobs"] == 1
    with pytest.raises(FileNotFoundError, match="make run"):
        stage_times(tmp_path / "none")
