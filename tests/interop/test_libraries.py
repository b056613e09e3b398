"""Against the real SAELens and llamascopium: folders exported here load with each library's own loader
and compute what this pipeline computes; folders saved by each library are judged by ``attnspace
dead-features`` with the dead count of the library's own forward pass; MaskedAdam is llamascopium's rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from llamascopium.models.sae import SAEConfig, SparseAutoEncoder
from llamascopium.models.sparse_dictionary import SparseDictionary
from llamascopium.optim import SparseAdam as LlamascopiumSparseAdam
from safetensors.torch import save_file
from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from attnspace.cli import main
from attnspace.llamascope import export_sae, load_llamascope
from attnspace.sae.io import load_sae, save_sae
from attnspace.sae.model import TopKSAE as PipelineTopKSAE
from attnspace.sae.model import reconstruct
from attnspace.sae.optim import MaskedAdam
from attnspace.store import StoreWriter

D, N, K, ROWS = 16, 96, 4, 1000
LAYER, SITE = 3, "attn_out"
HOOK = f"blocks.{LAYER}.hook_{SITE}"
NORM = 37.5  # raw mean activation norm: f = sqrt(16) / 37.5


def tokens(seed: int, rows: int = ROWS) -> torch.Tensor:
    """Raw activations [rows, D] with mean norm about NORM and a mean offset."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, D, generator=g) + 0.5) * (NORM / math.sqrt(D))


def rand(shape, g, scale=1.0):
    return torch.randn(shape, generator=g) * scale


def pipeline_topk(folder: Path, seed: int = 0) -> Path:
    """A TopK SAE as this pipeline saves it: free decoder norms, dataset-wise norm, some features dead."""
    g = torch.Generator().manual_seed(seed)
    sae = PipelineTopKSAE(D, N, K, dataset_norm=NORM)
    with torch.no_grad():
        sae.W_enc.copy_(rand((N, D), g, 0.4))
        sae.b_enc.copy_(rand((N,), g, 0.2))
        sae.b_enc[:12] = -50.0  # never selected over positive scores elsewhere
        sae.W_dec.copy_(rand((N, D), g) * torch.empty(N, 1).uniform_(0.3, 3.0, generator=g))
        sae.b_dec.copy_(rand((D,), g, 0.1))
    return save_sae(sae, folder, model="m", dataset="d", layer=LAYER, site=SITE)


def llamascope_jumprelu(folder: Path, seed: int = 1) -> Path:
    """A folder like the released LlamaScope SAEs: JumpReLU, one raw-scale threshold, decoder norm in the rule,
    decoder columns not of unit norm."""
    g = torch.Generator().manual_seed(seed)
    W_dec = rand((D, N), g) * torch.empty(1, N).uniform_(0.3, 3.0, generator=g)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps(dict(
        d_model=D, d_sae=N, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="jumprelu", jump_relu_threshold=2.0,
        norm_activation="dataset-wise", dataset_average_activation_norm={"in": NORM, "out": NORM},
        sparsity_include_decoder_norm=True, apply_decoder_bias_to_pre_encoder=False, use_decoder_bias=True)))
    save_file({"encoder.weight": rand((N, D), g, 0.4), "encoder.bias": rand((N,), g, 0.3),
               "decoder.weight": W_dec.contiguous(), "decoder.bias": rand((D,), g, 0.1)},
              str(folder / "checkpoints" / "final.safetensors"))
    return folder


def dense(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(values.shape[0], N).scatter_(1, indices, values)


def agreement(acts, ref_acts, recon, ref_recon) -> dict:
    """Firing set differences (token x feature entries) and the largest differences relative to the largest value."""
    return dict(support_mismatch=int(((acts > 0) != (ref_acts > 0)).sum()),
                acts_rel=float((acts - ref_acts).abs().max() / ref_acts.abs().max()),
                recon_rel=float((recon - ref_recon).abs().max() / ref_recon.abs().max()))


def assert_agree(acts, ref_acts, recon, ref_recon, tol=2e-6) -> None:
    a = agreement(acts, ref_acts, recon, ref_recon)
    assert a["support_mismatch"] == 0, a
    assert a["acts_rel"] < tol and a["recon_rel"] < tol, a


def saelens_forward(folder: Path, x: torch.Tensor):
    sae = SAE.load_from_disk(folder)
    with torch.no_grad():
        acts = sae.encode(x)
        return acts, sae.decode(acts)


def llamascopium_forward(folder: Path, x: torch.Tensor, fold: bool = False):
    """llamascopium's documented inference: normalise by the stored dataset norm, encode, decode, denormalise;
    or (fold) load with the dataset norm folded into the weights and feed raw activations."""
    model = SparseDictionary.from_pretrained(str(folder), fold_activation_scale=fold)
    with torch.no_grad():
        if fold:
            acts = model.encode(x)
            return acts, model.decode(acts)
        batch, scale = model.normalize_activations({model.cfg.hook_point_in: x}, return_scale_factor=True)
        acts = model.encode(batch[model.cfg.hook_point_in])
        return acts, model.decode(acts) / scale[model.cfg.hook_point_out]


# ---- export with this pipeline, load with each library ------------------------------------------------------------


def test_pipeline_topk_exports_to_saelens_and_llamascopium(tmp_path):
    folder = pipeline_topk(tmp_path / "sae")
    x = tokens(10)
    sae = load_sae(folder)  # the pipeline's own TopK SAE
    with torch.no_grad():
        enc = sae.encode(x * sae.norm_factor)
        ref_acts, ref_recon = dense(enc.values, enc.indices), reconstruct(sae, x)
    assert int((ref_acts > 0).sum(0).eq(0).sum()) >= 12  # some dead features, so supports are a real check

    export_sae(folder, "saelens", tmp_path / "saelens")
    loaded = SAE.load_from_disk(tmp_path / "saelens")
    assert isinstance(loaded, TopKSAE) and loaded.cfg.k == K and loaded.cfg.metadata.hook_name == HOOK
    acts, recon = saelens_forward(tmp_path / "saelens", x)
    assert_agree(acts, ref_acts, recon, ref_recon)

    export_sae(folder, "llamascopium", tmp_path / "llamascopium")
    acts, recon = llamascopium_forward(tmp_path / "llamascopium", x)
    assert_agree(acts, ref_acts, recon, ref_recon)
    # Folded into the weights (raw activations in), the activations are on the raw scale: pre / f.
    acts, recon = llamascopium_forward(tmp_path / "llamascopium", x, fold=True)
    assert_agree(acts * sae.norm_factor, ref_acts, recon, ref_recon)


def test_llamascope_jumprelu_exports_to_saelens_and_llamascopium(tmp_path):
    folder = llamascope_jumprelu(tmp_path / "sae")
    x = tokens(11)
    ref = load_llamascope(folder)  # the pipeline's reader: decoder norms folded, values pre x ||dec_i||
    with torch.no_grad():
        ref_acts = ref.encode(x)
        ref_recon = ref.decode(ref_acts)
    fired = (ref_acts > 0).float().sum(1).mean()
    assert 2 < fired < N / 2  # the threshold bites

    export_sae(folder, "saelens", tmp_path / "saelens")
    assert isinstance(SAE.load_from_disk(tmp_path / "saelens"), JumpReLUSAE)
    acts, recon = saelens_forward(tmp_path / "saelens", x)
    assert_agree(acts, ref_acts, recon, ref_recon)

    export_sae(folder, "llamascopium", tmp_path / "llamascopium")
    acts, recon = llamascopium_forward(tmp_path / "llamascopium", x)
    # llamascopium divides the decoder norm back out of its activations (values pre): scale to compare.
    n = SparseDictionary.from_pretrained(str(tmp_path / "llamascopium")).decoder_norm().detach()
    assert_agree(acts * n, ref_acts, recon, ref_recon)
    # llamascopium's fold_activation_scale does not rescale a JumpReLU threshold, so raw inputs then fire a
    # different set: for JumpReLU, normalise with normalize_activations (docs/interop.md says so).
    folded_acts, _ = llamascopium_forward(tmp_path / "llamascopium", x, fold=True)
    assert int(((folded_acts > 0) != (ref_acts > 0)).sum()) > 0


# ---- save with each library, read with this pipeline ---------------------------------------------------------------


def write_store(path: Path, x: torch.Tensor) -> Path:
    rows = x.shape[0]
    with StoreWriter(path, model="m", dataset="d", layer=LAYER, split="heldout", n_rows=rows, sites={SITE: D},
                     logical_dtype="float32", chunk_rows=256, shard_rows=512) as w:
        w.append({SITE: x.numpy()}, np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                 np.arange(rows, dtype=np.int32), np.ones(rows, bool))
    return path


def dead_features_cli(sae_dir: Path, store: Path, out: Path) -> dict:
    main(["dead-features", str(sae_dir), str(store), "--site", SITE, "--out", str(out)])
    return json.loads(out.read_text())


def saelens_sae(kind: str, seed: int, **cfg):
    g = torch.Generator().manual_seed(seed)
    meta = SAEMetadata(hook_name=HOOK, model_name="m")
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K, metadata=meta, **cfg))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N, metadata=meta, **cfg))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, metadata=meta, **cfg))
    with torch.no_grad():
        sae.W_enc.copy_(rand((D, N), g, 0.3))
        sae.b_enc.copy_(rand((N,), g, 0.5))
        sae.b_enc[:10] = -1e3  # dead on any input of this scale
        sae.W_dec.copy_(rand((N, D), g) * torch.empty(N, 1).uniform_(0.3, 3.0, generator=g))
        sae.b_dec.copy_(rand((D,), g, 0.2))
        if kind == "jumprelu":
            sae.threshold.copy_(torch.empty(N).uniform_(0.5, 6.0, generator=g))
    return sae


@pytest.mark.parametrize("kind,cfg", [
    ("topk", dict(rescale_acts_by_decoder_norm=False)),
    ("topk", dict(rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True)),
    ("jumprelu", dict(apply_b_dec_to_input=False)),
    ("standard", dict(apply_b_dec_to_input=True)),
])
def test_saelens_saved_sae_is_judged_like_saelens(tmp_path, kind, cfg):
    sae = saelens_sae(kind, seed=20, **cfg)
    sae.save_model(tmp_path / "sae")
    x = tokens(21) / (NORM / math.sqrt(D))  # SAELens works on the raw scale it was given
    with torch.no_grad():
        lib_acts = sae.encode(x)
        lib_recon = sae.decode(lib_acts)
    ours = load_llamascope(tmp_path / "sae", d_model=D)
    with torch.no_grad():
        acts = ours.encode(x)
        recon = ours.decode(acts)
    # Values: SAELens TopK with rescale_acts_by_decoder_norm reports pre x ||dec_i||, as the folded pipeline reader
    # does; without it, the pipeline reader's folded values are pre x ||dec_i|| where SAELens keeps pre.
    scale = 1.0 if kind == "topk" and cfg["rescale_acts_by_decoder_norm"] else sae.W_dec.norm(dim=1).detach()
    assert_agree(acts, lib_acts * scale, recon, lib_recon)
    record = dead_features_cli(tmp_path / "sae", write_store(tmp_path / "L3.zarr", x), tmp_path / "dead.json")
    lib_dead = int(((lib_acts > 0).sum(0) == 0).sum())
    assert record["n_tokens"] == ROWS and record["dead"] == lib_dead >= 10


def llamascopium_sae(act_fn: str, include_norm: bool, seed: int) -> SparseAutoEncoder:
    torch.manual_seed(seed)
    cfg = SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=D, expansion_factor=N / D, act_fn=act_fn,
                    top_k=K, sparsity_include_decoder_norm=include_norm)
    model = SparseAutoEncoder(cfg)
    model.init_parameters(encoder_uniform_bound=0.5, decoder_uniform_bound=0.5, init_log_jumprelu_threshold_value=0.3)
    with torch.no_grad():
        model.b_E.copy_(torch.randn(N) * 0.5)
        model.b_E[:10] = -1e3
        model.b_D.copy_(torch.randn(D) * 0.2)
        model.W_D.mul_(torch.empty(N, 1).uniform_(0.3, 3.0))
        if act_fn == "jumprelu":
            model.activation_function.log_jumprelu_threshold.copy_(torch.empty(N).uniform_(-1.0, 1.5))
    model.set_dataset_average_activation_norm({HOOK: NORM})
    return model


@pytest.mark.parametrize("act_fn,include_norm", [("topk", False), ("topk", True), ("jumprelu", True),
                                                  ("jumprelu", False), ("relu", True)])
def test_llamascopium_saved_sae_is_judged_like_llamascopium(tmp_path, act_fn, include_norm):
    model = llamascopium_sae(act_fn, include_norm, seed=30)
    model.save_pretrained(tmp_path / "sae")
    model.cfg.save_hyperparameters(tmp_path / "sae")
    x = tokens(31)
    lib_acts, lib_recon = llamascopium_forward(tmp_path / "sae", x)
    ours = load_llamascope(tmp_path / "sae", d_model=D)
    with torch.no_grad():
        acts = ours.encode(x)
        recon = ours.decode(acts)
    # The pipeline reader folds decoder norms (values pre x ||dec_i||); llamascopium reports pre.
    assert_agree(acts, lib_acts * model.decoder_norm().detach(), recon, lib_recon)
    record = dead_features_cli(tmp_path / "sae", write_store(tmp_path / "L3.zarr", x), tmp_path / "dead.json")
    lib_dead = int(((lib_acts > 0).sum(0) == 0).sum())
    assert record["n_tokens"] == ROWS and record["dead"] == lib_dead >= 10


def test_llamascopium_converts_the_saelens_export_to_the_same_sae(tmp_path):
    """llamascopium's own SAELens converter (from_saelens) on the SAELens export computes the same activations."""
    folder = pipeline_topk(tmp_path / "sae", seed=5)
    x = tokens(12)
    export_sae(folder, "saelens", tmp_path / "saelens")
    via = SparseAutoEncoder.from_saelens(SAE.load_from_disk(tmp_path / "saelens"))
    with torch.no_grad():
        acts = via.encode(x)
        recon = via.decode(acts)
    lib_acts, lib_recon = saelens_forward(tmp_path / "saelens", x)
    assert_agree(acts, lib_acts, recon, lib_recon)


# ---- MaskedAdam is llamascopium's SparseAdam ---------------------------------------------------------------------


def test_masked_adam_is_llamascopium_sparse_adam_bit_for_bit():
    g = torch.Generator().manual_seed(7)
    p0 = [torch.randn(40, 6, generator=g), torch.randn(40, generator=g), torch.randn(6, generator=g)]
    ours_p = [p.clone().requires_grad_(True) for p in p0]
    theirs_p = [p.clone().requires_grad_(True) for p in p0]
    ours = MaskedAdam(ours_p, lr=3e-3, betas=(0.9, 0.999), eps=1e-8)
    theirs = LlamascopiumSparseAdam(theirs_p, lr=3e-3, betas=(0.9, 0.999), eps=1e-8)
    for step in range(200):
        active = torch.rand(40, generator=g) < (0.5 if step < 50 else 0.05)
        grads = [torch.randn(40, 6, generator=g) * active[:, None], torch.randn(40, generator=g) * active,
                 torch.randn(6, generator=g)]
        for a, b, grad in zip(ours_p, theirs_p, grads):
            rows = active.nonzero().flatten()
            a.grad = (torch.sparse_coo_tensor(rows[None], grad[rows], grad.shape, check_invariants=False)
                      if grad.dim() == 2 else grad.clone())
            b.grad = grad.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"])
        assert torch.equal(ours.state[a]["exp_avg_sq"], theirs.state[b]["exp_avg_sq"])
        assert ours.state[a]["step"] == theirs.state[b]["step"]
