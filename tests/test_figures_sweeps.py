"""Figures 6 and 7 from a synthetic runs table: the rows drawn are exactly the sweep's runs,
the power law is recovered from planted numbers, failed runs stay in and are named, and a
missing run is an error that names it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnspace.figures import fig6, fig7, power_law
from attnspace.sae.runs import RUN_COLUMNS, VARIANTS, parse_run_name, variant_of, variant_run

KEY = dict(model="m", dataset="ds", layer=3, site="attn_out")
V6 = ["topk", "topk_auxk", "asi"]
V7 = list(VARIANTS)
PLANTED = {"topk": (1.0, 0.2), "topk_auxk": (0.9, 0.22), "asi": (0.8, 0.3), "asi_sparseadam": (0.7, 0.35),
           "asi_maskedadam": (0.75, 0.33)}


def table(names: list[str], nmse) -> pd.DataFrame:
    rows = []
    for name in names:
        r = parse_run_name(name)
        rows.append({**KEY, "run": name, **r, "variant": variant_of(r["init"], r["optimizer"], r["auxk"]),
                     "nmse": nmse(r), "l0": r["k"], "dead_fraction": 0.5, "n_dead": r["d_sae"] // 2,
                     "delta_lm_loss": 0.1 / r["k"], "status": "ok"})
    return pd.DataFrame(rows).reindex(columns=RUN_COLUMNS)


def test_power_law_recovers_planted_coefficients():
    n = np.array([1000, 2000, 4000, 8000])
    assert power_law(n, 3.0 * n ** -0.4) == pytest.approx((3.0, 0.4))


def test_fig7_fits_each_variant_and_counts_alive_features():
    sizes = [256, 512, 1024, 2048]
    names = [variant_run(v, n, 8, 16) for v in V7 for n in sizes]
    noise = table([variant_run("asi", 512, 8, 32)], lambda r: 0.01)  # another d_init: not this sweep's
    runs = pd.concat([table(names, lambda r: PLANTED[variant_of(r["init"], r["optimizer"], r["auxk"])][0]
                            * r["d_sae"] ** -PLANTED[variant_of(r["init"], r["optimizer"], r["auxk"])][1]), noise])
    fig, data = fig7(runs, **KEY, sizes=sizes, k=8, d_init=16, variants=V7)
    assert list(data["run"]) == names  # exactly the sweep, in grid order
    for v, (a, b) in PLANTED.items():
        fit = data[data["variant"] == v][["fit_coefficient", "fit_exponent"]].drop_duplicates()
        assert len(fit) == 1 and fit.iloc[0].tolist() == pytest.approx([a, b])
    assert (data["n_alive"] == data["d_sae"] // 2).all()
    assert len(fig.axes) == 3


def test_a_failed_run_stays_in_the_data_and_is_named():
    sizes = [256, 512, 1024]
    names = [variant_run(v, n, 8, 16) for v in V7 for n in sizes]
    runs = table(names, lambda r: r["d_sae"] ** -0.25)
    bad = variant_run("asi_sparseadam", 1024, 8, 16)
    runs.loc[runs["run"] == bad, ["status", "nmse"]] = ["failed", None]
    fig, data = fig7(runs, **KEY, sizes=sizes, k=8, d_init=16, variants=V7)
    assert bad in set(data["run"]) and data.loc[data["run"] == bad, "status"].item() == "failed"
    assert bad in fig._suptitle.get_text()
    # the other two sizes of that variant still give a fit
    assert data.loc[data["variant"] == "asi_sparseadam", "fit_exponent"].notna().all()


def test_fig6_draws_every_variant_at_every_k_and_names_a_missing_run():
    ks = [4, 8, 16]
    names = [variant_run(v, 512, k, 16) for v in V6 for k in ks]
    runs = table(names, lambda r: 1.0 / r["k"])
    fig, data = fig6(runs, **KEY, d_sae=512, ks=ks, d_init=16, variants=V6)
    assert sorted(data["run"]) == sorted(names)
    assert set(zip(data["variant"], data["k"])) == {(v, k) for v in V6 for k in ks}
    assert sum(len(ax.lines) for ax in fig.axes) == 2 * len(V6) + 1  # one line per variant and panel, and y = 0
    with pytest.raises(ValueError, match="asi-d16-adam-n512-k16"):
        fig6(runs[runs["run"] != "asi-d16-adam-n512-k16"], **KEY, d_sae=512, ks=ks, d_init=16, variants=V6)


def test_variant_names_round_trip():
    for v in VARIANTS:
        r = parse_run_name(variant_run(v, 1024, 32, 128))
        assert variant_of(r["init"], r["optimizer"], r["auxk"]) == v
    assert variant_of("random_subspace", "adam", False) is None
    with pytest.raises(ValueError, match="unknown SAE variant"):
        variant_run("asi_auxk_magic", 1024, 32, 128)


def test_fig5_draws_only_the_inits_and_ignores_the_sweeps_other_variants():
    from attnspace.figures import fig5

    names = ["base-d0-adam-n512-k8", "asi-d16-adam-n512-k8", "random_subspace-d16-adam-n512-k8",
             "base-d0-adam-n512-k8-auxk", "asi-d16-sparse_adam-n512-k8"]  # the last two belong to the sweeps
    runs = table(names, lambda r: 0.5)
    _, data = fig5(runs, **KEY, d_sae=512, k=8, optimizer="adam")
    assert sorted(data["run"]) == sorted(names[:3])
