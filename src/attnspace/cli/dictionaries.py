"""``attnspace`` subcommands: Sparse dictionaries: SAE training and its runs table, dead features of any
LlamaScope-format SAE (and the suite table), Lorsa and Table 1."""

from __future__ import annotations

import json
from pathlib import Path

from attnspace.cli.common import device, given, log, set_threads
from attnspace.defaults import schema_default


def cmd_train_sae(a):
    from attnspace.models import load_model
    from attnspace.sae.config import SAETrainConfig
    from attnspace.sae.runs import parse_run_name
    from attnspace.sae.train import train_sae
    from attnspace.spectrum import load_spectrum
    from attnspace.store import open_store

    set_threads(a.threads)
    run = parse_run_name(a.run)
    config = SAETrainConfig(
        site=a.site, d_sae=run["d_sae"], k=run["k"], init=run["init"], d_init=run["d_init"],
        optimizer=run["optimizer"], auxk=run["auxk"], centred=run["centred"], device=device(),
        **given(lr=a.lr, auxk_alpha=a.auxk_alpha, k_aux=a.k_aux, dead_threshold_tokens=a.dead_threshold_tokens,
                batch_size=a.batch_size, train_tokens=a.train_tokens, buffer_rows=a.buffer_rows,
                eval_tokens=a.eval_tokens, seed=a.seed, checkpoint_every=a.checkpoint_every,
                log_every=a.log_every))
    if a.live_source and not (a.model_dir and a.tokens and a.layer is not None):
        raise SystemExit("--live-source needs --model-dir, --tokens and --layer (the model to run and its documents)")
    train, heldout = open_store(Path(a.store)), open_store(Path(a.heldout))
    model = None
    if a.model_dir and (a.lm_eval_tokens or a.live_source):
        model, _ = load_model(a.model_dir, a.dtype)  # on the GPU when there is one; one copy for the live stream and the LM loss
    lm_eval = None
    if a.lm_eval_tokens and model:
        from attnspace.interventions import spliced_lm_eval

        lm_eval = spliced_lm_eval(model, a.tokens, a.layer, a.site, a.lm_eval_tokens)
    stream = train
    if a.live_source:
        from attnspace.sae.live import live_stream

        stream = live_stream(model, tokens_path=a.tokens, model_dir=a.model_dir, source=json.loads(a.live_source),
                             source_seed=a.live_seed, layer=a.layer, site=a.site, batch_docs=a.live_batch_docs,
                             d=train.width(a.site), batch_size=config.batch_size, buffer_rows=config.buffer_rows,
                             seed=config.seed)
    try:
        metrics = train_sae(config, stream, heldout, Path(a.out_dir),
                            spectrum=load_spectrum(a.spectrum) if a.spectrum else None, lm_eval=lm_eval,
                            info=dict(model=train.model, dataset=train.dataset, layer=train.layer, run=a.run,
                                      source="live" if a.live_source else "cache"))
    finally:
        if a.live_source:
            stream.close()
    if metrics["status"] != "ok":
        log.error("%s: failed (%s); recorded in metrics.json", a.run, metrics["failure"])
        return
    log.info("%s: nmse %.4f, dead %.3f, l0 %.1f, %.0f tok/s", a.run, metrics["nmse"], metrics["dead_fraction"],
             metrics["l0"], metrics["tokens_per_second"])


def cmd_sae_runs_table(a):
    from attnspace.files import write_csv
    from attnspace.sae.runs import runs_table

    write_csv(runs_table(a.metrics), a.out)


def cmd_dead_features(a):
    from attnspace.dead_features import evaluate_dead_features
    from attnspace.files import write_json
    from attnspace.llamascope import load_llamascope
    from attnspace.store import open_store

    store = open_store(Path(a.activations))
    sae = load_llamascope(a.sae_dir, d_model=store.width(a.site))
    record = evaluate_dead_features(sae, store, a.site, n_tokens=a.tokens)
    key = {"model": store.model, "dataset": store.dataset, "layer": store.layer, "site": a.site}
    record = {"sae": str(a.sae_dir), "activations": str(a.activations), **key, **record}
    if a.out:
        write_json(record, a.out)
    print(json.dumps(record, indent=2))


def cmd_dead_features_table(a):
    from attnspace.dead_features import dead_features_table
    from attnspace.files import write_csv
    from attnspace.spectrum import intrinsic_dim_frame

    records = [json.loads(Path(path).read_text()) for path in a.records]
    idim = intrinsic_dim_frame(a.spectra, thresholds=[a.threshold])
    write_csv(dead_features_table(records, idim, a.threshold), a.out)


def cmd_fetch_llamascope(a):
    from attnspace.llamascope import fetch_llamascope

    fetch_llamascope(a.repo, a.folder, Path(a.out_dir), revision=a.revision)


def cmd_export_sae(a):
    from attnspace.interop import export_sae
    from attnspace.llamascope import LlamaScopeError

    try:
        out = export_sae(a.sae_dir, a.to, a.out_dir)
    except (LlamaScopeError, FileExistsError) as err:
        raise SystemExit(f"export-sae: {err}") from None
    log.info("%s -> %s (%s)", a.sae_dir, out, a.to)


def cmd_train_lorsa(a):
    from transformers import AutoConfig

    from attnspace.lorsa import LorsaConfig, train_lorsa
    from attnspace.spectrum import load_spectrum
    from attnspace.store import open_store

    set_threads(a.threads)
    config = LorsaConfig(n_ov_heads=a.n_ov_heads, n_qk_heads=a.n_qk_heads, k=a.k,
                         **given(d_qk=a.d_qk, d_init=a.d_init, lr=a.lr, n_epochs=a.epochs,
                                 batch_tokens=a.batch_tokens))
    seed = schema_default("lorsa.seed") if a.seed is None else a.seed
    metrics = train_lorsa(config, open_store(Path(a.store)), open_store(Path(a.heldout)),
                          load_spectrum(a.spectrum), a.init, seed,
                          model_config=AutoConfig.from_pretrained(a.model_dir), out_dir=Path(a.out_dir),
                          device=device())
    log.info("lorsa %s: dead heads %d, dead params %.3f, nmse %.4f", a.init, metrics["dead_heads"],
             metrics["dead_param_fraction"], metrics["nmse"])


def cmd_lorsa_table(a):
    from attnspace.files import write_csv, write_text
    from attnspace.lorsa import table1_frame, table1_markdown

    frame = table1_frame([json.loads(Path(p).read_text()) for p in a.metrics])
    write_csv(frame, a.csv)
    write_text(table1_markdown(frame) + "\n", a.md)


def add_commands(sub) -> None:
    s = sub.add_parser("train-sae", help="train, evaluate and save one TopK SAE on a cached site")
    s.add_argument("--store", required=True, help="training store (manifest or .zarr)")
    s.add_argument("--heldout", required=True, help="held-out store for NMSE, L0 and dead features")
    s.add_argument("--spectrum", help="the site's spectrum (.npz): ASI's basis")
    s.add_argument("--site", required=True)
    s.add_argument("--run", required=True, help="init-d<d_init>-optimizer-n<d_sae>-k<k>[-auxk][-c][-r<replicate>]")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--train-tokens", type=int)
    s.add_argument("--buffer-rows", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--eval-tokens", type=int)
    s.add_argument("--k-aux", type=int)
    s.add_argument("--auxk-alpha", type=float)
    s.add_argument("--dead-threshold-tokens", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--checkpoint-every", type=int)
    s.add_argument("--log-every", type=int)
    s.add_argument("--model-dir", help="prepared model, for the LM loss with the SAE spliced in")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--tokens", help="token file with the held-out split")
    s.add_argument("--layer", type=int)
    s.add_argument("--lm-eval-tokens", type=int, default=0)
    s.add_argument("--live-source", help="train on live model activations of this dataset source (JSON, as in "
                   "config datasets.*.source) instead of the cache; needs --model-dir, --tokens, --layer")
    s.add_argument("--live-seed", type=int, default=0, help="the tokens stage's seed (document order)")
    s.add_argument("--live-batch-docs", type=int, default=8, help="documents per live forward pass")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_train_sae)

    s = sub.add_parser("sae-runs-table", help="one row per trained SAE from its metrics.json")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_sae_runs_table)

    s = sub.add_parser("dead-features", help="dead features of any LlamaScope-format SAE on a cached store")
    s.add_argument("sae_dir", help="SAE folder: LlamaScope layout, SAELens (cfg.json) or llamascopium (config.json)")
    s.add_argument("activations", help="activation store (.zarr or its manifest)")
    s.add_argument("--site", required=True)
    s.add_argument("--tokens", type=int, help="evaluate the first N kept (non-BOS/EOS) tokens; default all")
    s.add_argument("--out", help="write the JSON record here as well")
    s.set_defaults(func=cmd_dead_features)

    s = sub.add_parser("dead-features-table", help="dead features beside intrinsic dimension, per layer and site")
    s.add_argument("--records", nargs="+", required=True, help="dead-features records (JSON)")
    s.add_argument("--spectra", nargs="+", required=True, help="spectra of the same sites (.npz)")
    s.add_argument("--threshold", type=float, default=schema_default("spectrum.threshold"),
                   help="variance threshold of the intrinsic dimension")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_dead_features_table)

    s = sub.add_parser("fetch-llamascope", help="download one layer's folder of a released LlamaScope suite")
    s.add_argument("--repo", required=True)
    s.add_argument("--folder", required=True)
    s.add_argument("--revision")
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_fetch_llamascope)

    s = sub.add_parser("export-sae", help="write an SAE folder for SAELens or llamascopium (docs/interop.md)")
    s.add_argument("sae_dir", help="SAE folder: LlamaScope layout (this pipeline), SAELens or llamascopium")
    s.add_argument("--to", required=True, choices=["saelens", "llamascopium"])
    s.add_argument("out_dir", help="new folder to write (must not exist)")
    s.set_defaults(func=cmd_export_sae)

    s = sub.add_parser("train-lorsa", help="train and evaluate one Lorsa (vanilla or ASI)")
    s.add_argument("--store", required=True)
    s.add_argument("--heldout", required=True)
    s.add_argument("--spectrum", required=True, help="attn_out spectrum (.npz) of the layer")
    s.add_argument("--model-dir", required=True, help="prepared model (its config gives RoPE)")
    s.add_argument("--init", choices=["vanilla", "asi"], required=True)
    s.add_argument("--n-ov-heads", type=int, required=True)
    s.add_argument("--n-qk-heads", type=int, required=True)
    s.add_argument("--d-qk", type=int)
    s.add_argument("--k", type=int, required=True)
    s.add_argument("--d-init", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-tokens", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_train_lorsa)

    s = sub.add_parser("lorsa-table", help="Table 1 (csv and markdown) from Lorsa metrics")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--csv", required=True)
    s.add_argument("--md", required=True)
    s.set_defaults(func=cmd_lorsa_table)
