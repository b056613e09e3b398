"""Shared fixtures: a tiny, randomly initialised Llama with a tokenizer trained
here on the embedded corpus, saved with save_pretrained (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from pydoc_data.topics import topics

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [topics[k] for k in sorted(topics)[:40]]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_llama(folder: Path, n_layers: int = 4, hidden: int = 48, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TINY_HEADS = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),  # final logit soft-capping
    # Like Gemma 3 270M: heads * head_dim (4 * 16 = 64) wider than d_model, one KV head.
    "gemma3": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gpt_neox": dict(num_attention_heads=4),  # parallel residual, biases
}
"""Attention shape of each family's tiny model (d_model 32)."""


def tiny_causal_lm(family: str, seed: int = 0, **config):
    """A randomly initialised causal LM of ``family`` (vocab 64, d_model 32, 3 layers, MLP 64),
    in eval mode; ``config`` adds or overrides config fields."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "gemma2": (Gemma2Config, Gemma2ForCausalLM),
               "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
               "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM)}
    config_cls, model_cls = classes[family]
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, **TINY_HEADS[family])
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**fields, **config})).eval()


def randomise_norms(model, std: float = 0.5):
    """Random norm gains (Gemma initialises them to zero, gain 1 + w), so that a missing or
    misplaced norm cannot pass a test unnoticed. Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, std)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def tiny_config(model_dir: Path) -> dict:
    """A complete config for the tiny model: one model, two embedded corpora, two layers."""
    return {
        "models": {"tiny": {"architecture": "llama", "n_layers": 4, "d_model": 48, "layers": [1, 2],
                            "source": {"kind": "local", "path": str(model_dir)}}},
        "datasets": {"pydocs": {"source": {"kind": "embedded", "name": "python_docs"}},
                     "pycode": {"source": {"kind": "embedded", "name": "python_code"}}},
        "tokens": {"max_doc_tokens": 128, "train_tokens": 1536, "heldout_tokens": 384, "seed": 0},
        "cache": {"chunk_rows": 256, "shard_rows": 512},
        "focus": {"model": "tiny", "dataset": "pydocs", "layer": 2},
        "interventions": {"heldout_tokens": 128},
        "spectrum": {"bootstrap": {"resamples": 20, "groups": 8}},
        "sae": {"expansion": 2, "k": 4, "batch_size": 128, "train_tokens": 512, "buffer_rows": 256,
                "eval_tokens": 256, "lm_eval_tokens": 64, "seeds": 2, "forms": ["uncentred", "centred"]},
        "fig5": {"d_init": [4, 8]},
        "fig6": {"expansion": 2, "k": [2, 4], "d_init": 8},
        "fig7": {"expansion": [1, 2], "k": 4, "d_init": 8},
        "lorsa": {"expansion": 2, "n_qk_heads": 4, "d_qk": 8, "k": 4, "d_init": 8, "epochs": 1,
                  "batch_tokens": 128, "seeds": 2},
    }
