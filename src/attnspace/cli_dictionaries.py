"""``attnspace`` subcommands for sparse dictionaries: SAE training, the runs table,
dead-feature evaluation of LlamaScope-format SAEs (and the suite table), Lorsa.

Registered on the main parser by :func:`add_commands`; each command wraps one
library function.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from attnspace.cli import _threads

log = logging.getLogger("attnspace")

DEAD_RECORD_PATH = re.compile(r"(?P<model>[^/]+)/(?P<dataset>[^/]+)/L(?P<layer>\d+)/(?P<site>[a-z_]+)\.json$")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def spliced_lm_eval(model, tokens_path: str, layer: int, site: str, n_tokens: int):
    """An ``lm_eval`` hook for train_sae: LM loss on held-out tokens with ``site`` replaced.

    Returns a callable taking the SAE's raw-scale reconstruction function and returning
    delta_lm_loss (spliced - clean, nats) and lm_loss_recovered (vs zero ablation).
    """
    from attnspace.corpora import load_tokens
    from attnspace.interventions import Variant, fraction_recovered, heldout_documents, variant_losses

    splits, meta = load_tokens(tokens_path)
    documents = heldout_documents(splits["heldout"], n_tokens)
    special = set(meta["special_ids"])

    def lm_eval(reconstruct) -> dict:
        variants = [Variant(), Variant(site), Variant(site, replace=reconstruct)]
        (clean, zero, spliced), n_scored = variant_losses(model, documents, layer, variants, {}, special, batch=3)
        return dict(lm_loss_clean=float(clean), lm_loss_zero=float(zero), lm_loss_spliced=float(spliced),
                    delta_lm_loss=float(spliced - clean),
                    lm_loss_recovered=float(fraction_recovered(spliced, clean, zero)), lm_eval_tokens=n_scored)

    return lm_eval


def live_stream(model, a, d: int):
    """Training batches from the live model (``sae.source: live``): the documents after the
    held-out split (same order as the tokens stage), prefetched in a background thread."""
    from transformers import AutoTokenizer

    from attnspace.corpora import load_tokens, training_documents
    from attnspace.sae.data import LiveStream
    from attnspace.sae.live import live_producer

    splits, meta = load_tokens(a.tokens)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    docs = training_documents(json.loads(a.live_source), a.live_seed, tokenizer,
                              max_doc_tokens=int(meta["max_doc_tokens"]), heldout_tokens=splits["heldout"].n_tokens)
    produce = live_producer(model, docs, a.layer, a.site, set(meta["special_ids"]), batch_docs=a.live_batch_docs)
    return LiveStream(produce, d, a.batch_size, a.buffer_rows, a.seed)


def cmd_train_sae(a):
    from attnspace.models import load_model
    from attnspace.sae.config import SAETrainConfig
    from attnspace.sae.runs import parse_run_name
    from attnspace.sae.train import train_sae
    from attnspace.spectrum import load_spectrum
    from attnspace.store import open_store

    _threads(a.threads)
    run = parse_run_name(a.run)
    device = _device()
    config = SAETrainConfig(
        site=a.site, d_sae=run["d_sae"], k=run["k"], init=run["init"], d_init=run["d_init"],
        optimizer=run["optimizer"], lr=a.lr, auxk=run["auxk"], auxk_alpha=a.auxk_alpha, k_aux=a.k_aux,
        dead_threshold_tokens=a.dead_threshold_tokens, batch_size=a.batch_size, train_tokens=a.train_tokens,
        buffer_rows=a.buffer_rows, eval_tokens=a.eval_tokens, seed=a.seed,
        checkpoint_every=a.checkpoint_every, log_every=a.log_every, device=device)
    if a.live_source and not (a.model_dir and a.tokens and a.layer is not None):
        raise SystemExit("--live-source needs --model-dir, --tokens and --layer (the model to run and its documents)")
    train, heldout = open_store(Path(a.store)), open_store(Path(a.heldout))
    model = None
    if a.model_dir and (a.lm_eval_tokens or a.live_source):
        model, _ = load_model(a.model_dir, a.dtype)  # on the GPU when there is one; one copy for the live stream and the LM loss
    lm_eval = spliced_lm_eval(model, a.tokens, a.layer, a.site, a.lm_eval_tokens) if a.lm_eval_tokens and model else None
    stream = live_stream(model, a, train.width(a.site)) if a.live_source else train
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
    record = {"sae": str(a.sae_dir), "activations": str(a.activations), "site": a.site, **record}
    if a.out:
        write_json(record, a.out)
    print(json.dumps(record, indent=2))


def cmd_dead_features_table(a):
    import pandas as pd

    from attnspace.dead_features import dead_features_table
    from attnspace.files import write_csv

    records = []
    for path in a.records:
        m = DEAD_RECORD_PATH.search(str(path))
        if not m:
            raise SystemExit(f"{path} is not named dead_features/{{model}}/{{dataset}}/L{{layer}}/{{site}}.json")
        records.append({**json.loads(Path(path).read_text()), **m.groupdict(), "layer": int(m["layer"])})
    write_csv(dead_features_table(records, pd.read_csv(a.idim)), a.out)


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

    _threads(a.threads)
    config = LorsaConfig(n_ov_heads=a.n_ov_heads, n_qk_heads=a.n_qk_heads, d_qk=a.d_qk, k=a.k, d_init=a.d_init,
                         lr=a.lr, n_epochs=a.epochs, batch_tokens=a.batch_tokens)
    metrics = train_lorsa(config, open_store(Path(a.store)), open_store(Path(a.heldout)),
                          load_spectrum(a.spectrum), a.init, a.seed,
                          model_config=AutoConfig.from_pretrained(a.model_dir), out_dir=Path(a.out_dir),
                          device=_device())
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
    s.add_argument("--run", required=True, help="init-d<d_init>-optimizer-n<d_sae>-k<k>[-auxk]")
    s.add_argument("--batch-size", type=int, default=4096)
    s.add_argument("--train-tokens", type=int, required=True)
    s.add_argument("--buffer-rows", type=int, default=262144)
    s.add_argument("--lr", type=float)
    s.add_argument("--eval-tokens", type=int, default=10_000_000)
    s.add_argument("--k-aux", type=int, default=512)
    s.add_argument("--auxk-alpha", type=float, default=1 / 32)
    s.add_argument("--dead-threshold-tokens", type=int, default=10_000_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-every", type=int, default=1000)
    s.add_argument("--log-every", type=int, default=10)
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
    s.add_argument("--records", nargs="+", required=True)
    s.add_argument("--idim", required=True)
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
    s.add_argument("--d-qk", type=int, default=64)
    s.add_argument("--k", type=int, required=True)
    s.add_argument("--d-init", type=int, default=128)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--batch-tokens", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_train_lorsa)

    s = sub.add_parser("lorsa-table", help="Table 1 (csv and markdown) from Lorsa metrics")
    s.add_argument("--metrics", nargs="+", required=True)
    s.add_argument("--csv", required=True)
    s.add_argument("--md", required=True)
    s.set_defaults(func=cmd_lorsa_table)
