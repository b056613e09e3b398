"""``attnspace`` subcommands: Figures, the claims table, the README gallery and per-stage times."""

from __future__ import annotations

import json
from pathlib import Path

from attnspace.cli.common import log
from attnspace.defaults import schema_default

CLAIM_INPUTS = ("fig1", "fig3", "fig4", "fig5", "fig6", "fig7", "table1", "convergence")
"""The figures (and table) whose data the claims read."""


def cmd_figure(a):
    import pandas as pd

    from attnspace import figures

    if a.metrics:
        from attnspace.sae.runs import runs_table

        table = runs_table(a.metrics)
    elif a.spectra:
        from attnspace.spectrum import spectra_frame

        table = spectra_frame(a.spectra, json.loads(a.focus_layers or "{}"))
    elif a.spectra is not None and a.name == "fig8":  # one (model, dataset) pair: no other pair to draw
        table = pd.DataFrame({c: [] for c in (*figures.SPECTRA_COLUMNS, "focus")}).astype({"focus": bool})
    elif a.table:
        table = pd.concat([pd.read_csv(path) for path in a.table], ignore_index=True)
    else:
        raise SystemExit("figure: give --table, --spectra (fig2a, fig8) or --metrics (fig5, fig6, fig7)")
    if a.name in ("fig1", "fig9", "convergence"):
        from attnspace import figures_idim

        fig, data = (figures_idim.fig9(table, thresholds=tuple(a.thresholds)) if a.name == "fig9"
                     else getattr(figures_idim, a.name)(table, threshold=a.threshold))
    elif a.name == "fig2a":
        fig, data = figures.fig2a(table, a.model, a.dataset, a.layer)
    elif a.name == "fig8":
        # the rule gives only the other pairs' spectra; --model/--dataset name a pair to leave out
        fig, data = figures.fig8(table[table["focus"]], exclude=(a.model, a.dataset) if a.model else None)
    elif a.name == "fig2b":
        fig, data = figures.fig2b(table, pd.read_csv(a.summary))
    elif a.name == "fig3":
        fig, data = figures.fig3(table, json.loads(a.focus_layers), a.dataset)
    elif a.name == "fig4":
        from attnspace.dead_features import dead_vs_dimension

        fig, data = figures.fig4(table, dead_vs_dimension(table))
    elif a.name == "fig5":
        fig, data = figures.fig5(table, a.model, a.dataset, a.layer, a.site, a.d_sae, a.k, a.optimizer)
    elif a.name == "fig6":
        fig, data = figures.fig6(table, a.model, a.dataset, a.layer, a.site, a.expansion * a.d_model, a.k_list,
                                 a.d_init, a.variants)
    elif a.name == "fig7":
        fig, data = figures.fig7(table, a.model, a.dataset, a.layer, a.site,
                                 [e * a.d_model for e in a.expansions], a.k, a.d_init, a.variants, a.seeds, a.forms)
    else:
        raise SystemExit(f"unknown figure {a.name}")
    for path in figures.save_figure(fig, data, a.out):
        log.info("wrote %s", path)
    if a.caption:
        from attnspace.captions import caption
        from attnspace.files import write_text

        extra = {"summary": pd.read_csv(a.summary)} if a.name == "fig2b" else {}
        text = caption(a.name, Path(a.caption).read_text(), data, **extra)
        log.info("wrote %s", write_text(text, Path(a.out).with_suffix(".caption.rst")))


def cmd_claims(a):
    import pandas as pd

    from attnspace.claims import claims_markdown, claims_table
    from attnspace.files import write_csv, write_text

    data = {name: pd.read_csv(getattr(a, name)) if getattr(a, name) else None for name in CLAIM_INPUTS}
    table = claims_table(data, threshold=a.threshold)
    write_csv(table, a.out_csv)
    write_text(claims_markdown(table), a.out_md)
    for r in table.itertuples(index=False):
        log.info("%s %s: %s (%s)", r.claim, r.tested_on, r.verdict, r.measured)


def cmd_gallery(a):
    import os

    from attnspace.files import write_text
    from attnspace.gallery import gallery_markdown, shrink_png, update_readme

    if len(a.figures) != len(a.captions):
        raise SystemExit("gallery: give one --captions file per --figures file, in the same order")
    out = Path(a.out_dir)
    readme_dir = Path(a.readme).resolve().parent
    entries = []
    for png, caption in zip(a.figures, a.captions):
        small = shrink_png(png, out / Path(png).name, a.width)
        entries.append((Path(png).stem, Path(os.path.relpath(small.resolve(), readme_dir)).as_posix(),
                        Path(caption).read_text()))
    claims = Path(a.claims).read_text()
    write_text(claims, out / "claims.md")
    if update_readme(a.readme, {"gallery": gallery_markdown(entries), "claims": claims}):
        log.info("refreshed the gallery and claims blocks of %s", a.readme)


def cmd_plan(a):
    from attnspace.config import check_models_on_disk, load_config
    from attnspace.files import write_csv
    from attnspace.cli import build_parser
    from attnspace.plan import check_device_memory, peaks_markdown, plan_jobs, planned_commands, summary, summary_markdown

    snakefile = Path(a.snakefile).resolve()
    configfile = Path(a.configfile).resolve() if a.configfile else None
    config = load_config(configfile or snakefile.parent / "config.yaml")
    check_models_on_disk(config, Path(a.directory))
    jobs = plan_jobs(planned_commands(snakefile, configfile, Path(a.directory), a.targets), config,
                     build_parser(), root=Path(a.directory))
    if a.csv:
        write_csv(jobs, a.csv)
    print(summary_markdown(summary(jobs)), end="")
    peaks = peaks_markdown(jobs, config)
    if peaks:
        print(f"\nPeak GPU memory per job (bench/results/memory_paper.csv, attnspace.sae.group.training_bytes):\n{peaks}",
              end="")
    check_device_memory(jobs, config)


def cmd_config_keys(a):
    from attnspace.defaults import config_keys_markdown

    print(config_keys_markdown(), end="")


def cmd_stage_times(a):
    from attnspace.stage_times import stage_times, stage_times_markdown

    print(stage_times_markdown(stage_times(a.root)))


def add_commands(sub) -> None:
    s = sub.add_parser("figure", help="draw one figure (pdf, png and its csv)")
    s.add_argument("name", choices=["fig1", "fig2a", "fig2b", "fig3", "fig4", "fig5", "fig6", "fig7", "fig8", "fig9",
                                    "convergence"])
    s.add_argument("--table", nargs="+", help="the table(s) behind the figure (csv; several are concatenated)")
    s.add_argument("--metrics", nargs="+", help="fig5, fig6, fig7: the runs' metrics.json files (instead of --table)")
    s.add_argument("--spectra", nargs="*", help="fig2a, fig8: the spectra drawn (.npz; instead of --table); "
                                                "fig8 with none (one model and dataset) draws a note")
    s.add_argument("--threshold", type=float, default=schema_default("spectrum.threshold"),
                   help="fig1, convergence: the variance threshold")
    s.add_argument("--thresholds", type=float, nargs="+", default=schema_default("figures.fig9.thresholds"),
                   help="fig9: the variance thresholds")
    s.add_argument("--model")
    s.add_argument("--dataset")
    s.add_argument("--layer", type=int)
    s.add_argument("--summary", help="fig2b: the loss-recovered summary table")
    s.add_argument("--focus-layers", help='fig3, fig8: JSON {model: layer}')
    s.add_argument("--site", help="fig5: the SAEs' site")
    s.add_argument("--d-sae", type=int, help="fig5: the SAEs' size")
    s.add_argument("--k", type=int, help="fig5, fig7: the SAEs' k")
    s.add_argument("--optimizer", default="adam", help="fig5: the SAEs' optimizer")
    s.add_argument("--d-model", type=int, help="fig6/fig7: the site's width (sizes are expansions of it)")
    s.add_argument("--k-list", type=int, nargs="+", help="fig6: the values of k on its frontier")
    s.add_argument("--expansion", type=int, help="fig6: the size, as a multiple of d_model")
    s.add_argument("--expansions", type=int, nargs="+", help="fig7: the sizes, as multiples of d_model")
    s.add_argument("--d-init", type=int, help="fig6/fig7: ASI's subspace dimension")
    s.add_argument("--variants", nargs="+", help="fig6/fig7: the variants drawn")
    s.add_argument("--seeds", type=int, default=1, help="fig7: seeds at the largest size")
    s.add_argument("--forms", nargs="+", default=["uncentred"], help="fig7: forms at the largest size")
    s.add_argument("--caption", help="the figure's fixed caption (rst); writes <out stem>.caption.rst with the numbers")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_figure)

    s = sub.add_parser("claims", help="the claims table: each claim of the paper, measured, with a verdict")
    for name in CLAIM_INPUTS:
        s.add_argument(f"--{name}", help=f"the data behind {name} (csv); absent: the claim is 'not run'")
    s.add_argument("--threshold", type=float, default=schema_default("spectrum.threshold"),
                   help="C1's variance threshold")
    s.add_argument("--out-csv", required=True)
    s.add_argument("--out-md", required=True)
    s.set_defaults(func=cmd_claims)

    s = sub.add_parser("gallery", help="small figure PNGs and the claims table under docs/gallery, README blocks")
    s.add_argument("--figures", nargs="+", required=True, help="figure PNGs")
    s.add_argument("--captions", nargs="+", required=True, help="their fixed captions (rst), same order")
    s.add_argument("--claims", required=True, help="results/claims.md")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--width", type=int, default=900, help="pixels")
    s.add_argument("--readme", default="README.md", help="README whose generated blocks to refresh (if it exists)")
    s.set_defaults(func=cmd_gallery)

    s = sub.add_parser("stage-times", help="per-stage job counts, times and memory from the benchmark files")
    s.add_argument("root", nargs="?", default="results/benchmarks")
    s.set_defaults(func=cmd_stage_times)

    s = sub.add_parser("config-keys", help="every configuration key with its default and meaning (Markdown)")
    s.set_defaults(func=cmd_config_keys)

    s = sub.add_parser("plan", help="disk, activation rows, model-forward tokens, optimizer steps and GPU-hours "
                                    "of a configuration, per stage, before anything runs")
    s.add_argument("targets", nargs="*", help="plan only these targets (default: the whole run)")
    s.add_argument("--configfile", help="the configuration (default: the embedded config.yaml)")
    s.add_argument("--snakefile", default=str(Path(__file__).resolve().parents[3] / "Snakefile"))
    s.add_argument("--directory", default=".", help="the working directory the run would use")
    s.add_argument("--csv", help="write one row per job here as well")
    s.set_defaults(func=cmd_plan)
