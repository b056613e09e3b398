"""The claims' verdicts on cases built so that exactly one comparison decides them: the 2-sd
boundary of :func:`compare` from exactly representable numbers, C4's count of rivals beaten, C5's
noise for points run once from the largest of several different seed spreads, C7 failing on the
dead-parameter fraction alone. Expected verdicts and counts are worked out by hand in each test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnspace.claims import FAILS, HOLDS, INCONCLUSIVE, NOT_RUN, c1, c4, c5, c7, compare


def test_compare_at_exactly_twice_the_seed_deviation_cannot_tell():
    # [0.25, 0.5, 0.75]: mean 0.5 and sd (ddof 1) 0.25, both exact in binary; likewise [0.75, 1, 1.25]
    lo, hi = [0.25, 0.5, 0.75], [0.75, 1.0, 1.25]
    assert np.std(lo, ddof=1) == 0.25 and np.mean(hi) - np.mean(lo) == 0.5  # exactly 2 sd apart
    assert compare(lo, hi) == 0 and compare(hi, lo) == 0  # "more than 2 sd" is strict
    nudged = [v + 2.0**-40 for v in hi]  # just beyond the boundary
    assert compare(lo, nudged) == -1 and compare(nudged, lo) == 1
    # the larger of the two sds counts: a tight side does not make a wide one decidable
    assert compare([0.5, 0.5, 0.5], hi) == 0
    # a noise scale measured elsewhere: the same boundary
    assert compare([1.0], [2.0], noise=0.5) == 0
    assert compare([1.0], [2.0 + 2.0**-40], noise=0.5) == -1


def fig5(asi: dict[int, float], random: dict[int, float], base: float, sd: float = 0.01) -> pd.DataFrame:
    """Fig 5's runs, three seeds each at mean +- sd (seed sd exactly sd): dead fractions of ASI and the
    random subspace per d_init, and of the base init."""
    rows = []

    def add(init, d_init, mean):
        for seed, e in enumerate((-sd, 0.0, sd)):
            rows.append(dict(model="m", dataset="ds", layer=3, site="attn_out", run=f"{init}{d_init}-{seed}",
                             variant="x", init=init, d_init=d_init, d_sae=512, k=8, seed=seed, centred=False,
                             nmse=0.3, dead_fraction=mean + e, status="ok"))

    add("base", None, base)
    for d, mean in asi.items():
        add("asi", d, mean)
    for d, mean in random.items():
        add("random_subspace", d, mean)
    return pd.DataFrame(rows)


def test_c4_fails_when_asi_is_above_either_rival_alone():
    # ASI above the random subspace (by 0.2 >> 2 sd) but below the base init at every d_init: above one rival
    (row,) = c4(fig5({8: 0.5, 16: 0.5, 32: 0.5}, {8: 0.3, 16: 0.3, 32: 0.3}, base=0.9))
    assert row["verdict"] == FAILS and "below both at 0/3" in row["measured"] and "above one at 3/3" in row["measured"]
    # ASI above the base init but below the random subspace
    (row,) = c4(fig5({8: 0.5, 16: 0.5, 32: 0.5}, {8: 0.9, 16: 0.9, 32: 0.9}, base=0.3))
    assert row["verdict"] == FAILS and "above one at 3/3" in row["measured"]
    # below one, tied with the other: neither holds nor fails
    (row,) = c4(fig5({8: 0.5, 16: 0.5, 32: 0.5}, {8: 0.9, 16: 0.9, 32: 0.9}, base=0.5))
    assert row["verdict"] == INCONCLUSIVE and "below both at 0/3" in row["measured"] and "above one at 0/3" in row["measured"]
    # the count per d_init: below both at 8, above the random subspace only at 16, tied at 32
    (row,) = c4(fig5({8: 0.2, 16: 0.5, 32: 0.5}, {8: 0.9, 16: 0.3, 32: 0.9}, base=0.5))
    assert "below both at 1/3" in row["measured"] and "above one at 1/3" in row["measured"]
    assert row["verdict"] == INCONCLUSIVE


def sweep(points: dict[int, tuple[float, float, float, float]]) -> pd.DataFrame:
    """Figure 6/7 runs, uncentred: per d_sae, (NMSE of TopK, TopK + AuxK, ASI, and the seed sd); sd 0 means the
    point was run once, else three seeds at mean -sd, 0, +sd (seed sd exactly sd)."""
    rows = []
    for n, (*means, sd) in points.items():
        offsets = (-sd, 0.0, sd) if sd else (0.0,)
        for variant, mean in zip(("topk", "topk_auxk", "asi"), means):
            for seed, e in enumerate(offsets):
                rows.append(dict(model="m", dataset="ds", layer=3, site="attn_out", run=f"{variant}-{n}-{seed}",
                                 variant=variant, init="x", d_init=16, d_sae=n, k=8, seed=seed, centred=False,
                                 nmse=mean + e, dead_fraction=0.5, status="ok"))
    return pd.DataFrame(rows)


def test_c5_points_run_once_are_judged_against_the_largest_seed_sd():
    # two replicated points with seed sds 0.005 and 0.05 (both hold: ASI 0.5 below); a point run once with
    # ASI 0.06 above TopK: within 2 x 0.05 (inconclusive), beyond 2 x 0.005 (would fail)
    table = sweep({256: (1.0, 1.0, 0.5, 0.005), 512: (1.0, 1.0, 0.5, 0.05), 1024: (0.30, 0.40, 0.36, 0.0)})
    (row,) = c5(table)
    assert "seed sd 0.050" in row["measured"]
    assert "below both at 2/3" in row["measured"] and "above one at 0/3" in row["measured"]
    assert row["verdict"] == HOLDS
    # beyond the largest spread it fails: ASI 0.11 above TopK
    (row,) = c5(sweep({256: (1.0, 1.0, 0.5, 0.005), 512: (1.0, 1.0, 0.5, 0.05), 1024: (0.30, 0.40, 0.41, 0.0)}))
    assert "above one at 1/3" in row["measured"]


def lorsa(dead: tuple[float, float], nmse: tuple[float, float], sd: float = 0.01) -> pd.DataFrame:
    """Table 1's runs, three seeds each: (vanilla, ASI) dead-parameter fractions and NMSEs, seed sd exactly sd."""
    rows = []
    for init, d, e in (("vanilla", dead[0], nmse[0]), ("asi", dead[1], nmse[1])):
        for seed, off in enumerate((-sd, 0.0, sd)):
            rows.append(dict(model="m", dataset="ds", layer=3, init=init, seed=seed, dead_param_fraction=d + off,
                             nmse=e + off))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("dead, nmse, verdict", [
    ((0.6, 0.4), (0.2, 0.1), HOLDS),  # both lower
    ((0.4, 0.6), (0.2, 0.1), FAILS),  # NMSE lower, dead parameters higher: fails on the dead fraction alone
    ((0.6, 0.4), (0.1, 0.2), FAILS),  # dead lower, NMSE higher
    ((0.6, 0.4), (0.2, 0.2), INCONCLUSIVE),  # dead lower, NMSE tied
    ((0.6, 0.6), (0.2, 0.1), INCONCLUSIVE),  # NMSE lower, dead tied
])
def test_c7_each_comparison_alone_decides(dead, nmse, verdict):
    assert c7(lorsa(dead, nmse))[0]["verdict"] == verdict


def test_claims_table_routes_each_figures_data_to_its_claim():
    from test_claims import FIG5, idim_rows, runs, sweep_points, wo_curve

    from attnspace import claims

    # C1 holds at 0.99 and fails at 0.5 (the other threshold's fractions are 1 - f): the threshold reaches C1
    idim = pd.DataFrame(idim_rows("a", [(0.4, 0.8, 0.9)] * 3))
    wo = wo_curve("m", 200, 30.0, 5.0)
    dead = pd.DataFrame(dict(model="m", dataset="ds", layer=np.repeat([0, 1, 2], 3), site=["attn_out", "mlp_out",
                             "resid_post"] * 3, dead_fraction=np.linspace(0.9, 0.1, 9), intrinsic_dim_fraction=np.linspace(0.1, 0.9, 9)))
    fig6 = sweep_points({256: (0.30, 0.31, 0.25, 0.24)}, seeds=(0, 1, 2), spread=0.005)
    fig7 = sweep_points({512: (0.28, 0.27, 0.22, 0.22)}, seeds=(0, 1, 2), spread=0.005)
    table1 = lorsa((0.6, 0.4), (0.2, 0.1))
    conv = pd.DataFrame([dict(model="a", dataset="ds", layer=layer, site=site, threshold=t, n_tokens=n, fraction=f)
                         for layer in range(3) for n in (100, 200) for t in (0.99, 0.5)
                         for site, f in (("attn_out", 0.4), ("mlp_out", 0.8), ("resid_post", 0.9))])
    assert c1(idim, 0.99, conv)[0]["measured"] != c1(idim, 0.99)[0]["measured"]  # the nested subsamples are stated
    data = dict(fig1=idim, fig3=wo, fig4=dead, fig5=runs(FIG5, seeds=(0, 1, 2), spread=0.01), fig6=fig6, fig7=fig7,
                table1=table1, convergence=conv)
    for threshold in (0.99, 0.5):
        expected = (c1(idim, threshold, conv) + claims.c2(wo) + claims.c3(dead) + c4(data["fig5"])
                    + c5(pd.concat([fig6, fig7], ignore_index=True)) + claims.c6(fig7) + c7(table1))
        pd.testing.assert_frame_equal(claims.claims_table(data, threshold), pd.DataFrame(expected))
    assert "at 2/2 points" in c5(pd.concat([fig6, fig7]))[0]["measured"]  # both sweeps are C5's points
    table = claims.claims_table(data)
    assert sorted(set(table["claim"])) == [f"C{i}" for i in range(1, 8)] and (table["verdict"] != NOT_RUN).all()
    for r in table.itertuples(index=False):  # each row names its claim, the paper's number and the test it applied
        assert r.statement == getattr(claims, r.claim) and r.paper == getattr(claims, f"{r.claim}_PAPER"), r
        assert r.test == (claims.c1_test(claims.THRESHOLD) if r.claim == "C1" else getattr(claims, f"{r.claim}_TEST"))
        assert isinstance(r.measured, str) and len(r.measured) > 20 and isinstance(r.tested_on, str) and r.tested_on
    assert c1(idim, 0.99)[0]["verdict"] != c1(idim, 0.5)[0]["verdict"]


def test_rows_not_run_carry_the_claim_its_paper_number_and_test():
    from attnspace import claims

    table = claims.claims_table({}).set_index("claim")
    source = dict(C1="fig1", C2="fig3", C3="fig4", C4="fig5", C5="fig6", C6="fig7", C7="Table 1")
    for i in range(1, 8):
        row = table.loc[f"C{i}"]
        assert row["statement"] == getattr(claims, f"C{i}") and row["paper"] == getattr(claims, f"C{i}_PAPER")
        assert row["tested_on"] == "-" and row["measured"].startswith("not run: ") and row["verdict"] == NOT_RUN
        assert source[f"C{i}"] in row["measured"]  # why: the data it would read
    assert table.loc["C1", "test"] == claims.c1_test(claims.THRESHOLD)
    for i in range(2, 8):
        assert table.loc[f"C{i}", "test"] == getattr(claims, f"C{i}_TEST")


def test_c2_tail_ends_follow_the_tails_length_and_rows_keep_the_input_order():
    from test_claims import wo_curve

    from attnspace.claims import c2, tail_drops

    # n = 100: the tail is directions 91-100, ends of 5 averaged: 96-100 vs 91-95, 5 directions apart;
    # n = 30: the tail is 28-30, ends of one direction: 28 vs 30, 2 apart (slopes: 10 and 3 decades over n)
    wo = pd.concat([wo_curve("z", 100, 10.0, 1.0), wo_curve("a", 30, 3.0, 6.0)])
    drops = tail_drops(wo)
    assert list(drops["model"]) == ["z", "a"] and list(drops["n_tail"]) == [10, 3]
    np.testing.assert_allclose(drops["drop_wo"], [10.0 * 5 / 100, 3.0 * 2 / 30])
    np.testing.assert_allclose(drops["drop_z"], [1.0 * 5 / 100, 6.0 * 2 / 30])
    assert [(r["tested_on"], r["verdict"]) for r in c2(wo)] == [("z/ds L3", HOLDS), ("a/ds L3", FAILS)]


def test_markdown_names_each_claim_and_its_test_once():
    from attnspace.claims import C4, C4_PAPER, C4_TEST, claims_markdown, claims_table

    table = claims_table({})
    two = pd.concat([table, table[table["claim"] == "C4"].assign(tested_on="second")]).sort_values("claim", kind="stable")
    md = claims_markdown(two)
    assert md.count(f"**C4** {C4}") == 1 and md.count(C4_PAPER) == 1 and md.count(f"* C4: {C4_TEST}.") == 1
    assert md.count("| **not run** |") == 8 and "| second |" in md
    assert "| second |" not in next(line for line in md.splitlines() if f"**C4** {C4}" in line)  # on its first row


def fig7(variants: dict[str, float], centred: bool, sd: float = 0.01, d_sae: int = 512) -> pd.DataFrame:
    """Figure 7's runs at one size and form: dead fraction per variant, three seeds at mean -sd, 0, +sd."""
    return pd.DataFrame([dict(model="m", dataset="ds", layer=3, site="attn_out", run=f"{v}-{centred}-{s}", variant=v,
                              init="x", d_init=16, d_sae=d_sae, k=8, seed=s, centred=centred, nmse=0.3,
                              dead_fraction=mean + e, status="ok")
                         for v, mean in variants.items() for s, e in enumerate((-sd, 0.0, sd))])


def test_c6_one_rival_is_enough_and_forms_come_uncentred_first():
    from attnspace.claims import c6

    # one rival only: decided against it; centred rows first in the data, rows come uncentred first
    table = pd.concat([fig7({"asi_sparseadam": 0.1, "topk": 0.8}, centred=True),
                       fig7({"topk": 0.2, "asi_sparseadam": 0.6, "asi": 0.7}, centred=False)])
    rows = c6(table)
    assert [(r["tested_on"].rsplit(", ", 1)[1], r["verdict"]) for r in rows] == [("uncentred", FAILS), ("centred", HOLDS)]
    assert "topk 0.20 ± 0.01, asi_sparseadam 0.60 ± 0.01, asi 0.70 ± 0.01" in rows[0]["measured"]  # as in the data
    # a form without ASI + SparseAdam is skipped, the other still decided
    (row,) = c6(pd.concat([fig7({"topk": 0.2, "asi": 0.7}, centred=False),
                           fig7({"asi_sparseadam": 0.1, "topk": 0.8}, centred=True)]))
    assert row["tested_on"].endswith(", centred") and row["verdict"] == HOLDS
    # neither form has it: not run
    assert c6(fig7({"topk": 0.2, "asi": 0.7}, centred=False))[0]["verdict"] == NOT_RUN
    # only the largest size counts
    smaller = fig7({"asi_sparseadam": 0.9, "topk": 0.1}, centred=False, d_sae=256)
    (row,) = c6(pd.concat([smaller, fig7({"asi_sparseadam": 0.1, "topk": 0.8}, centred=False)]))
    assert row["verdict"] == HOLDS and "512 latents" in row["measured"]


def test_c7_measured_numbers_and_rows_in_the_input_order():
    table = pd.concat([lorsa((0.6, 0.4), (0.2, 0.1)).assign(model="z"), lorsa((0.5, 0.5), (0.3, 0.3)).assign(model="a")])
    rows = c7(table)
    assert [r["tested_on"] for r in rows] == ["z/ds L3", "a/ds L3"]
    assert rows[0]["measured"] == "3 seeds: dead parameters 60.00 ± 1.00% -> 40.00 ± 1.00%, NMSE 0.20 ± 0.01 -> 0.10 ± 0.01"


def test_c5_counts_a_run_in_both_sweeps_once_and_needs_all_three_variants():
    fig6 = sweep({256: (1.0, 1.0, 0.5, 0.005), 512: (1.0, 1.0, 0.5, 0.05)})
    fig7 = fig6[fig6["d_sae"] == 512].assign(fit_exponent=0.1)  # the 512 runs again, with Figure 7's extra column
    (once,) = c5(fig6)
    (twice,) = c5(pd.concat([fig6, fig7], ignore_index=True))
    assert twice["measured"] == once["measured"] and "seed sd 0.050" in once["measured"]
    (row,) = c5(fig6[fig6["variant"] != "topk_auxk"])
    assert row["verdict"] == NOT_RUN and "lack one of ASI, TopK, TopK + AuxK" in row["measured"]
    assert row["claim"] == "C5" and row["test"].startswith("per (d_sae, k) grid point")
    assert (row["statement"], row["paper"]) == (c5(None)[0]["statement"], c5(None)[0]["paper"])


def test_c4_d_inits_seeds_and_measured_numbers():
    # ASI at d_init 8, 16, 64, the random subspace at 8, 16, 32: only 8 and 16 are compared;
    # at 8 ASI ties the random subspace (not below both), at 16 it is below both
    f = fig5({8: 0.5, 16: 0.2, 64: 0.2}, {8: 0.5, 16: 0.9, 32: 0.9}, base=0.9, sd=0.1)
    f = f.drop(f.index[(f["init"] == "base") & (f["seed"] == 2)])  # the base init has 2 seeds, the others 3
    (row,) = c4(f)
    assert row["tested_on"] == "m/ds L3 attn_out, 512 latents, k 8, uncentred"
    assert row["measured"] == ("uncentred, 2 seeds: ASI below both at 1/2 d_init, above one at 0/2; dead fraction "
                               "(mean ± sd) at d_init 8: ASI 0.50 ± 0.10 / random 0.50 ± 0.10, 16: ASI 0.20 ± 0.10 / "
                               "random 0.90 ± 0.10; base 0.85 ± 0.07")
    one_seed = fig5({8: 0.2}, {8: 0.9}, base=0.9, sd=0.0)
    (row,) = c4(one_seed[one_seed["seed"] == 0].drop(columns="centred"))  # no centred column: the uncentred form
    assert row["tested_on"].endswith(", uncentred") and row["measured"].endswith("8: ASI 0.20 / random 0.90; base 0.90")


def test_c4_forms_in_order_and_a_form_without_base_runs_skipped():
    good = fig5({8: 0.2}, {8: 0.9}, base=0.9)
    no_base = good[good["init"] != "base"].assign(centred=False)
    rows = c4(pd.concat([good.assign(centred=True), good]))
    assert [r["tested_on"].rsplit(", ", 1)[1] for r in rows] == ["uncentred", "centred"]
    assert rows[1]["measured"].startswith("centred, 3 seeds")
    (row,) = c4(pd.concat([no_base, good.assign(centred=True)]))
    assert row["tested_on"].endswith(", centred") and row["verdict"] == HOLDS
    (row,) = c4(no_base)
    assert row["verdict"] == NOT_RUN and row["measured"] == "not run: no finished base / ASI / random-subspace runs"
    assert (row["claim"], row["statement"], row["paper"], row["test"]) == \
        ("C4", c4(None)[0]["statement"], c4(None)[0]["paper"], c4(None)[0]["test"])


def test_c1_without_interval_columns_is_inconclusive():
    from test_claims import idim_rows

    idim = pd.DataFrame(idim_rows("a", [(0.1, 0.8, 0.9)] * 3)).drop(columns=["fraction_lo", "fraction_hi"])
    row = c1(idim)[0]
    assert row["verdict"] == INCONCLUSIVE and "no interval" in row["measured"]


def test_c1_intervals_that_touch_decide_nothing_and_point_ties_are_not_lowest():
    from test_claims import idim_rows

    from attnspace.claims import attention_lowest

    # half width 0.125, all exact in binary: layer 0, attention's interval [0.125, 0.375] touches MLP's
    # [0.375, 0.625]; layer 1, it touches the residual's; layer 2, attention [0.625, 0.875] touches MLP's
    # [0.375, 0.625] from above; layer 3, below both with room: holds. Touching is neither below nor above.
    trios = [(0.25, 0.5, 0.75), (0.25, 0.75, 0.5), (0.75, 0.5, 1.0), (0.25, 0.75, 1.0)]
    idim = pd.DataFrame(idim_rows("a", trios, half_width=0.125))
    cases = attention_lowest(idim, 0.99)
    assert list(cases["case"]) == [INCONCLUSIVE, INCONCLUSIVE, INCONCLUSIVE, HOLDS]
    (row, _) = c1(idim)
    assert "lowest beyond the intervals in 1/4 layers, above another site in 0/4, inconclusive in 3/4" in row["measured"]
    assert "[mean 90% interval]" in row["measured"]
    # point estimates: tied with the MLP output is not lowest, nor below it; below the MLP only is not lowest
    ties = attention_lowest(pd.DataFrame(idim_rows("a", [(0.5, 0.5, 0.9), (0.5, 0.9, 0.5), (0.5, 0.9, 0.3)])), 0.99)
    assert list(ties["attn_lowest"]) == [False, False, False] and list(ties["attn_below_mlp"]) == [False, True, True]


def test_c1_counts_each_outcome_and_names_the_level():
    from test_claims import idim_rows

    idim = pd.DataFrame(idim_rows("b", [(0.4, 0.8, 0.9), (0.5, 0.8, 0.3), (0.40, 0.8, 0.43)])
                        + idim_rows("a", [(0.4, 0.8, 0.9)]))
    rows = c1(idim)
    assert [r["tested_on"].split(":")[0] for r in rows] == ["a/ds", "b/ds", "all"]  # the layers' table is sorted
    assert "in 1/3 layers, above another site in 1/3, inconclusive in 1/3" in rows[1]["measured"]
    assert rows[1]["verdict"] == INCONCLUSIVE
    no_level = c1(idim.drop(columns="level"))[0]["measured"]
    assert "mean fraction [mean interval]" in no_level and "%" not in no_level


def test_compare_with_an_empty_side_or_one_seed_cannot_tell():
    assert compare([], [1.0]) == 0 and compare([1.0], []) == 0 and compare([], [1.0], noise=0.1) == 0
    assert compare([np.nan, np.nan], [1.0, 1.1], noise=0.1) == 0  # no finite seed on one side
    assert compare([0.1, 0.2, 0.3], [0.9]) == 0 and compare([0.9], [0.1, 0.2, 0.3]) == 0
    assert compare([0.1, 0.2], [0.9, 1.0]) == -1  # two seeds a side are enough


def c2_curves(pairs: list[tuple[str, float, float]]) -> pd.DataFrame:
    from test_claims import wo_curve

    return pd.concat([wo_curve(model, 200, w, z) for model, w, z in pairs])


def test_c2_share_of_wo_and_a_tie_fails():
    from attnspace.claims import c2, tail_drops

    wo = c2_curves([("tie", 3.0, 3.0), ("more", 9.0, 3.0)])
    drops = tail_drops(wo).set_index("model")
    assert drops.loc["tie", "wo_share"] == 0.5 and drops.loc["more", "wo_share"] == pytest.approx(0.75)
    verdicts = {r["tested_on"]: r["verdict"] for r in c2(wo)}
    assert verdicts["tie/ds L3"] == FAILS  # W^O drops no more decades than Z: the tail is not W^O's
    assert verdicts["more/ds L3"] == HOLDS
    assert "W^O's share 75%" in [r for r in c2(wo) if r["tested_on"] == "more/ds L3"][0]["measured"]


def test_c2_both_terms_flat_has_no_share():
    from attnspace.claims import tail_drops

    assert np.isnan(tail_drops(c2_curves([("flat", 0.0, 0.0)]))["wo_share"].iloc[0])
    # O flat while W^O drops a decade and Z rises one (exact powers of ten): no share either
    i = np.arange(1, 21)
    opposite = pd.DataFrame(dict(model="m", dataset="ds", layer=3, i=i, var_o=1.0, wo_contrib=10.0 ** -i,
                                 z_contrib=10.0 ** i))
    drops = tail_drops(opposite)
    assert (drops["drop_wo"].iloc[0], drops["drop_z"].iloc[0]) == (1.0, -1.0) and np.isnan(drops["wo_share"].iloc[0])


def dead_table(model: str, sites=("resid_post", "attn_out", "mlp_out")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    idim = rng.random(9)
    return pd.DataFrame(dict(model=model, dataset="ds", layer=np.repeat([0, 1, 2], 3), site=list(sites) * 3,
                             dead_fraction=1 - idim, intrinsic_dim_fraction=idim))


@pytest.mark.parametrize("rho, p, verdict", [
    (-0.5, 0.01, HOLDS), (0.5, 0.01, FAILS), (0.0, 0.01, INCONCLUSIVE),
    (-0.5, 0.05, INCONCLUSIVE), (0.5, 0.05, INCONCLUSIVE),  # p must be below alpha = 0.05
])
def test_c3_rule_at_its_boundaries(monkeypatch, rho, p, verdict):
    from attnspace import dead_features
    from attnspace.claims import c3

    monkeypatch.setattr(dead_features, "dead_vs_dimension", lambda g: dict(spearman_rho=rho, p_value=p, n=len(g)))
    assert c3(dead_table("m"))[0]["verdict"] == verdict


def test_c3_rows_and_site_means_in_the_input_order():
    from attnspace.claims import c3

    rows = c3(pd.concat([dead_table("z"), dead_table("a")]))
    assert [r["tested_on"] for r in rows] == ["z/ds, 3 layers x 3 sites", "a/ds, 3 layers x 3 sites"]
    assert "mean dead fraction resid_post " in rows[0]["measured"]
    assert rows[0]["measured"].index("resid_post") < rows[0]["measured"].index("attn_out") < rows[0]["measured"].index("mlp_out")


def sweep_seeds(points: dict[int, dict[str, tuple[float, float, int]]]) -> pd.DataFrame:
    """Figure 6/7 runs, uncentred: per d_sae and variant (mean NMSE, seed sd, seeds); seeds 1 is a run once,
    2 sits at mean -+ sd / sqrt(2) and 3 at mean -sd, 0, +sd (seed sd exactly sd in both cases)."""
    offsets = {1: (0.0,), 2: (-1 / np.sqrt(2), 1 / np.sqrt(2)), 3: (-1.0, 0.0, 1.0)}
    rows = []
    for n, variants in points.items():
        for variant, (mean, sd, seeds) in variants.items():
            for seed, e in enumerate(offsets[seeds]):
                rows.append(dict(model="m", dataset="ds", layer=3, site="attn_out", run=f"{variant}-{n}-{seed}",
                                 variant=variant, init="x", d_init=16, d_sae=n, k=8, seed=seed, centred=False,
                                 nmse=mean + sd * e, dead_fraction=0.5, status="ok"))
    return pd.DataFrame(rows)


NOISY = {4096: dict(topk=(1.0, 0.05, 3), topk_auxk=(1.0, 0.05, 3), asi=(0.5, 0.05, 3))}
"""A replicated point with seed sd 0.05 (decided: 0.5 apart): the noise for points run once is 0.05."""


@pytest.mark.parametrize("seeds", [2, 3])
def test_c5_a_replicated_point_is_judged_on_its_own_seeds(seeds):
    # seed sd 0.01, ASI 0.05 below both: beyond 2 x its own sd (holds), within 2 x the noise 0.05
    point = {256: dict(topk=(0.30, 0.01, seeds), topk_auxk=(0.30, 0.01, seeds), asi=(0.25, 0.01, seeds))}
    (row,) = c5(sweep_seeds({**NOISY, **point}))
    assert "below both at 2/2" in row["measured"] and "seed sd 0.050" in row["measured"]


@pytest.mark.parametrize("once", ["asi", "topk", "topk_auxk"])
def test_c5_a_point_with_one_side_run_once_is_judged_against_the_noise(once):
    # ASI 0.2 below both; the noise (0.05) decides it; its own seeds could not (one side has one)
    point = {256: {v: (m, 0.01, 1 if v == once else 3) for v, m in (("topk", 0.5), ("topk_auxk", 0.5), ("asi", 0.3))}}
    (row,) = c5(sweep_seeds({**NOISY, **point}))
    assert "below both at 2/2" in row["measured"]


@pytest.mark.parametrize("topk, auxk, counts", [
    (0.5, 0.25, "below both at 1/2 points, above one at 0/2"),  # ASI (0.25) below TopK, tied with AuxK
    (0.25, 0.5, "below both at 1/2 points, above one at 0/2"),  # tied with TopK, below AuxK
    (0.5, 0.1, "below both at 1/2 points, above one at 1/2"),  # above AuxK only
    (0.1, 0.5, "below both at 1/2 points, above one at 1/2"),  # above TopK only
])
def test_c5_one_comparison_at_a_time(topk, auxk, counts):
    point = {256: dict(topk=(topk, 0.01, 3), topk_auxk=(auxk, 0.01, 3), asi=(0.25, 0.01, 3))}
    (row,) = c5(sweep_seeds({**NOISY, **point}))
    assert counts in row["measured"] and row["tested_on"] == "m/ds L3 attn_out"


def test_c5_ratio_to_the_better_rival():
    point = {256: dict(topk=(0.4, 0.01, 3), topk_auxk=(0.5, 0.01, 3), asi=(0.2, 0.01, 3))}
    (row,) = c5(sweep_seeds({**NOISY, **point}))
    assert "NMSE ASI / best of TopK, AuxK: 0.50-0.50 (median 0.50)" in row["measured"]  # 0.2 / 0.4 and 0.5 / 1.0


def test_c6_measured_and_tested_on_in_full():
    from attnspace.claims import c6

    (row,) = c6(fig7({"asi_sparseadam": 0.1, "topk": 0.8}, centred=True))
    assert row["tested_on"] == "m/ds L3 attn_out, k 8, centred"
    assert row["measured"] == "512 latents, centred, 3 seeds: dead fraction asi_sparseadam 0.10 ± 0.01, topk 0.80 ± 0.01"
    (row,) = c6(fig7({"asi_sparseadam": 0.1}, centred=False))  # no rival
    assert row["verdict"] == NOT_RUN and row["claim"] == "C6" and row["paper"] == c6(None)[0]["paper"]
    assert row["measured"] == "not run: no finished ASI + SparseAdam run and rival at the largest size"
    assert row["statement"] == c6(None)[0]["statement"] and row["test"] == c6(None)[0]["test"]


def test_ordering_at_every_n_needs_attention_strictly_below_both_at_the_threshold():
    from attnspace.claims import ordering_at_every_n

    def conv(trios, other_threshold=(0.9, 0.1, 0.1)):
        """Layer 0 at n = 100, 200, ...: (attn, mlp, resid) fractions at 0.99; at 0.5, other_threshold everywhere."""
        return pd.DataFrame([dict(model="m", dataset="ds", layer=0, site=site, threshold=t, n_tokens=100 * (i + 1),
                                  fraction=f)
                             for i, trio in enumerate(trios) for t, fs in ((0.99, trio), (0.5, other_threshold))
                             for site, f in zip(("attn_out", "mlp_out", "resid_post"), fs)])

    cases = [([(0.4, 0.8, 0.9)] * 2, 2), ([(0.4, 0.4, 0.9)] * 2, 0), ([(0.4, 0.8, 0.4)] * 2, 0),
             ([(0.4, 0.8, 0.3)] * 2, 0), ([(0.4, 0.8, 0.9), (0.4, 0.3, 0.9)], 1)]
    for trios, n_lowest in cases:  # ties and a site below attention are not lowest; the other threshold is ignored
        row = ordering_at_every_n(conv(trios), 0.99).iloc[0]
        assert (row["n_lowest"], row["n_subsamples"], bool(row["all_n"])) == (n_lowest, len(trios), n_lowest == 2)
        assert (row["min_tokens"], row["max_tokens"]) == (100, 200)
