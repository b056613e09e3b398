"""Lorsa: low-rank sparse attention (He et al. 2025), and the paper's Table 1 comparison.

A Lorsa layer reconstructs a layer's attention output from its attention input with
rank-1 OV heads grouped under shared QK heads, keeping the top k heads per token.

Modules: ``config`` (LorsaConfig), ``rope`` (the target model's RoPE), ``model`` (Lorsa,
the top-k variant, dead heads and dead parameters), ``init`` (vanilla, ASI), ``data``
(whole-document batches from an activation store, normalisation), ``evaluation``,
``train`` (train_lorsa), ``io`` (lorsa.safetensors + lorsa.json), ``table`` (Table 1).

The names below are imported on first use, as in :mod:`attnspace.sae`. The evaluation
module is not called ``evaluate``: importing a submodule sets the package attribute of
its name, which would then hide the function :func:`evaluate`.
"""

import importlib

_EXPORTS = {
    "LorsaConfig": "config",
    "Rope": "rope", "apply_rope": "rope", "rope_cos_sin": "rope", "rope_from_config": "rope", "rotate": "rope",
    "TOPK_VARIANT": "model", "Lorsa": "model", "LorsaOutput": "model", "causal_document_mask": "model",
    "dead_heads": "model", "dead_param_fraction": "model", "n_params_per_head": "model",
    "INITS": "init", "initialize": "init",
    "SequenceBatch": "data", "SequenceData": "data", "normalisation_norms": "data",
    "LorsaEval": "evaluation", "evaluate": "evaluation",
    "StepCallback": "train", "train_lorsa": "train",
    "FORMAT": "io", "load_lorsa": "io", "save_lorsa": "io",
    "TABLE1_COLUMNS": "table", "table1_frame": "table", "table1_markdown": "table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"attnspace.lorsa.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'attnspace.lorsa' has no attribute {name!r}")
