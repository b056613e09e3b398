"""``attnspace`` subcommands: Spectra, intrinsic-dimension tables, loss recovered and the W^O decomposition."""

from __future__ import annotations

import json
from pathlib import Path

from attnspace.cli.common import log, set_threads
from attnspace.defaults import schema_default


def cmd_spectrum(a):
    from attnspace.spectrum import compute_spectrum, save_spectrum, streamed_spectrum
    from attnspace.store import open_store

    if len(a.sites) != len(a.out):
        raise SystemExit(f"{len(a.sites)} --sites but {len(a.out)} --out paths; give one --out per site")
    if a.moments and a.layer is None:
        raise SystemExit("--moments needs --layer")
    set_threads(a.threads)
    store = open_store(Path(a.store)) if a.store else None
    for site, out in zip(a.sites, a.out):  # the sites of one layer in one job: one Python start-up
        if store is None:  # streamed: the groups were fixed when the moments were accumulated
            spec = streamed_spectrum(a.moments, a.layer, site, n_vectors=a.n_vectors, resamples=a.resamples,
                                     seed=a.seed)
        else:
            spec = compute_spectrum(store, site, threads=a.threads, n_vectors=a.n_vectors, resamples=a.resamples,
                                    groups=a.groups, seed=a.seed)
        save_spectrum(spec, out)
        log.info("%s %s: d=%d from %d tokens, %d bootstrap replicates over %d document groups", a.store or a.moments,
                 site, spec.singular_values.shape[0], spec.n_tokens, a.resamples, spec.n_groups)


def cmd_idim_table(a):
    from attnspace.files import write_csv
    from attnspace.spectrum import intrinsic_dim_frame

    write_csv(intrinsic_dim_frame(a.spectra, thresholds=a.thresholds, level=a.level), a.out)
    if a.out_convergence:
        from attnspace.spectrum import convergence_frame

        write_csv(convergence_frame(a.spectra, thresholds=a.thresholds), a.out_convergence)


def cmd_spectra_table(a):
    from attnspace.files import write_csv
    from attnspace.spectrum import spectra_frame

    write_csv(spectra_frame(a.spectra, json.loads(a.focus_layers)), a.out)


def cmd_loss_recovered(a):
    from attnspace.corpora import load_tokens
    from attnspace.files import write_csv
    from attnspace.interventions import basis_from_spectrum, run_loss_recovered
    from attnspace.models import load_model
    from attnspace.spectrum import load_keyed

    set_threads(a.threads)
    bases = {}
    for path, (key, spec) in zip(a.spectra, load_keyed(a.spectra)):
        if (key["model"], key["dataset"], key["layer"]) != (a.model, a.dataset, a.layer):
            raise SystemExit(f"{path} is not a spectrum of {a.model}/{a.dataset} layer {a.layer}")
        bases[key["site"]] = basis_from_spectrum(spec)
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
    from attnspace.wo_decomposition import analyse, analyse_moments

    if a.moments and not a.layers:
        raise SystemExit("--moments needs --layers")
    set_threads(a.threads)
    model, _ = load_model(a.model_dir, a.dtype)
    if a.moments:  # spectrum.mode: streamed
        decomposition, spectrum, summary = analyse_moments(model, a.moments, a.layers, model_name=a.model,
                                                           dataset=a.dataset, tau=a.threshold)
    else:
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


def add_commands(sub) -> None:
    s = sub.add_parser("spectrum", help="singular values, directions and bootstrap replicates of cached sites")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="the store's manifest (or .zarr) path (spectrum.mode: stored)")
    source.add_argument("--moments", help="the streamed moments' record, moments.json (spectrum.mode: streamed)")
    s.add_argument("--layer", type=int, help="the layer whose moments to read (with --moments)")
    s.add_argument("--sites", nargs="+", required=True)
    s.add_argument("--n-vectors", type=int)
    s.add_argument("--resamples", type=int, default=schema_default("spectrum.bootstrap.resamples"))
    s.add_argument("--groups", type=int, default=schema_default("spectrum.bootstrap.groups"))
    s.add_argument("--seed", type=int, default=schema_default("spectrum.bootstrap.seed"))
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", nargs="+", required=True, help="one .npz per site, in the order of --sites")
    s.set_defaults(func=cmd_spectrum)

    s = sub.add_parser("idim-table", help="intrinsic dimension table from spectra")
    s.add_argument("--spectra", nargs="+", required=True)
    s.add_argument("--thresholds", type=float, nargs="+", required=True)
    s.add_argument("--level", type=float, default=schema_default("spectrum.bootstrap.level"))
    s.add_argument("--out", required=True)
    s.add_argument("--out-convergence", help="also the intrinsic dimension at nested subsamples (csv)")
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
    s.add_argument("--spectra", nargs="+", required=True, help="spectra of the layer (.npz), one per site replaced")
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
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--stores", nargs="+", help="the stores' manifest (or .zarr) paths")
    source.add_argument("--moments", nargs="+", help="the streamed moments' records (moments.json: the spectrum "
                        "sites', Figure 3's) instead of stores (spectrum.mode: streamed)")
    s.add_argument("--layers", type=int, nargs="+", help="the layers to analyse (with --moments)")
    s.add_argument("--model", required=True)
    s.add_argument("--dataset", required=True)
    s.add_argument("--threshold", type=float, default=schema_default("spectrum.threshold"))
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--decomposition", required=True)
    s.add_argument("--spectrum", required=True)
    s.add_argument("--summary", required=True)
    s.set_defaults(func=cmd_wo_decomposition)

    s = sub.add_parser("concat-tables", help="concatenate CSV tables: --inputs a.csv b.csv --out ab.csv, repeatable")
    s.add_argument("--inputs", nargs="+", action="append", required=True)
    s.add_argument("--out", action="append", required=True)
    s.set_defaults(func=cmd_concat_tables)
