"""SAELens and llamascopium folders without the libraries: exports read back through the pipeline's reader
with the same firing sets and reconstructions, named errors for broken folders, the llamascopium size
rule. The checks against the real packages are in tests/interop (``make test-interop``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from attnspace.cli import main
from attnspace.interop import detect_format, expansion_factor
from attnspace.llamascope import LlamaScopeError, export_sae, load_llamascope
from attnspace.sae.io import save_sae
from attnspace.sae.model import TopKSAE

D, N, K = 8, 40, 3
HOOK = "blocks.2.hook_attn_out"


def pipeline_sae(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(D, N, K, dataset_norm=12.0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        sae.W_dec.mul_(torch.linspace(0.2, 3.0, N)[:, None])  # decoder norms far from 1
    return save_sae(sae, folder, layer=2, site="attn_out")


def jumprelu_folder(folder: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(dict(
        d_model=D, d_sae=N, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="jumprelu", jump_relu_threshold=0.4,
        norm_activation="dataset-wise", dataset_average_activation_norm={"in": 12.0, "out": 12.0},
        sparsity_include_decoder_norm=True, apply_decoder_bias_to_pre_encoder=True)))
    save_file({"encoder.weight": torch.randn(N, D, generator=g), "encoder.bias": torch.randn(N, generator=g) * 0.3,
               "decoder.weight": torch.randn(D, N, generator=g) * torch.linspace(0.2, 3.0, N),
               "decoder.bias": torch.randn(D, generator=g) * 0.3}, str(folder / "checkpoints" / "final.safetensors"))
    return folder


@pytest.mark.parametrize("make", [pipeline_sae, jumprelu_folder])
@pytest.mark.parametrize("to", ["saelens", "llamascopium"])
def test_export_reads_back_with_the_same_firing_set_and_reconstruction(tmp_path, make, to):
    source = make(tmp_path / "sae")
    out = export_sae(source, to, tmp_path / to)
    assert detect_format(out) == to
    x = (torch.randn(500, D, generator=torch.Generator().manual_seed(2)) + 0.3) * 4.0
    a, b = load_llamascope(source), load_llamascope(out)
    with torch.no_grad():
        acts_a, acts_b = a.encode(x), b.encode(x)
        rec_a, rec_b = a.decode(acts_a), b.decode(acts_b)
    assert torch.equal(acts_a > 0, acts_b > 0)
    assert 0 < float((acts_a > 0).float().mean()) < 0.75
    # The reader reports pre x ||dec_i||; the SAELens export carries the dataset norm in its decoder (over f_out).
    scale = a.f_out if to == "saelens" else 1.0
    # float32 rounding, relative to the largest value (folding the decoder bias moves the sums' rounding)
    torch.testing.assert_close(acts_b * scale, acts_a, rtol=0, atol=2e-6 * float(acts_a.abs().max()))
    torch.testing.assert_close(rec_b, rec_a, rtol=0, atol=2e-6 * float(rec_a.abs().max()))
    assert b.hyperparams["hook_point_in"] == HOOK and b.hyperparams["source_format"] == to


def test_export_sae_command_and_its_refusals(tmp_path):
    source = pipeline_sae(tmp_path / "sae")
    main(["export-sae", str(source), "--to", "saelens", str(tmp_path / "out")])
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    with pytest.raises(SystemExit, match="exists. Fix: remove it"):
        main(["export-sae", str(source), "--to", "saelens", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="is not a folder. Fix: pass the folder of one SAE"):
        main(["export-sae", str(tmp_path / "out" / "missing"), "--to", "llamascopium", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()


def test_expansion_factor_gives_d_sae_back_under_llamascopiums_rule():
    for d, n in [(7, 100), (576, 4608), (3, 10), (4096, 1 << 20), (11, 13)]:
        assert int(d * expansion_factor(d, n)) == n


def saelens_folder(folder: Path, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(architecture="jumprelu", d_in=D, d_sae=N, apply_b_dec_to_input=False, normalize_activations="none",
                metadata={"hook_name": HOOK, "sae_lens_version": "6.54.12"})
    base.update(cfg or {})
    (folder / "cfg.json").write_text(json.dumps(base))
    t = dict(W_enc=torch.randn(D, N), b_enc=torch.zeros(N), W_dec=torch.randn(N, D), b_dec=torch.zeros(D),
             threshold=torch.full((N,), 0.5))
    t.update(tensors or {})
    save_file({k: v for k, v in t.items() if v is not None}, str(folder / "sae_weights.safetensors"))
    return folder


def llamascopium_folder(folder: Path, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(sae_type="sae", d_model=D, expansion_factor=N / D, act_fn="topk", top_k=K, hook_point_in=HOOK,
                hook_point_out=HOOK, norm_activation="dataset-wise", sparsity_include_decoder_norm=True)
    base.update(cfg or {})
    (folder / "config.json").write_text(json.dumps(base))
    t = {"W_E": torch.randn(D, N), "b_E": torch.zeros(N), "W_D": torch.randn(N, D), "b_D": torch.zeros(D),
         f"dataset_average_activation_norm.{HOOK}": torch.tensor(3.0)}
    t.update(tensors or {})
    save_file({k: v for k, v in t.items() if v is not None}, str(folder / "sae_weights.safetensors"))
    return folder


BROKEN = [
    ("saelens_arch", lambda f: saelens_folder(f, {"architecture": "gated"}), "architecture 'gated' is not supported"),
    ("saelens_norm", lambda f: saelens_folder(f, {"normalize_activations": "expected_average_only_in"}),
     "fold_activation_norm_scaling_factor"),
    ("saelens_hook_z", lambda f: saelens_folder(f, {"reshape_activations": "hook_z"}), "reshape_activations"),
    ("saelens_no_W_enc", lambda f: saelens_folder(f, tensors={"W_enc": None}), "tensor 'W_enc' is missing"),
    ("saelens_shape", lambda f: saelens_folder(f, tensors={"W_dec": torch.randn(D, N)}), re.escape("W_dec has shape (8, 40), expected (40, 8)")),
    ("saelens_no_threshold", lambda f: saelens_folder(f, tensors={"threshold": None}), "'threshold' is missing"),
    ("saelens_negative", lambda f: saelens_folder(f, tensors={"threshold": torch.full((N,), -0.1)}),
     "thresholds are negative"),
    ("saelens_no_weights", lambda f: (saelens_folder(f), (f / "sae_weights.safetensors").unlink()),
     "sae_weights.safetensors is missing"),
    ("saelens_bad_json", lambda f: (saelens_folder(f), (f / "cfg.json").write_text("{oops")), "not readable JSON"),
    ("saelens_truncated", lambda f: (saelens_folder(f), (f / "sae_weights.safetensors").write_bytes(b"\x01\x02")),
     "not a readable safetensors file"),
    ("ls_crosscoder", lambda f: llamascopium_folder(f, {"sae_type": "crosscoder"}), "sae_type 'crosscoder'"),
    ("ls_batchtopk", lambda f: llamascopium_folder(f, {"act_fn": "batchtopk"}), "act_fn 'batchtopk' is not read"),
    ("ls_tokenwise", lambda f: llamascopium_folder(f, {"norm_activation": "token-wise"}), "'token-wise'"),
    ("ls_no_norm", lambda f: llamascopium_folder(f, tensors={f"dataset_average_activation_norm.{HOOK}": None}),
     "set_dataset_average_activation_norm"),
    ("ls_no_threshold", lambda f: llamascopium_folder(f, {"act_fn": "jumprelu"}),
     "'activation_function.log_jumprelu_threshold' is missing"),
    ("ls_glu", lambda f: llamascopium_folder(f, {"use_glu_encoder": True}), "use_glu_encoder"),
    ("ls_size", lambda f: llamascopium_folder(f, {"expansion_factor": 4}), re.escape("W_E has shape (8, 40), expected (8, 32)")),
    ("weights_only", lambda f: (llamascopium_folder(f), (f / "config.json").unlink()), "cfg.json \\(SAELens\\) or "),
    ("empty", lambda f: f.mkdir(), "none of hyperparams.json, cfg.json, config.json"),
    ("not_a_folder", lambda f: None, "is not a folder"),
]


@pytest.mark.parametrize("name,make,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_saelens_and_llamascopium_folders_name_the_problem(tmp_path, name, make, message):
    folder = tmp_path / "sae"
    make(folder)
    with pytest.raises(LlamaScopeError, match=message):
        load_llamascope(folder)


def test_saelens_relu_and_llamascopium_inference_mode_read_as_plain_rules(tmp_path):
    """'standard' SAELens = JumpReLU at threshold 0; llamascopium 'inference' = no normalisation."""
    g = torch.Generator().manual_seed(4)
    W_enc, b_enc, W_dec = torch.randn(D, N, generator=g), torch.randn(N, generator=g), torch.randn(N, D, generator=g)
    sae = load_llamascope(saelens_folder(tmp_path / "s", {"architecture": "standard"},
                                         dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, threshold=None)))
    ls = load_llamascope(llamascopium_folder(tmp_path / "l", {"norm_activation": "inference", "act_fn": "relu",
                                                              "sparsity_include_decoder_norm": False},
                                             {"W_E": W_enc, "b_E": b_enc, "W_D": W_dec}))
    x = torch.randn(50, D, generator=g)
    pre = x @ W_enc + b_enc
    for model in (sae, ls):
        acts = model.encode(x)
        assert torch.equal(acts > 0, pre > 0)
        torch.testing.assert_close(model.decode(acts), pre.clamp(min=0) @ W_dec)
