"""Lorsa: grouped attention vs a per-head loop, RoPE vs the model's own, a real head
reproduced, dead counts vs an independent count, data order, files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from attnspace.lorsa import (
    TABLE1_COLUMNS,
    Lorsa,
    LorsaConfig,
    SequenceData,
    causal_document_mask,
    dead_heads,
    dead_param_fraction,
    evaluate,
    initialize,
    load_lorsa,
    n_params_per_head,
    rope_from_config,
    save_lorsa,
    table1_frame,
    table1_markdown,
    train_lorsa,
)
from attnspace.sites import capture
from attnspace.spectrum import spectrum_from_gram
from attnspace.store import StoreWriter, open_store

D = 32  # d_model of the tiny models


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=D, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=64,
                  max_position_embeddings=256)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})).eval()
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=8)).eval()
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.5)).eval()
    if family == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=8,
                                                  layer_types=["sliding_attention", "full_attention"])).eval()
    raise ValueError(family)


def hf_rotate(q, cos, sin, rotary_dim):
    """HF convention, written out: rotate-half on the first rotary_dim dims."""
    r = q[..., :rotary_dim]
    half = rotary_dim // 2
    rot = torch.cat((-r[..., half:], r[..., :half]), dim=-1)
    return torch.cat((r * cos + rot * sin, q[..., rotary_dim:]), dim=-1)


# ----------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox", "gemma3"])
def test_rope_matches_the_models_own_rotary_embedding(family):
    model = tiny_model(family)
    base = model.base_model
    head_dim = getattr(model.config, "head_dim", None) or D // 4
    pos = torch.tensor([[0, 1, 2, 7, 30, 100], [5, 3, 0, 1, 2, 255]])
    x = torch.randn(2, 3, 6, head_dim, dtype=torch.float64)
    from attnspace.lorsa import apply_rope

    for layer in range(2):
        kwargs = {"layer_type": model.config.layer_types[layer]} if family == "gemma3" else {}
        cos, sin = base.rotary_emb(x.float(), pos, **kwargs)  # the model's own, [B, T, r]
        want = hf_rotate(x, cos[:, None].double(), sin[:, None].double(), cos.shape[-1])
        rope = rope_from_config(model.config, head_dim, layer)
        got = apply_rope(x, pos, rope.inv_freq, rope.attention_scaling)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if family == "gemma3":  # sliding and full layers rotate differently
        assert not torch.equal(rope_from_config(model.config, 8, 0).inv_freq,
                               rope_from_config(model.config, 8, 1).inv_freq)


# ----------------------------------------------------------------------------- grouped attention

def random_lorsa(qk_norm: bool, seed: int = 0, rope_family: str = "llama", **overrides) -> Lorsa:
    cfg = LorsaConfig(**{**dict(n_ov_heads=12, n_qk_heads=3, d_qk=8, k=5, qk_norm=qk_norm), **overrides})
    lorsa = Lorsa(cfg, D, rope_from_config(tiny_model(rope_family).config, cfg.d_qk, 0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorsa.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.ndim < 2 else 0.3))
    return lorsa


def naive_head_activations(lorsa: Lorsa, x: torch.Tensor) -> torch.Tensor:
    """z [T, n_ov] for ONE document x [T, d] (positions 0..T-1), one OV head at a time, float64."""
    c = lorsa.config
    T = x.shape[0]
    x = x.double()
    p = {n: t.detach().double() for n, t in lorsa.named_parameters()}
    inv_freq = lorsa.rope_inv_freq.double()
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos() * lorsa.rope_scaling, emb.sin() * lorsa.rope_scaling
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    z = torch.zeros(T, c.n_ov_heads, dtype=torch.float64)
    for i in range(c.n_ov_heads):
        h = i // c.group_size
        q, k = x @ p["W_Q"][h] + p["b_Q"][h], x @ p["W_K"][h] + p["b_K"][h]
        if c.qk_norm:
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + c.qk_norm_eps) * p["q_norm"][h]
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + c.qk_norm_eps) * p["k_norm"][h]
        q, k = hf_rotate(q, cos, sin, cos.shape[-1]), hf_rotate(k, cos, sin, cos.shape[-1])
        scores = (q @ k.T / math.sqrt(c.d_qk)).masked_fill(~causal, float("-inf"))
        z[:, i] = scores.softmax(-1) @ (x @ p["W_V"][i] + p["b_V"][i])
    return z


def naive_output(lorsa: Lorsa, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [T, d], fired [T, n_ov] bool) by sorting each token's heads by ReLU(z) ||w_o||."""
    W_O = lorsa.W_O.detach().double()
    score = z.relu() * W_O.norm(dim=1)
    out = torch.zeros(z.shape[0], W_O.shape[1], dtype=torch.float64)
    fired = torch.zeros_like(z, dtype=torch.bool)
    for t in range(z.shape[0]):
        for i in np.argsort(-score[t].numpy(), kind="stable")[: lorsa.config.k]:
            out[t] += z[t, i].clamp(min=0) * W_O[i]
            fired[t, i] = z[t, i] > 0
    return out + lorsa.b_D.detach().double(), fired


@pytest.mark.parametrize("qk_norm", [False, True])
def test_grouped_single_call_equals_naive_per_head_loop(qk_norm):
    lorsa = random_lorsa(qk_norm)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randn(n, D, generator=g) for n in (9, 4, 6)]
    # Packed: row 0 = doc 0; row 1 = doc 1 then doc 2 then padding (T = 12 slots).
    T = 12
    x = torch.zeros(2, T, D)
    pos = torch.zeros(2, T, dtype=torch.int64)
    seg = torch.full((2, T), -1)
    x[0, :9], pos[0, :9], seg[0, :9] = docs[0], torch.arange(9), 0
    x[1, :4], pos[1, :4], seg[1, :4] = docs[1], torch.arange(4), 1
    x[1, 4:10], pos[1, 4:10], seg[1, 4:10] = docs[2], torch.arange(6), 2
    out = lorsa(x, pos, causal_document_mask(seg))
    where = [(0, slice(0, 9)), (1, slice(0, 4)), (1, slice(4, 10))]
    for doc, (r, s) in zip(docs, where):
        z = naive_head_activations(lorsa, doc)
        torch.testing.assert_close(out.z[r, s].double(), z, rtol=1e-4, atol=1e-5)
        want_out, fired = naive_output(lorsa, z)
        torch.testing.assert_close(out.output[r, s].double(), want_out, rtol=1e-4, atol=1e-4)
        got_fired = torch.zeros_like(fired)
        got_fired.scatter_(-1, out.indices[r, s], out.values[r, s] > 0)
        assert torch.equal(got_fired, fired)
    # Without a mask (one document per row) the causal path gives the same.
    plain = lorsa(docs[0][None], torch.arange(9)[None])
    torch.testing.assert_close(plain.z[0], out.z[0, :9], rtol=1e-5, atol=1e-6)


def test_gradients_flow_to_every_parameter():
    lorsa = random_lorsa(qk_norm=True)
    x = torch.randn(1, 7, D)
    lorsa(x, torch.arange(7)[None]).output.pow(2).sum().backward()
    for name, p in lorsa.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- a real head

@pytest.mark.parametrize("family,head", [("llama", 3), ("qwen3", 1)])
def test_lorsa_reproduces_a_single_real_head(family, head):
    """One QK head = the model's head h; 2 x head_dim OV heads: +-(value column j, output row j),
    so ReLU(z) w_o + ReLU(-z) (-w_o) = z w_o and the kept sum is the head's exact contribution."""
    model = tiny_model(family, seed=3)
    attn = model.base_model.layers[1].self_attn
    if family == "qwen3":
        with torch.no_grad():  # non-trivial q/k norm weights
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
    hd = attn.head_dim
    kv = head // (model.config.num_attention_heads // model.config.num_key_value_heads)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    acts = capture(model, ids, [1], ["attn_in", "attn_z"])
    x, z_model = acts[1, "attn_in"], acts[1, "attn_z"]
    W_o_head = attn.o_proj.weight[:, head * hd:(head + 1) * hd]  # [d, hd]
    want = z_model[..., head * hd:(head + 1) * hd] @ W_o_head.T  # the head's share of attn_out

    cfg = LorsaConfig(n_ov_heads=2 * hd, n_qk_heads=1, d_qk=hd, k=2 * hd, qk_norm=family == "qwen3",
                      qk_norm_eps=model.config.rms_norm_eps)
    lorsa = Lorsa(cfg, D, rope_from_config(model.config, hd, 1))
    rows = slice(kv * hd, (kv + 1) * hd)
    with torch.no_grad():
        lorsa.W_Q[0] = attn.q_proj.weight[head * hd:(head + 1) * hd].T
        lorsa.W_K[0] = attn.k_proj.weight[rows].T
        V, Wo = attn.v_proj.weight[rows], W_o_head.T  # [hd, d] each
        lorsa.W_V.copy_(torch.cat((V, -V)))
        lorsa.W_O.copy_(torch.cat((Wo, -Wo)))
        if cfg.qk_norm:
            lorsa.q_norm[0] = attn.q_norm.weight
            lorsa.k_norm[0] = attn.k_norm.weight
    got = lorsa(x, torch.arange(20).expand(2, 20)).output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() > 1e-2  # not a vacuous comparison


# ----------------------------------------------------------------------------- stores

def write_store(path, lengths, seed, layer=1, d=D):
    """A store of documents (BOS first, EOS ending the odd ones) with structured random activations."""
    g = np.random.default_rng(seed)
    n = int(sum(lengths))
    doc = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    pos = np.concatenate([np.arange(m) for m in lengths]).astype(np.int32)
    keep = pos != 0
    ends = np.cumsum(lengths) - 1
    keep[ends[1::2]] = False
    mix = g.normal(size=(d, d)) / np.sqrt(d)
    x = (g.normal(size=(n, d)) * 2 + 0.5).astype(np.float32)
    x[pos == 0] *= 5.0  # a BOS unlike the rest
    y = (np.tanh(x @ mix) @ mix[:, : d // 2] @ g.normal(size=(d // 2, d))).astype(np.float32)
    with StoreWriter(path, model="tiny", dataset="toy", layer=layer, split="train", n_rows=n,
                     sites={"attn_in": d, "attn_out": d}, logical_dtype="float32", chunk_rows=64,
                     shard_rows=128) as w:
        w.append({"attn_in": x, "attn_out": y}, token_id=np.zeros(n), doc=doc, pos=pos, keep=keep)
    return open_store(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorsa")
    rng = np.random.default_rng(0)
    train = write_store(root / "L1.zarr", rng.integers(5, 40, size=24).tolist(), seed=1)
    heldout = write_store(root / "heldout" / "L1.zarr", rng.integers(5, 40, size=8).tolist(), seed=2)
    return train, heldout


def test_sequence_data_batches_cover_each_document_once(stores):
    train, _ = stores
    data = SequenceData(train)
    x_all = train.rows("attn_in", 0, train.n_rows, kept_only=False)
    seen = []
    for batch in data.epoch_batches(batch_tokens=60, seed=3, epoch=1):
        assert batch.attn_in.shape[1] == data.row_tokens
        for doc in batch.docs:
            where = batch.seg == doc
            a, b = int(data.starts[doc]), int(data.stops[doc])
            np.testing.assert_array_equal(batch.attn_in[where].numpy(), x_all[a:b])
            np.testing.assert_array_equal(batch.pos[where].numpy(), np.arange(b - a))
            np.testing.assert_array_equal(batch.keep[where].numpy(), data.keep[a:b])
        assert int((batch.seg >= 0).sum()) <= max(60, int(data.lengths()[list(batch.docs)].max()))
        assert not batch.keep[batch.seg < 0].any()
        seen += batch.docs
    assert sorted(seen) == list(range(data.n_docs))
    assert seen == data.order(3, 1).tolist()
    assert not np.array_equal(data.order(3, 0), data.order(3, 1))


# ----------------------------------------------------------------------------- dead heads

def test_dead_param_fraction_closed_form():
    cfg = LorsaConfig(n_ov_heads=12, n_qk_heads=3, d_qk=8, k=2)
    dead = np.zeros(12, bool)
    dead[0:4] = True  # QK group 0 wholly dead
    dead[[5, 9]] = True  # one head in each of the other groups
    per_ov, per_qk = n_params_per_head(cfg, D)
    assert per_ov == 2 * D + 1 and per_qk == 2 * 8 * D + 2 * 8
    total = 12 * (2 * D + 1) + 3 * (2 * 8 * D + 2 * 8)
    want = (6 * (2 * D + 1) + 1 * (2 * 8 * D + 2 * 8)) / total
    assert dead_param_fraction(dead, cfg, D) == pytest.approx(want)
    assert dead_param_fraction(np.ones(12, bool), cfg, D) == pytest.approx(1.0)
    assert dead_param_fraction(np.zeros(12, bool), cfg, D) == 0.0
    # The parameter count matches the module's own parameters (minus b_D).
    for qk_norm in (False, True):
        c = LorsaConfig(n_ov_heads=12, n_qk_heads=3, d_qk=8, k=2, qk_norm=qk_norm)
        lorsa = Lorsa(c, D, None)
        per_ov, per_qk = n_params_per_head(c, D)
        assert sum(p.numel() for p in lorsa.parameters()) - D == 12 * per_ov + 3 * per_qk
    np.testing.assert_array_equal(dead_heads(torch.tensor([0, 3, 0, 1])), [True, False, True, False])


def test_dead_counts_equal_an_independent_count(stores, tmp_path):
    """train_lorsa's dead heads / NMSE / token count vs a per-document, per-head recount of the saved Lorsa."""
    train, heldout = stores
    cfg = LorsaConfig(n_ov_heads=24, n_qk_heads=4, d_qk=8, k=3, d_init=6, n_epochs=1, batch_tokens=80,
                      lr=3e-3, log_every=0)
    model_config = tiny_model("llama").config
    metrics = train_lorsa(cfg, train, heldout, None, "vanilla", seed=0, model_config=model_config,
                          out_dir=tmp_path / "run")
    lorsa = load_lorsa(tmp_path / "run")

    data = SequenceData(heldout)
    f_in, f_out = math.sqrt(D) / lorsa.norm_in, math.sqrt(D) / lorsa.norm_out
    fired = np.zeros(cfg.n_ov_heads, dtype=np.int64)
    ys, y_hats = [], []
    with torch.no_grad():
        for a, b in zip(data.starts, data.stops):
            x = torch.from_numpy(heldout.rows("attn_in", int(a), int(b), kept_only=False)) * f_in
            y = torch.from_numpy(heldout.rows("attn_out", int(a), int(b), kept_only=False)).double() * f_out
            z = naive_head_activations(lorsa, x)
            y_hat, on = naive_output(lorsa, z)
            keep = data.keep[a:b]
            fired += on.numpy()[keep].sum(0)
            ys.append(y[keep])
            y_hats.append(y_hat[keep])
    y, y_hat = torch.cat(ys), torch.cat(y_hats)
    dead = fired == 0
    assert metrics["n_eval_tokens"] == heldout.n_kept == y.shape[0]
    assert metrics["dead_heads"] == int(dead.sum())
    assert metrics["dead_param_fraction"] == pytest.approx(dead_param_fraction(dead, cfg, D))
    nmse = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert metrics["nmse"] == pytest.approx(nmse, rel=1e-4)
    # evaluate() on the loaded Lorsa gives the very same counts.
    counts = evaluate(lorsa, data.epoch_batches(50, seed=None)).counts.numpy()
    np.testing.assert_array_equal(counts, fired)
    assert set(TABLE1_COLUMNS) <= set(metrics)


# ----------------------------------------------------------------------------- inits and data order

def test_inits_differ_only_in_w_o_and_asi_lies_in_the_subspace():
    cfg = LorsaConfig(n_ov_heads=24, n_qk_heads=4, d_qk=8, k=3, d_init=5)
    x = torch.randn(500, D, dtype=torch.float64) @ torch.randn(D, D, dtype=torch.float64)
    spec = spectrum_from_gram(x.T @ x, x.sum(0), 500)
    a, b = Lorsa(cfg, D, None), Lorsa(cfg, D, None)
    initialize(a, "vanilla", 7)
    initialize(b, "asi", 7, spec)
    for name, p in a.named_parameters():
        if name != "W_O":
            assert torch.equal(p, dict(b.named_parameters())[name]), name
    torch.testing.assert_close(a.W_O.norm(dim=1), b.W_O.norm(dim=1))
    V = torch.from_numpy(spec.components[:5]).float()
    inside = b.W_O @ V.T @ V
    torch.testing.assert_close(inside, b.W_O.detach(), atol=1e-5, rtol=0)
    assert (a.W_O @ V.T @ V).norm() < 0.7 * a.W_O.norm()
    bound = 1 / math.sqrt(D)
    assert a.W_O.abs().max() <= bound and a.W_V.abs().max() <= 1 / math.sqrt(24)
    with pytest.raises(ValueError):
        initialize(b, "asi", 7, None)


def test_same_data_order_for_both_inits(stores):
    train, heldout = stores
    cfg = LorsaConfig(n_ov_heads=16, n_qk_heads=2, d_qk=8, k=2, d_init=4, n_epochs=2, batch_tokens=100,
                      k_start=6, log_every=0)
    x = torch.from_numpy(train.rows("attn_out", 0, train.n_rows))
    spec = spectrum_from_gram((x.T @ x).double().numpy(), x.sum(0).double().numpy(), x.shape[0])
    model_config = tiny_model("llama").config
    orders, ks = {}, {}
    for init, seed in (("vanilla", 0), ("asi", 0), ("vanilla", 1)):
        seen = []
        train_lorsa(cfg, train, heldout, spec, init, seed, model_config=model_config,
                    on_step=lambda step, batch, loss, seen=seen: seen.append(batch.docs))
        orders[init, seed] = seen
    assert orders["vanilla", 0] == orders["asi", 0]
    assert orders["vanilla", 0] != orders["vanilla", 1]
    n = len(orders["vanilla", 0])
    ks = [cfg.k_at(s, n) for s in range(n)]
    assert ks[0] == 6 and ks[-1] == 2 and all(a >= b for a, b in zip(ks, ks[1:]))


# ----------------------------------------------------------------------------- files and table

def test_save_load_round_trip(tmp_path):
    lorsa = random_lorsa(qk_norm=True, rope_family="gpt_neox")  # partial rotary: 4 of 8 dims
    lorsa.norm_in, lorsa.norm_out = 3.5, 0.25
    save_lorsa(lorsa, tmp_path / "l", model="tiny", layer=1)
    back = load_lorsa(tmp_path / "l")
    for name, p in lorsa.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name
    assert back.rope_inv_freq.shape == (2,)
    assert (back.norm_in, back.norm_out, back.rope_scaling) == (3.5, 0.25, lorsa.rope_scaling)
    x = torch.randn(1, 6, D)
    assert torch.equal(lorsa(x, torch.arange(6)[None]).output, back(x, torch.arange(6)[None]).output)


def test_table1_frame_and_markdown():
    rows = [dict(model="m", dataset="d", layer=1, init=init, seed=0, n_ov_heads=8, n_qk_heads=2, k=2, dead_heads=dh,
                 dead_param_fraction=f, nmse=n, n_eval_tokens=100, extra=0)
            for init, dh, f, n in (("asi", 1, 0.405, 0.121), ("vanilla", 3, 0.684, 0.130))]
    frame = table1_frame(rows)
    assert list(frame.columns) == list(TABLE1_COLUMNS)
    md = table1_markdown(frame)
    assert "| | vanilla | asi |" in md and "| Dead parameters (%) | 68.4 | 40.5 |" in md
    assert "| Normalized MSE | 0.130 | 0.121 |" in md and "one seed" in md
    # three seeds: mean ± standard deviation (ddof 1) in every cell
    seeds = [dict(r, seed=s, dead_param_fraction=r["dead_param_fraction"] + e, nmse=r["nmse"] + e / 10,
                  dead_heads=r["dead_heads"] + 10 * e)
             for r in rows for s, e in enumerate((-0.01, 0.0, 0.01))]
    md = table1_markdown(table1_frame(seeds))
    assert "| Dead parameters (%) | 68.4 ± 1.0 | 40.5 ± 1.0 |" in md and "over 3 seeds" in md
    assert "| Normalized MSE | 0.130 ± 0.001 | 0.121 ± 0.001 |" in md


def test_heads_selected_with_value_zero_are_not_counted(stores):
    """Planted: k = n_ov selects every head on every token; heads with z = -1 everywhere never fire."""
    _, heldout = stores
    cfg = LorsaConfig(n_ov_heads=8, n_qk_heads=2, d_qk=8, k=8)
    lorsa = Lorsa(cfg, D, None)
    initialize(lorsa, "vanilla", 0)
    planted_dead = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)  # QK group 0 wholly dead
    with torch.no_grad():
        lorsa.W_V.zero_()
        lorsa.b_V.copy_(torch.from_numpy(np.where(planted_dead, -1.0, 1.0)))
    result = evaluate(lorsa, SequenceData(heldout).epoch_batches(64, seed=None))
    np.testing.assert_array_equal(dead_heads(result.counts), planted_dead)
    np.testing.assert_array_equal(result.counts.numpy()[~planted_dead], heldout.n_kept)
    per_ov, per_qk = n_params_per_head(cfg, D)
    assert dead_param_fraction(dead_heads(result.counts), cfg, D) == pytest.approx(
        (6 * per_ov + per_qk) / (8 * per_ov + 2 * per_qk))
