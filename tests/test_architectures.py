"""Sites found from the model's own structure, on a tiny random model of every verified type.

Each type's sites are checked against what does not share their code: transformers' own
``output_hidden_states`` (resid_post), the projection module called on attn_z (attn_out), the
hidden states the attention module is handed (attn_in), and, for the five families of the
hand table, the table itself.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from attnspace import SITES
from attnspace.architectures import (
    REASONS,
    ArchitectureError,
    attention_input,
    check_type,
    discover,
    layout_of,
    probe_ids,
    tiny_model,
    verify,
    verify_sites,
)
from attnspace.sites import _PATHS, SUPPORTED_MODEL_TYPES, capture, decoder_layers, output_projection, site_width

VERIFIED = [
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "axk2", "bailing_hybrid", "bamba", "beam",
    "biogpt", "bitnet", "bloom", "codegen", "cohere", "cohere2", "cohere2_moe", "ctrl", "cwm", "deepseek_v2",
    "deepseek_v3", "deepseek_v32", "diffllama", "doge", "emu3", "ergo", "ernie4_5", "ernie4_5_moe", "exaone",
    "exaone4", "exaone_moe", "falcon", "falcon_h1", "flex_olmo", "flint", "gemma", "gemma2", "gemma3_text", "glm",
    "glm4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
    "gpt_neox_japanese", "gpt_oss", "gptj", "granite", "granite_swa", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hyperclovax",
    "inkling2_text", "inkling_text", "internlm3", "iquestcoder", "jais2", "jamba", "jetmoe", "kolibri1", "laguna",
    "lara_mini", "lfm2", "lfm3", "llama", "llama4_text", "mellum", "mimo_v2_flash", "minicpm3", "minicpm5_moe",
    "minimax", "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral", "mllama",
    "modernbert-decoder", "moshi", "mpt", "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid", "olmoe",
    "param2moe", "persimmon", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_5_moe_text",
    "qwen3_5_text", "qwen3_moe", "qwen3_next", "recurrent_gemma", "sarvam_mla", "sarvam_moe", "seed_oss", "smollm3",
    "solar_open", "stablelm", "starcoder2", "trocr", "vaultgemma", "xglm", "youtu", "zamba2",
]
"""Types verified on this transformers (the README's count); the CLI checks the rest."""

REFUSED = {"bart": "encoder_decoder", "bert": "not_causal", "mamba": "no_attention", "opt": "shape"}
"""One type per common refusal reason."""

TABLE = {"llama": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen3": "qwen3", "gpt_neox": "gpt_neox"}
"""Model types of the hand table, and their family."""


@pytest.fixture(scope="module", autouse=True)
def quiet():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_MODELS: dict = {}


def model_of(model_type: str):
    """One tiny model per type for the whole module."""
    if model_type not in _MODELS:
        _MODELS[model_type] = tiny_model(model_type)
    return _MODELS[model_type]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=tol * float(b.abs().max()), rtol=0)


@pytest.mark.parametrize("model_type", VERIFIED)
def test_verified_sites_against_the_model_itself(model_type):
    model = model_of(model_type)
    layout = layout_of(model)
    L = layout.attention_layers[0]
    proof = verify(model, layout, splice_layers=[])  # splices: test_splices, and `attnspace architectures`
    assert proof.checks > 0
    ids = probe_ids(model, seed=3)
    blocks = decoder_layers(model)
    received = []
    attn = blocks[L].get_submodule(proof.layout.layers[L].attention)
    handle = attn.register_forward_pre_hook(
        lambda m, args, kwargs: received.append(attention_input(args, kwargs).clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()
    got = capture(model, ids, [L], list(SITES))
    for site in SITES:
        assert got[L, site].shape == (*ids.shape, site_width(model, site)), site
    proj = blocks[L].get_submodule(proof.layout.layers[L].o_proj)
    with torch.no_grad():
        close(got[L, "attn_out"], proj(got[L, "attn_z"]))  # the module itself, Conv1D or Linear
        w, bias = output_projection(model, L)
        close(got[L, "attn_out"], got[L, "attn_z"] @ w.T + (0 if bias is None else bias))
    close(got[L, "attn_in"], received[0])
    if L + 1 < len(blocks) and hidden is not None and len(hidden) == len(blocks) + 1:
        close(got[L, "resid_post"], hidden[L + 1])  # transformers' own hidden states


@pytest.mark.parametrize("model_type", ["gpt2", "phi", "olmo2", "mixtral", "jamba", "deepseek_v3"])
def test_splices(model_type):
    """Every site of every layer spliced back in unchanged (logits equal) and perturbed (logits
    change), on one type of each form: Conv1D, parallel, post-norms, MoE, hybrid, latent attention."""
    model = model_of(model_type)
    proof = verify(model, layout_of(model))
    assert proof.checks >= 2 * len(proof.layout.attention_layers) * 5


@pytest.mark.parametrize("model_type", sorted(TABLE))
def test_discovery_agrees_with_the_table(model_type):
    model = model_of(model_type)
    table = _PATHS[TABLE[model_type]]
    for found in discover(model).layers:
        assert (found.norm, found.o_proj, found.mlp) == (table.norm, table.o_proj, table.mlp)
    assert verify_sites(model) == {}  # the table's families are not re-verified when prepared


@pytest.mark.parametrize("model_type, reason", sorted(REFUSED.items()))
def test_refusals_name_their_reason(model_type, reason):
    status = check_type(model_type)
    assert (status.status, status.reason) == ("refused", reason) and reason in REASONS


def test_layers_without_attention_have_no_attention_sites():
    model = model_of("jamba")  # attention at layer 1 of 3, Mamba elsewhere
    layout = layout_of(model)
    assert layout.attention_layers == [1]
    ids = probe_ids(model)
    with pytest.raises(ArchitectureError, match="layer 0 .* has no attention.*attention layers: \\[1\\]"):
        capture(model, ids, [0], ["attn_out"])
    got = capture(model, ids, [0, 1], ["resid_post"])  # the residual stream is there at every layer
    assert set(got) == {(0, "resid_post"), (1, "resid_post")}
    assert verify_sites(model)["attention_layers"] == [1]


def test_a_wrong_site_is_caught():
    """Point attn_out at the MLP's down projection: the identity proof refuses it."""
    model = model_of("mistral")
    layout = discover(model)
    wrong = layout.layers[0].__class__(**{**layout.layers[0].__dict__, "o_proj": "mlp.down_proj"})
    layout.layers[0] = wrong
    with pytest.raises(ArchitectureError, match="layer 0"):
        verify(model, layout)


def test_every_table_type_is_a_transformers_causal_lm():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(SUPPORTED_MODEL_TYPES) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_config_reads_the_architecture_from_the_folder(tiny_llama, tmp_path):
    import json

    from attnspace.config import ConfigError, check_config
    from conftest import tiny_config

    cfg = tiny_config(tiny_llama)
    del cfg["models"]["tiny"]["architecture"]
    assert check_config(cfg)["models"]["tiny"]["architecture"] == "llama"
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "my_lm", "auto_map": {"AutoConfig": "x.Cfg"}}))
    cfg = tiny_config(remote)
    del cfg["models"]["tiny"]["architecture"]
    with pytest.raises(ConfigError, match="'my_lm' is a remote-code model.*Fix: .*attnspace architectures"):
        check_config(cfg)


def test_an_unidentified_site_names_the_type_and_the_override_key():
    model = tiny_model("nemotron_h")  # attention blocks hold attention alone (the MLP is a block of its own)
    with pytest.raises(ArchitectureError, match="'nemotron_h': could not identify the mlp of layer") as err:
        discover(model)
    assert "OVERRIDES['nemotron_h'] = {'mlp': " in err.value.line()
