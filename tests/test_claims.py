"""The claims table on planted data: each claim's verdict follows its stated test, the numbers
match independent computations, absent data gives 'not run'; captions, the README gallery
blocks and the stage-times table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnspace.claims import (COLUMNS, FAILS, HOLDS, NOT_RUN, c1, c2, c3, c4, c5, c6, c7, claims_markdown,
                              claims_table, tail_drops)


def idim_rows(model: str, fractions: list[tuple[float, float, float]]) -> list[dict]:
    rows = []
    for layer, trio in enumerate(fractions):
        for site, f in zip(("attn_out", "mlp_out", "resid_post"), trio):
            rows.append(dict(model=model, dataset="ds", layer=layer, site=site, threshold=0.99, fraction=f))
            rows.append(dict(model=model, dataset="ds", layer=layer, site=site, threshold=0.5, fraction=1 - f))
    return rows


def test_c1_majority_of_layers_per_pair_and_overall():
    idim = pd.DataFrame(idim_rows("a", [(0.4, 0.8, 0.9)] * 3) + idim_rows("b", [(0.5, 0.8, 0.3)] * 2 + [(0.2, 0.8, 0.3)]))
    rows = {r["tested_on"].split(":")[0]: r for r in c1(idim)}
    assert rows["a/ds"]["verdict"] == HOLDS and "3/3" in rows["a/ds"]["measured"]
    assert rows["b/ds"]["verdict"] == FAILS and "1/3" in rows["b/ds"]["measured"]
    assert rows["all"]["verdict"] == HOLDS and "4/6" in rows["all"]["measured"]  # 4 of 6 is a strict majority


def test_c1_half_is_not_a_majority():
    idim = pd.DataFrame(idim_rows("a", [(0.4, 0.8, 0.9), (0.5, 0.8, 0.3)]))
    assert c1(idim)[0]["verdict"] == FAILS


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
    assert c3(table.assign(dead_fraction=idim))[0]["verdict"] == FAILS  # positive correlation


def runs(rows: list[tuple]) -> pd.DataFrame:
    out = []
    for run, variant, init, d_init, d_sae, k, nmse, dead in rows:
        out.append(dict(model="m", dataset="ds", layer=3, site="attn_out", run=run, variant=variant, init=init,
                        d_init=d_init, d_sae=d_sae, k=k, nmse=nmse, dead_fraction=dead, status="ok"))
    return pd.DataFrame(out)


def test_c4_needs_asi_below_both_the_control_and_base_at_most_d_init():
    fig5 = runs([("b", "topk", "base", None, 512, 8, 0.4, 0.6),
                 ("a1", "asi", "asi", 8, 512, 8, 0.3, 0.7), ("r1", None, "random_subspace", 8, 512, 8, 0.4, 0.8),
                 ("a2", "asi", "asi", 16, 512, 8, 0.3, 0.5), ("r2", None, "random_subspace", 16, 512, 8, 0.4, 0.8),
                 ("a3", "asi", "asi", 32, 512, 8, 0.3, 0.4), ("r3", None, "random_subspace", 32, 512, 8, 0.4, 0.8)])
    row = c4(fig5)[0]
    assert row["verdict"] == HOLDS and "2/3" in row["measured"]
    fig5.loc[fig5["run"] == "a3", "dead_fraction"] = 0.9
    assert c4(fig5)[0]["verdict"] == FAILS


def test_c5_and_c6_on_sweep_points():
    sweep = runs([(f"{v}-{n}", v, "x", 16, n, 8, nmse, dead)
                  for n, vals in {256: (0.30, 0.31, 0.25, 0.24), 512: (0.28, 0.27, 0.29, 0.22)}.items()
                  for v, nmse, dead in zip(("topk", "topk_auxk", "asi", "asi_sparseadam"), vals,
                                           (0.5, 0.4, 0.6, 0.3))])
    row = c5(sweep)[0]
    assert "1/2" in row["measured"] and row["verdict"] == FAILS
    assert c6(sweep)[0]["verdict"] == HOLDS and "512 latents" in c6(sweep)[0]["measured"]
    sweep.loc[sweep["run"] == "asi_sparseadam-512", "dead_fraction"] = 0.4  # ties with AuxK: not fewest
    assert c6(sweep)[0]["verdict"] == FAILS


def test_c7_needs_both_dead_parameters_and_nmse_lower():
    t = pd.DataFrame(dict(model="m", dataset="ds", layer=3, init=["vanilla", "asi"], dead_param_fraction=[0.6, 0.4],
                          nmse=[0.2, 0.19]))
    assert c7(t)[0]["verdict"] == HOLDS
    assert c7(t.assign(nmse=[0.2, 0.21]))[0]["verdict"] == FAILS


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
