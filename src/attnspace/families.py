"""The model families whose sites a hand table names (:mod:`attnspace.sites`); every other causal LM of
the installed transformers has its sites found and proven from the model itself (:mod:`attnspace.architectures`)."""

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "qwen3": "qwen3",
    "gpt_neox": "gpt_neox",
}
"""HF ``config.model_type`` -> family name."""
