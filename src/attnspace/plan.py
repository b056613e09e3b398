"""The resource plan of a configuration, before anything runs.

The plan is read off the jobs the workflow itself would run: a Snakemake dry run prints
each job's ``attnspace`` command, and each command is parsed by the CLI's own parser, so
the plan counts exactly the arguments the jobs will get. Per job it counts

* disk: bytes of the activation stores a caching job writes (per split and layer: rows x
  (sum of the widths of the sites stored at that layer x bytes per value + per-row metadata);
  stores are uncompressed; with spectrum.mode: streamed only the sites, layers and splits its
  ``--store-sites`` names), of the moments it streams (spectrum.mode: streamed: per layer and
  spectrum site, groups x (width + 1)^2 float64, ``groups`` being the most document groups; and
  for Figure 3 one group of attn_z, and of attn_out where it is no spectrum site) and of
  trained dictionaries (float32 weights, and Adam's two moments in the checkpoint);
* activation rows per site: the rows of the main cache's splits that store anything, the SAE
  store's rows (``cache_sae``);
* model-forward tokens: tokens run through the model by caching (every split that stores
  anything, and the train split where moments are streamed; the SAE store's forwards stop
  at the focus layer and are counted as whole passes), the loss-recovered
  interventions (each site and k is a pass from the layer on, counted as whole passes),
  live SAE training (once per SAE group: its members share one stream; counted on the group's
  first member) and the LM loss with an SAE spliced in (per member);
* optimizer steps of SAEs and Lorsa;
* GPU-hours of SAE training where a measured throughput exists
  (``bench/results/sae_gpu_*.jsonl``); otherwise it says the number is unmeasured;
* the device memory peak of each GPU job (``peak_bytes``): an SAE group's GPU holds its members
  (:func:`attnspace.sae.group.training_bytes`, a model of the measured peak; per rank of a
  feature-sharded run, its share of the latents) and, on the first GPU of a live-source group,
  the model and its live forward; a caching job the model's forward, a Lorsa its training step;
  the measured numbers are ``bench/results/memory_paper.csv``'s (``bench/memory.py``: the code run
  with fake tensors at the paper's shapes). With the GPU's memory known (``gpu.memory_gib``) a job
  whose peak exceeds it is refused (:func:`check_device_memory`) before anything runs.

``attnspace plan`` sums the jobs of a whole configuration before anything runs; a real run
prints the same sums for the jobs it is about to execute (:func:`print_run_plan`, the
Snakefile's ``onstart``).
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per stored value by the model's dtype (bf16 is stored as its uint16 bits)."""
META_BYTES_PER_ROW = 4 + 4 + 4 + 1
"""token_id, doc, pos (int32) and keep (bool) beside every store's rows."""

MOMENT_BYTES = 8
"""Streamed moments (spectrum.mode: streamed) are float64: per layer and site, groups x (d+1)^2."""


@dataclass
class PlanRow:
    stage: str
    """The rule (cache_activations, train_sae, ...)."""
    job: str
    """What the job is (model/dataset, run name)."""
    disk_bytes: int = 0
    rows_per_site: int = 0
    forward_tokens: int = 0
    optimizer_steps: int = 0
    gpu_hours: float | None = None
    peak_bytes: int | None = None
    """Device memory peak of a GPU job (an SAE group member: of its GPU, shared members and live model
    included); None where unmeasured or the job uses no GPU."""
    note: str = ""


def _site_width(site: str, model_cfg: dict, z_width: int | None) -> tuple[int, str]:
    if site == "attn_z" and z_width is None:
        return model_cfg["d_model"], "attn_z width assumed d_model (known once the model is prepared)"
    return (z_width if site == "attn_z" else model_cfg["d_model"]), ""


def attn_z_width(model: str, root: Path = Path(".")) -> int | None:
    """Width of the concatenated head outputs (heads x head_dim), from the prepared model's config."""
    path = root / "resources" / "models" / model / "hf" / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return int(heads * head_dim)


def measured_throughput(root: Path = Path(".")) -> dict[tuple[str, int], float]:
    """{(optimizer, n_latents): tokens/s} from the GPU benchmark's result files, where any exist."""
    out = {}
    for path in sorted((root / "bench" / "results").glob("sae_gpu_*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("what") in ("attnspace_adam", "attnspace_sparseadam") and r.get("tok_s") and not r.get("oom"):
                opt = "sparse_adam" if r["what"] == "attnspace_sparseadam" else "adam"
                out[(opt, int(r["n"]))] = float(r["tok_s"])
    return out


MEMORY_CSV = Path(__file__).resolve().parents[2] / "bench" / "results" / "memory_paper.csv"
"""Measured peaks of the paper's GPU jobs (bench/memory.py), in this source tree."""

GIB = 2**30


def measured_memory(path: Path = MEMORY_CSV) -> dict[tuple[str, str], int]:
    """{(what, model): peak bytes} from the memory measurement of the current code, where it exists:
    ``("cache", m)`` the caching forward, ``("live", m)`` the weights and live forward that a live-source
    SAE group keeps on its first GPU, ``("lorsa", m)`` a Lorsa training step."""
    if not path.is_file():
        return {}
    out = {}
    for r in pd.read_csv(path).itertuples(index=False):
        if r.code != "after" or not isinstance(r.model, str):
            continue
        what = "lorsa" if r.kind == "lorsa" else "live" if "live forward" in str(r.note) else "cache"
        out[(what, r.model)] = int(float(r.peak_gib) * GIB)
    return out


def plan_jobs(commands: list[list[str]], config: dict, parser, root: Path = Path(".")) -> pd.DataFrame:
    """One :class:`PlanRow` per planned ``attnspace`` command (argv without the program name), each
    read by ``parser`` (the CLI's own: ``attnspace.cli.build_parser()``, passed in by the caller)."""
    from attnspace.cli.dictionaries import member_commands
    from attnspace.interventions import k_grid
    from attnspace.sae.runs import parse_run_name

    speed = measured_throughput(root)
    memory = measured_memory()
    rows = []
    for argv in commands:
        a = parse_command(parser, argv)
        if a.command == "cache":
            rows.append(_cache_row(a, config, root))
            rows[-1].peak_bytes = memory.get(("cache", a.model))
        elif a.command == "loss-recovered":
            d = config["models"][a.model]["d_model"]
            passes = 1 + len(a.spectra) * (1 + len(k_grid(d, **json.loads(a.k_grid))))  # clean; per site zero + each k
            rows.append(PlanRow("loss_recovered", f"{a.model}/{a.dataset} L{a.layer}",
                                forward_tokens=a.heldout_tokens * passes,
                                note=f"{passes} passes over {a.heldout_tokens} held-out tokens"))
        elif a.command == "train-sae":
            rows.append(_sae_row(a, parse_run_name(a.run), config, speed))
        elif a.command == "train-sae-group":  # one row per member, parsed as its own train-sae command
            members = [parse_command(parser, m) for m in member_commands(argv)]
            group = [_sae_row(m, parse_run_name(m.run), config, speed, group_size=len(members), first=i == 0)
                     for i, m in enumerate(members)]
            _group_peaks(group, members, config, memory)
            rows += group
        elif a.command == "train-lorsa":
            n_tokens = config["tokens"]["train_tokens"]
            steps = a.epochs * (n_tokens // a.batch_tokens)
            job = Path(a.out_dir).relative_to(Path(a.out_dir).parents[3])
            rows.append(PlanRow("train_lorsa", job.as_posix(), optimizer_steps=steps,
                                peak_bytes=memory.get(("lorsa", job.parts[0]))))
    return pd.DataFrame([asdict(r) for r in rows], columns=list(PlanRow.__dataclass_fields__))


def _group_peaks(rows: list[PlanRow], members: list, config: dict, memory: dict) -> None:
    """Set each member row's peak_bytes to its GPU's: the members on that GPU (``--gpu``; per rank of a
    ``--ranks`` run its share of the latents and the [B, d] tensors every rank holds whole) and, on the
    first GPU of a live-source group, the model's weights and live forward (measured; unmeasured: left out,
    with a note)."""
    from attnspace.sae.group import rank_bytes
    from attnspace.sae.runs import parse_run_name

    on_gpu: dict[int, int] = {}
    for m in members:
        run, ranks = parse_run_name(m.run), max(1, getattr(m, "ranks", 1) or 1)
        d = config["models"][Path(m.out_dir).parts[-5]]["d_model"]
        batch = m.batch_size or config["sae"]["batch_size"]
        own = rank_bytes(d, run["d_sae"], batch, ranks, optimizer=run["optimizer"], auxk=run["auxk"],
                         k=run["k"], k_aux=config["sae"]["auxk"]["k_aux"])
        on_gpu[m.gpu or 0] = on_gpu.get(m.gpu or 0, 0) + own
    model = Path(members[0].out_dir).parts[-5]
    live = memory.get(("live", model), 0) if members[0].live_source else 0
    for row, m in zip(rows, members):
        gpu = m.gpu or 0
        row.peak_bytes = on_gpu[gpu] + (live if gpu == 0 else 0)
        if members[0].live_source and gpu == 0 and not live:
            row.note = "; ".join(filter(None, [row.note, "peak without the live model (unmeasured)"]))


def check_device_memory(jobs: pd.DataFrame, config: dict) -> None:
    """Refuse (AttnspaceError, one line) a plan with a GPU job whose peak exceeds the GPU's memory
    (``gpu.memory_gib``; None: unknown, nothing refused)."""
    from attnspace.errors import AttnspaceError

    device = (config.get("gpu") or {}).get("memory_gib")
    if device is None or jobs.empty:
        return
    over = jobs[jobs["peak_bytes"].notna() & (jobs["peak_bytes"] > device * GIB)]
    if over.empty:
        return
    worst = over.loc[over["peak_bytes"].idxmax()]
    more = f" ({len(over) - 1} more jobs too)" if len(over) > 1 else ""
    fix = ("lower sae.group.memory_gb to the GPU's memory less the live model, or shard the run "
           "(sae.group.max_ranks), or train it with sparse_adam" if worst["stage"] == "train_sae"
           else "run it on a GPU with more memory (gpu.memory_gib)")
    raise AttnspaceError(f"{worst['stage']} job {worst['job']} needs {worst['peak_bytes'] / GIB:.1f} GiB of GPU "
                         f"memory at its peak, more than the {device:g} GiB of one GPU (gpu.memory_gib){more}",
                         fix=fix)


def peaks_markdown(jobs: pd.DataFrame, config: dict) -> str:
    """Each GPU job's peak (largest first), against the GPU's memory where it is known."""
    device = (config.get("gpu") or {}).get("memory_gib")
    gpu = jobs[jobs["peak_bytes"].notna()].sort_values("peak_bytes", ascending=False)
    if gpu.empty:
        return ""
    lines = [f"| GPU job | peak GiB | of {device:g} GiB |" if device else "| GPU job | peak GiB |",
             "|---|---|---|" if device else "|---|---|"]
    for r in gpu.itertuples(index=False):
        peak = f"{r.peak_bytes / GIB:.1f}"
        lines.append(f"| {r.stage} {r.job} | {peak} | {r.peak_bytes / GIB / device:.0%} |" if device
                     else f"| {r.stage} {r.job} | {peak} |")
    return "\n".join(lines) + "\n"


def _cache_row(a, config: dict, root: Path) -> PlanRow:
    """A caching job: each of its splits' stores, one per layer with the sites stored there, and the
    moments it streams."""
    from attnspace.cache import split_layer_sites, wo_moment_sites

    m, tokens = config["models"][a.model], config["tokens"]
    split_rows = {"train": tokens["train_tokens"], "heldout": tokens["heldout_tokens"],
                  "sae": tokens["sae_train_tokens"]}
    store_sites = json.loads(a.store_sites) if a.store_sites is not None else None
    by_split = split_layer_sites(a.layers, a.sites, json.loads(a.site_layers), tuple(a.splits), store_sites)
    notes = set()

    def width(site: str) -> int:
        w, note = _site_width(site, m, attn_z_width(a.model, root))
        notes.add(note)
        return w

    disk = sum(split_rows[split] * (sum(width(s) for s in sites) * BYTES[a.dtype] + META_BYTES_PER_ROW)
               for split, by_layer in by_split.items() for sites in by_layer.values())
    moment_sites = a.moment_sites or []  # spectrum.mode: streamed
    disk += sum(len(a.layers) * a.groups * (width(s) + 1) ** 2 * MOMENT_BYTES for s in moment_sites)
    if a.wo_moments_dir:  # Figure 3's, in one group
        disk += sum(len(a.layers) * (width(s) + 1) ** 2 * MOMENT_BYTES for s in wo_moment_sites(moment_sites))
    stored = [split for split, by_layer in by_split.items() if by_layer]
    run = [split for split in a.splits if split in stored or (split == "train" and (moment_sites or a.wo_moments_dir))]
    stage = "cache_sae" if a.splits == ["sae"] else "cache_activations"
    if stage == "cache_sae":
        notes.add(f"forward stops at layer {max(a.layers)} of {m['n_layers']}")
    if store_sites is not None:
        notes.add("stores: " + ("; ".join(f"{split} {', '.join(f'{s} L{_layers(ls)}' for s, ls in sites.items())}"
                                          for split, sites in store_sites.items()) or "none"))
    return PlanRow(stage, f"{a.model}/{a.dataset}", disk, sum(split_rows[s] for s in stored),
                   sum(split_rows[s] for s in run), note="; ".join(sorted(n for n in notes if n)))


def _layers(layers: list[int]) -> str:
    """Layers as in a note: 15, or 3-31 (8) for several."""
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]} ({len(layers)})"


def _sae_row(a, run: dict, config: dict, speed: dict, group_size: int = 1, first: bool = True) -> PlanRow:
    """One SAE's row; of a group of ``group_size`` SAEs on one stream, the live stream's tokens count on
    the ``first`` member only."""
    from attnspace.sae.config import SAETrainConfig

    defaults = SAETrainConfig()
    batch = a.batch_size or defaults.batch_size
    tokens = (a.train_tokens or defaults.train_tokens) // batch * batch
    d = config["models"][Path(a.out_dir).parts[-5]]["d_model"] if len(Path(a.out_dir).parts) >= 5 else 0
    params = 2 * run["d_sae"] * d + run["d_sae"] + d
    disk = 4 * params * 3  # final weights, and a checkpoint with Adam's two moments
    live = tokens if a.live_source and first else 0
    lm = 3 * (a.lm_eval_tokens or 0)  # clean, zero-ablated and spliced passes
    tok_s = speed.get((run["optimizer"], run["d_sae"]))
    job = "/".join(Path(a.out_dir).parts[-5:])
    notes = [] if tok_s else ["GPU-hours unmeasured (no bench/results/sae_gpu_*.jsonl at this size)"]
    if getattr(a, "ranks", 1) > 1:
        notes.append(f"feature-sharded over {a.ranks} GPUs (attnspace.sae.sharded)")
    if group_size > 1:
        notes.append(f"one of {group_size} SAEs on one stream" + ("; its model forward counted here" if live else ""))
    return PlanRow("train_sae", job, disk, forward_tokens=live + lm, optimizer_steps=tokens // batch,
                   gpu_hours=tokens / tok_s / 3600 if tok_s else None, note="; ".join(notes))


def command_argv(line: str) -> list[str] | None:
    """The argv (without the program) of a job's ``attnspace`` shell command, up to its redirection
    (paths quoted as the rules quote them); None for any other line."""
    line = line.strip().removeprefix("Shell command: ")
    if not line.startswith("attnspace "):
        return None
    words = shlex.split(line)
    return words[1:words.index(">")] if ">" in words else words[1:]


def parse_command(parser, argv: list[str]):
    """``parser.parse_args(argv)``; a job command it refuses raises ValueError (argparse would exit)."""
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            return parser.parse_args(argv)
    except SystemExit:
        why = usage.getvalue().strip().splitlines()[-1:] or ["no message"]
        raise ValueError(f"a planned job's command does not parse ({why[0]}): "
                         f"attnspace {shlex.join(argv)[:300]}") from None


def planned_commands(snakefile: Path, configfile: Path | None, workdir: Path, targets=()) -> list[list[str]]:
    """The ``attnspace`` argv of every job a dry run plans (nothing is run or written)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-n", "-p", *targets]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if r.returncode != 0:
        from attnspace.errors import AttnspaceError

        # Snakemake's error is its last unindented lines (the banner and the traceback are indented)
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip() and not line[0].isspace()
                 and not line.startswith(("Using workflow", "Assuming", "SNAKEMAKE", "===", "Building DAG"))]
        raise AttnspaceError(f"the dry run stopped: {' '.join(lines[-2:])[:1500]}",
                             fix=f"correct what it names; the whole message: {shlex.join(cmd[2:])} (in {workdir}).")
    return [argv for line in (r.stdout + r.stderr).splitlines() if (argv := command_argv(line))]


def run_plan(shell_commands, config: dict, parser, root: Path = Path(".")) -> str:
    """The plan's summary (markdown) of the jobs a run is about to start, from their shell commands.

    What the Snakefile prints when a real run starts (``onstart``): the same per-stage sums as
    ``attnspace plan``, over exactly the jobs this run executes, read off the workflow's own DAG
    (no second dry run). Empty when no job is one the plan counts (caching, training, interventions).
    """
    commands = [argv for line in shell_commands if line and (argv := command_argv(line))]
    jobs = plan_jobs(commands, config, parser, root)
    return summary_markdown(summary(jobs)) if len(jobs) else ""


def summary(plan: pd.DataFrame) -> pd.DataFrame:
    """Per stage and in total: jobs, disk, rows per site, forward tokens, optimizer steps, GPU-hours."""
    def agg(g: pd.DataFrame) -> dict:
        hours = g["gpu_hours"]
        return dict(jobs=len(g), disk_bytes=int(g["disk_bytes"].sum()), rows_per_site=int(g["rows_per_site"].sum()),
                    forward_tokens=int(g["forward_tokens"].sum()), optimizer_steps=int(g["optimizer_steps"].sum()),
                    gpu_hours=float(hours.sum()) if hours.notna().all() and len(hours) else None,
                    unmeasured=int(hours.isna().sum()) if g["stage"].iloc[0] == "train_sae" else 0)

    if plan.empty:
        from attnspace.errors import AttnspaceError

        raise AttnspaceError("the dry run planned no job that the plan counts (caching, training, interventions): "
                             "nothing to plan.", fix="everything is already built, or name targets that are not.")
    rows = [{"stage": stage, **agg(g)} for stage, g in plan.groupby("stage", sort=False)]
    rows.append({"stage": "total", **agg(plan.assign(stage="total"))})
    return pd.DataFrame(rows)


def _human(n: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g} {prefix}{unit}".strip()
        n /= 1000
    return f"{n:.3g} E{unit}"


def summary_markdown(table: pd.DataFrame) -> str:
    lines = ["| stage | jobs | disk | activation rows | model-forward tokens | optimizer steps | GPU-hours |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        hours = f"{r.gpu_hours:.1f}" if r.gpu_hours is not None and r.gpu_hours == r.gpu_hours else (
            f"unmeasured ({r.unmeasured} jobs)" if r.unmeasured else "-")
        lines.append(f"| {r.stage} | {r.jobs} | {_human(r.disk_bytes, 'B')} | {_human(r.rows_per_site, '')} | "
                     f"{_human(r.forward_tokens, '')} | {_human(r.optimizer_steps, '')} | {hours} |")
    return "\n".join(lines) + "\n"


def print_run_plan(jobs, config: dict, parser, file=None) -> None:
    """Print :func:`run_plan` of Snakemake ``jobs`` (those a run is about to execute) to stderr; ``parser``
    reads their commands (``attnspace.cli.build_parser()``).

    A plan that cannot be computed is reported in one line instead; the run goes on.
    """
    try:
        text = run_plan((job.shellcmd for job in jobs if job.shellcmd), config, parser)
    except Exception as e:  # noqa: BLE001 (the run must not fail for want of its summary)
        text = f"(no plan: {type(e).__name__}: {e})\n"
    if text:
        print(f"The plan of this run's jobs (as attnspace plan counts them; docs/cluster.md):\n{text}",
              file=file or sys.stderr, flush=True)
