"""``attnspace`` subcommands: Sparse dictionaries: SAE training and its runs table, dead features of any
LlamaScope-format SAE (and the suite table), Lorsa and Table 1."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from attnspace.cli.common import device, given, log, set_threads
from attnspace.defaults import schema_default


def sae_config(a):
    """The SAETrainConfig of one train-sae command's arguments (the run name gives the architecture)."""
    from attnspace.errors import AttnspaceError
    from attnspace.sae.config import SAETrainConfig
    from attnspace.sae.runs import parse_run_name

    try:
        run = parse_run_name(a.run)
    except ValueError as err:
        raise AttnspaceError(str(err), fix="name the run as rules/common.smk does (attnspace.sae.runs.run_name)") from None
    return SAETrainConfig(
        site=a.site, d_sae=run["d_sae"], k=run["k"], init=run["init"], d_init=run["d_init"],
        optimizer=run["optimizer"], auxk=run["auxk"], centred=run["centred"], device=member_device(a),
        **given(lr=a.lr, auxk_alpha=a.auxk_alpha, k_aux=a.k_aux, dead_threshold_tokens=a.dead_threshold_tokens,
                batch_size=a.batch_size, train_tokens=a.train_tokens, buffer_rows=a.buffer_rows,
                eval_tokens=a.eval_tokens, seed=a.seed, data_seed=a.data_seed,
                checkpoint_every=a.checkpoint_every, log_every=a.log_every))


def member_device(a) -> str:
    """A run's device: ``cuda:<--gpu>`` where a GPU is visible and the run names one (a group's
    members spread over a node's GPUs), else :func:`attnspace.cli.common.device`."""
    base = device()
    gpu = getattr(a, "gpu", None)
    return f"{base}:{gpu}" if base == "cuda" and gpu is not None else base


def member_commands(argv: list[str]) -> list[list[str]]:
    """Each member's ``train-sae`` argv of a ``train-sae-group`` argv (program name left out): the
    shared options, then the member's own. Trained alone, that command gives the member's result."""
    if not argv or argv[0] != "train-sae-group":
        raise ValueError(f"not a train-sae-group command: {argv[:1]}")
    shared, members, i = [], [], 1
    while i < len(argv):
        if argv[i] == "--member" and i + 1 < len(argv):
            members.append(shlex.split(argv[i + 1]))
            i += 2
        elif argv[i].startswith("--member="):
            members.append(shlex.split(argv[i].split("=", 1)[1]))
            i += 1
        else:
            shared.append(argv[i])
            i += 1
    return [["train-sae", *shared, *own] for own in members]


def _train_members(shared, members: list) -> list[dict]:
    """Train (config, member arguments) pairs on one stream per the shared arguments; their metrics."""
    import torch

    from attnspace.models import load_model
    from attnspace.sae.group import Member, train_sae_group
    from attnspace.sae.sharded import train_sharded
    from attnspace.spectrum import load_spectrum
    from attnspace.store import open_store

    if getattr(shared, "ranks", 1) < 1:
        from attnspace.errors import AttnspaceError

        raise AttnspaceError(f"--ranks {shared.ranks}: a job trains on one or more ranks", fix="give --ranks 1 or more")
    if getattr(shared, "ranks", 1) > 1 and not _in_rank():
        return _launch_ranks(shared, members)
    set_threads(shared.threads)
    if shared.live_source and not (shared.model_dir and shared.tokens and shared.layer is not None):
        raise SystemExit("--live-source needs --model-dir, --tokens and --layer (the model to run and its documents)")
    # A live stream reads no training rows: the held-out store (same model, dataset, layer and site)
    # says what the stream is, so the train split need not be stored (spectrum.mode: streamed).
    heldout = open_store(Path(shared.heldout))
    train = heldout if shared.live_source else open_store(Path(shared.store))
    reader = not _in_rank() or torch.distributed.get_rank() == 0  # runs a live stream (a sharded job's rank 0)
    model = None
    if shared.model_dir and ((shared.live_source and reader) or any(m.lm_eval_tokens for _, m in members)):
        model, _ = load_model(shared.model_dir, shared.dtype)  # one copy for the live stream and the LM losses
    spectrum = load_spectrum(shared.spectrum) if shared.spectrum else None
    inputs = _stream_inputs(shared, train)
    group = []
    for config, m in members:
        lm_eval = None
        if m.lm_eval_tokens and model:
            from attnspace.interventions import spliced_lm_eval

            lm_eval = spliced_lm_eval(model, shared.tokens, shared.layer, shared.site, m.lm_eval_tokens)
        info = dict(model=train.model, dataset=train.dataset, layer=train.layer, run=m.run,
                    source="live" if shared.live_source else "cache", inputs=inputs)
        group.append(Member(config, Path(m.out_dir), spectrum, lm_eval, info))
    stream = None if shared.live_source else train  # a sharded job's other ranks get rank 0's batches
    if shared.live_source and reader:
        from attnspace.sae.live import live_stream

        first = group[0].config
        stream = live_stream(model, tokens_path=shared.tokens, model_dir=shared.model_dir,
                             source=json.loads(shared.live_source), source_seed=shared.live_seed, layer=shared.layer,
                             site=shared.site, batch_docs=shared.live_batch_docs, d=train.width(shared.site),
                             batch_size=first.batch_size, buffer_rows=first.buffer_rows, seed=first.stream_seed)
    try:
        results = (train_sharded if _in_rank() else train_sae_group)(group, stream, heldout)
    finally:
        if stream is not None and shared.live_source:
            stream.close()
    for (_, m), metrics in zip(members, results):
        if metrics["status"] != "ok":
            log.error("%s: failed (%s); recorded in metrics.json", m.run, metrics["failure"])
        else:
            log.info("%s: nmse %.4f, dead %.3f, l0 %.1f, %.0f tok/s", m.run, metrics["nmse"],
                     metrics["dead_fraction"], metrics["l0"], metrics["tokens_per_second"])
    return results


def _stream_inputs(shared, train) -> dict:
    """What a group's stream is computed from, recorded in each member's checkpoints (a checkpoint
    of other inputs is discarded): the training store's identity, or, for a live stream, the
    prepared model's and the token file's digests with the source and its seeds."""
    from attnspace.models import recorded_identity
    from attnspace.sae.io import file_identity, store_identity

    if not shared.live_source:
        return {"train": store_identity(train)}
    return {"model": recorded_identity(shared.model_dir), "tokens": file_identity(shared.tokens),
            "source": json.loads(shared.live_source), "seed": shared.live_seed, "batch_docs": shared.live_batch_docs}


def _in_rank() -> bool:
    """Whether this process is one rank of a feature-sharded job (attnspace.sae.sharded.launch)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _launch_ranks(shared, members: list) -> list[dict]:
    """Train the members feature-sharded over ``--ranks`` processes of this node (one per GPU); their metrics."""
    import torch

    from attnspace.errors import AttnspaceError
    from attnspace.sae.sharded import checkpoint_files, launch

    ranks = shared.ranks
    for config, m in members:  # refused here, in one line, before any rank starts
        if config.d_sae is not None and config.d_sae % ranks:
            raise AttnspaceError(f"--ranks {ranks}: {m.run} has {config.d_sae} latents, which {ranks} ranks "
                                 "cannot share evenly", fix="give a number of ranks that divides the latents")
        other = sorted({r for _, r, _, _ in checkpoint_files(Path(m.out_dir)) if r != ranks})
        if other:
            raise AttnspaceError(f"{m.out_dir}: sharded checkpoints of {other[0]} ranks, this job has {ranks}",
                                 fix=f"resume with --ranks {other[0]}, or delete {m.out_dir}/train_state.* to start over")
    if device() == "cuda" and torch.cuda.device_count() < ranks:
        raise AttnspaceError(f"--ranks {ranks} needs {ranks} GPUs, this job sees {torch.cuda.device_count()}",
                             fix="request as many GPUs as ranks (the rule's gpu resource), or lower --ranks")
    log_dir = Path(shared.rank_logs or Path(members[0][1].out_dir) / "ranks")
    log.info("training %d SAE(s) on %d ranks; each rank's log in %s", len(members), ranks, log_dir)
    launch(ranks, _train_members, (shared, members), log_dir=log_dir)
    return [json.loads((Path(m.out_dir) / "metrics.json").read_text()) for _, m in members]


def cmd_train_sae(a):
    _train_members(a, [(sae_config(a), a)])


def cmd_train_sae_group(a):
    members = []
    for text in a.member:
        m = _member_parser().parse_args(shlex.split(text))
        members.append((sae_config(argparse.Namespace(**{**vars(a), **vars(m)})), m))
    _train_members(a, members)


class _MemberParser(argparse.ArgumentParser):
    def error(self, message):  # a bad --member is an error of the group command, reported on one line
        from attnspace.errors import AttnspaceError

        raise AttnspaceError(f"train-sae-group --member: {message}",
                             fix="give each --member its own options quoted as one argument (attnspace train-sae-group -h)")


def _member_parser() -> argparse.ArgumentParser:
    p = _MemberParser(prog="train-sae-group --member", add_help=False)
    _add_sae_options(p, shared=False)
    return p


def _add_sae_options(s, *, shared: bool | None) -> None:
    """train-sae's options: those a group shares (shared True), a member's own (False), or all (None)."""
    if shared is not False:
        s.add_argument("--store", required=True, help="training store (manifest or .zarr)")
        s.add_argument("--heldout", required=True, help="held-out store for NMSE, L0 and dead features")
        s.add_argument("--spectrum", help="the site's spectrum (.npz): ASI's basis")
        s.add_argument("--site", required=True)
        s.add_argument("--batch-size", type=int)
        s.add_argument("--train-tokens", type=int)
        s.add_argument("--buffer-rows", type=int)
        s.add_argument("--eval-tokens", type=int)
        s.add_argument("--data-seed", type=int, help="seed of the shuffle buffer (the batches' order); default --seed")
        s.add_argument("--checkpoint-every", type=int)
        s.add_argument("--log-every", type=int)
        s.add_argument("--model-dir", help="prepared model, for the LM loss with the SAE spliced in")
        s.add_argument("--dtype", default="float32")
        s.add_argument("--tokens", help="token file with the held-out split")
        s.add_argument("--layer", type=int)
        s.add_argument("--live-source", help="train on live model activations of this dataset source (JSON, as in "
                       "config datasets.*.source) instead of the cache; needs --model-dir, --tokens, --layer")
        s.add_argument("--live-seed", type=int, default=0, help="the tokens stage's seed (document order)")
        s.add_argument("--live-batch-docs", type=int, default=8, help="documents per live forward pass")
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--ranks", type=int, default=1, help="feature-sharded training over this many processes of "
                       "the node, one per GPU (attnspace.sae.sharded); 1: one process")
        s.add_argument("--rank-logs", help="folder of the ranks' logs (default: <first --out-dir>/ranks)")
    if shared is not True:
        s.add_argument("--run", required=True, help="init-d<d_init>-optimizer-n<d_sae>-k<k>[-auxk][-c][-r<replicate>]")
        s.add_argument("--lr", type=float)
        s.add_argument("--k-aux", type=int)
        s.add_argument("--auxk-alpha", type=float)
        s.add_argument("--dead-threshold-tokens", type=int)
        s.add_argument("--seed", type=int, help="seed of the initialisation")
        s.add_argument("--lm-eval-tokens", type=int, default=0)
        s.add_argument("--out-dir", required=True)
        s.add_argument("--gpu", type=int, help="index of the GPU this run trains on (sae.group.devices; ignored "
                       "without a GPU)")


def cmd_sae_runs_table(a):
    from attnspace.files import write_csv
    from attnspace.sae.runs import runs_table

    write_csv(runs_table(a.metrics), a.out)


def cmd_dead_features(a):
    from attnspace.dead_features import evaluate_dead_features
    from attnspace.errors import AttnspaceError
    from attnspace.files import write_json
    from attnspace.llamascope import load_llamascope
    from attnspace.store import open_store

    from attnspace.sae.io import refuse_failed_run

    if a.tokens is not None and a.tokens < 2:
        raise AttnspaceError(f"--tokens {a.tokens}: the dead count and NMSE need at least 2 held-out tokens.",
                             fix="give --tokens 2 or more, or leave it out to use every held-out token.")
    refuse_failed_run(a.sae_dir)  # a failed run's folder holds no SAE, whatever files are left in it
    store = open_store(Path(a.activations))
    if a.site not in store.sites:
        raise AttnspaceError(f"--site {a.site}: {a.activations} holds the sites {list(store.sites)}.",
                             fix="pick one of them (the site the SAE was trained on).")
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
    from attnspace.llamascope import export_sae
    from attnspace.llamascope import LlamaScopeError
    from attnspace.sae.io import refuse_failed_run

    refuse_failed_run(a.sae_dir)  # a failed run's folder holds no SAE
    try:
        out = export_sae(a.sae_dir, a.to, a.out_dir)
    except (LlamaScopeError, FileExistsError) as err:
        raise SystemExit(f"export-sae: {err.line() if isinstance(err, LlamaScopeError) else err}") from None
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
    _add_sae_options(s, shared=None)
    s.set_defaults(func=cmd_train_sae)

    s = sub.add_parser("train-sae-group", help="train several SAEs on one stream of the same site (attnspace.sae.group)",
                       description="The shared options (store, site, stream, live source) once, then one --member "
                       "per SAE with its own options quoted as one argument, e.g. --member '--run "
                       "base-d0-adam-n4608-k32 --out-dir DIR --seed 0 --lr 0.001'. Each member trains as "
                       "'train-sae SHARED OWN' would, on the group's one stream.")
    _add_sae_options(s, shared=True)
    s.add_argument("--member", action="append", required=True, metavar="'OPTIONS'",
                   help="one SAE: --run, --out-dir and its own --seed, --lr, --k-aux, --auxk-alpha, "
                   "--dead-threshold-tokens, --lm-eval-tokens, quoted as one argument")
    s.set_defaults(func=cmd_train_sae_group)

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
