"""Sites captured by hooks against manual recomputation on tiny random models."""

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
)

from attnspace import SITES
from conftest import randomise_norms, tiny_causal_lm

from attnspace.sites import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedModelError,
    capture,
    decoder_layers,
    family_of,
    n_layers,
    site_width,
)

VOCAB, HIDDEN, LAYERS = 64, 32, 3  # conftest.tiny_causal_lm's sizes


def _build(family: str):
    return tiny_causal_lm(family, attn_implementation="eager")


FAMILIES = ["llama", "gemma2", "gemma3", "qwen3", "gpt_neox"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.manual_seed(0)
    return randomise_norms(_build(request.param).eval())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _hidden_states(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    return out.hidden_states, out.attentions


def _hook_count(model):
    """Hooks on the model; transformers installs some of its own, so compare counts."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sites_match_manual_recomputation(model, ids):
    L = 1  # non-final: the last hidden_states entry may have the final norm applied
    got = capture(model, ids, [L], list(SITES))
    hs, _ = _hidden_states(model, ids)
    h, layer = hs[L], decoder_layers(model)[L]
    family = family_of(model)
    o_proj = layer.attention.dense if family == "gpt_neox" else layer.self_attn.o_proj
    a, m = got[L, "attn_out"], got[L, "mlp_out"]
    with torch.no_grad():
        close(a, o_proj(got[L, "attn_z"]))
        close(got[L, "attn_in"], layer.input_layernorm(h))
        close(got[L, "resid_post"], hs[L + 1])
        if family in ("llama", "qwen3"):
            close(got[L, "resid_post"], h + a + m)
            close(m, layer.mlp(layer.post_attention_layernorm(h + a)))
        elif family in ("gemma2", "gemma3"):
            mid = h + layer.post_attention_layernorm(a)
            close(got[L, "resid_post"], mid + layer.post_feedforward_layernorm(m))
            close(m, layer.mlp(layer.pre_feedforward_layernorm(mid)))
        else:  # GPT-NeoX, parallel residual
            close(got[L, "resid_post"], h + a + m)
            close(m, layer.mlp(layer.post_attention_layernorm(h)))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attn_z_is_attention_pattern_times_values(family, ids):
    """z for head i = A_i @ V_i, with A from output_attentions and V = v_proj(attn_in)."""
    torch.manual_seed(0)
    model = _build(family).eval()
    L = 2
    got = capture(model, ids, [L], ["attn_in", "attn_z"])
    _, attentions = _hidden_states(model, ids)
    cfg = model.config
    head_dim = cfg.head_dim
    attn = decoder_layers(model)[L].self_attn
    with torch.no_grad():
        v = attn.v_proj(got[L, "attn_in"])  # [b, s, kv_heads * head_dim]
    b, s, _ = v.shape
    v = v.view(b, s, cfg.num_key_value_heads, head_dim).transpose(1, 2)
    v = v.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
    z = (attentions[L] @ v).transpose(1, 2).reshape(b, s, -1)  # [b, s, heads * head_dim]
    close(got[L, "attn_z"], z)


def test_widths(model, ids):
    cfg = model.config
    got = capture(model, ids, [0], list(SITES))
    for site in SITES:
        assert got[0, site].shape == (2, 7, site_width(model, site))
    heads_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", HIDDEN // cfg.num_attention_heads)
    assert site_width(model, "attn_z") == heads_dim
    assert site_width(model, "resid_post") == HIDDEN
    if family_of(model) == "gemma3":
        assert site_width(model, "attn_z") == 64 != HIDDEN


def test_stops_after_deepest_layer(model, ids):
    calls = {}

    def count(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1

        return hook

    before = _hook_count(model)
    blocks = decoder_layers(model)
    handles = [blocks[i].register_forward_hook(count(i)) for i in range(LAYERS)]
    handles.append(model.get_output_embeddings().register_forward_hook(count("lm_head")))
    try:
        got = capture(model, ids, [0], ["resid_post", "attn_out"])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {0: 1}
    assert set(got) == {(0, "resid_post"), (0, "attn_out")}
    assert _hook_count(model) == before  # capture leaves no hooks behind


def test_several_layers(model, ids):
    layers, sites = [2, 0, 1], ["attn_z", "resid_post", "mlp_out"]
    got = capture(model, ids, layers, sites, attention_mask=torch.ones_like(ids))
    assert set(got) == {(L, s) for L in layers for s in sites}
    for (L, s), x in got.items():
        assert x.shape == (2, 7, site_width(model, s))
        assert not x.requires_grad
    hs, _ = _hidden_states(model, ids)
    close(got[0, "resid_post"], hs[1])
    close(got[1, "resid_post"], hs[2])


def test_errors(model, ids):
    before = _hook_count(model)
    assert n_layers(model) == LAYERS
    with pytest.raises(ValueError, match="unknown"):
        capture(model, ids, [0], ["hook_nonsense"])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        capture(model, ids, [LAYERS], ["attn_out"])
    with pytest.raises(ValueError, match="negative"):
        capture(model, ids, [-1], ["attn_out"])
    with pytest.raises(ValueError):
        capture(model, ids, [], ["attn_out"])
    with pytest.raises(IndexError):  # fails inside the forward: hooks must still go
        capture(model, ids + VOCAB, [1], list(SITES))
    assert _hook_count(model) == before


def test_family_of():
    assert family_of(Gemma3Config()) == "gemma3"  # multimodal wrapper config
    assert family_of(Gemma3TextConfig()) == "gemma3"
    assert set(SUPPORTED_MODEL_TYPES.values()) == set(FAMILIES)
    # outside the table: any causal LM of the installed transformers, its sites found from its structure
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                      eos_token_id=0)).eval()
    assert family_of(gpt2.config) == "gpt2"
    got = capture(gpt2, torch.zeros(1, 3, dtype=torch.long), [0], ["attn_z", "attn_out"])
    c_proj = gpt2.transformer.h[0].attn.c_proj  # Conv1D: weight [d_z, d_model], out = z @ weight + bias
    close(got[0, "attn_out"], got[0, "attn_z"] @ c_proj.weight + c_proj.bias)
    unknown = GPT2Config(vocab_size=VOCAB)
    unknown.model_type = "not_a_model"
    with pytest.raises(UnsupportedModelError, match="'not_a_model'.*gpt_neox") as err:
        family_of(unknown)
    assert isinstance(err.value, ValueError)
