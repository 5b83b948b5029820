"""Tiny random LLaMA-family (and Qwen2) Hugging Face checkpoints, written by transformers itself (the reference)."""
from __future__ import annotations

from pathlib import Path

import torch

# name -> transformers config kwargs. Every variant has a vocabulary that needs padding (not a multiple of 128).
VARIANTS = {
    # GQA (4 heads / 2 KV groups), untied embeddings
    "gqa": dict(kind="llama", vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
    # tied embeddings, like SmolLM
    "tied": dict(kind="llama", vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0),
    # Llama-3.1 rope scaling with non-default low/high factors and original max positions
    "llama31": dict(kind="llama", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    max_position_embeddings=256, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                  "high_freq_factor": 8.0, "original_max_position_embeddings": 16}),
    # Mistral: a sliding window shorter than the tests' sequences, so logits match only if it is applied
    "mistral": dict(kind="mistral", vocab_size=130, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=8,
                    rope_theta=1000000.0),
    # Qwen2/2.5: q/k/v biases, tied embeddings, rope theta 1e6; the sliding-window fields present but disabled
    # (use_sliding_window false), so logits match only if the window is not applied
    "qwen2": dict(kind="qwen2", vocab_size=210, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
                  use_sliding_window=False, sliding_window=8, max_window_layers=2),
}


def make_tiny_hf(out_dir: str | Path, variant: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 **overrides) -> Path:
    """Save a randomly initialised model of the variant (every weight random, norms too); `overrides` change
    config fields (e.g. vocab_size to match a real tokenizer)."""
    import transformers

    kwargs = {**VARIANTS[variant], **overrides}
    kind = kwargs.pop("kind")
    family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    config_cls, model_cls = getattr(transformers, family + "Config"), getattr(transformers, family + "ForCausalLM")
    config = config_cls(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None, **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1.0; randomise so a swapped norm cannot go unnoticed
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model = model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out
