"""Tiny random LLaMA-family (Qwen, MoE) Hugging Face checkpoints, written by transformers itself (the reference)."""
from __future__ import annotations

from pathlib import Path

import torch

# name -> transformers config kwargs. Every variant has a vocabulary that needs padding (not a multiple of 128).
VARIANTS = {
    # GQA (4 heads / 2 KV groups), untied embeddings
    "gqa": dict(kind="llama", vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
    # tied embeddings and Llama-3 rope scaling, like Llama-3.2 (SmolLM: tied, no scaling)
    "tied": dict(kind="llama", vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0,
                 max_position_embeddings=256,
                 rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Llama-3.1 rope scaling with non-default low/high factors and original max positions
    "llama31": dict(kind="llama", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    max_position_embeddings=256, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                  "high_freq_factor": 8.0, "original_max_position_embeddings": 16}),
    # linear rope scaling (position interpolation, transformers' "linear"): every frequency divided by the factor
    "linear_rope": dict(kind="llama", vocab_size=180, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        max_position_embeddings=256, rope_theta=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # Mistral: a sliding window shorter than the tests' sequences, so logits match only if it is applied
    "mistral": dict(kind="mistral", vocab_size=130, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=8,
                    rope_theta=1000000.0),
    # Qwen2/2.5: q/k/v biases, tied embeddings, rope theta 1e6; the sliding-window fields present but disabled
    # (use_sliding_window false), so logits match only if the window is not applied
    "qwen2": dict(kind="qwen2", vocab_size=210, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
                  use_sliding_window=False, sliding_window=8, max_window_layers=2),
    # Qwen3: per-head q/k norms, head_dim 32 where hidden / heads is 16, untied (as Qwen3-8B)
    "qwen3": dict(kind="qwen3", vocab_size=190, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                  rope_theta=1000000.0, use_sliding_window=False),
    # mixture of experts (every expert's down projection is zeroed by expansion besides o_proj)
    # Mixtral: 4 experts, top 2, the experts' FFN size is intermediate_size
    "mixtral": dict(kind="mixtral", vocab_size=140, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    tie_word_embeddings=False, rope_theta=1000000.0, router_aux_loss_coef=0.02),
    # Qwen3-MoE: q/k norms, head_dim 32, 4 experts of FFN 32 (moe_intermediate_size), top 2, renormalised weights
    "qwen3_moe": dict(kind="qwen3_moe", vocab_size=170, hidden_size=64, intermediate_size=96,
                      moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                      tie_word_embeddings=False, rope_theta=1000000.0, router_aux_loss_coef=0.001),
}
MOE_VARIANTS = ("mixtral", "qwen3_moe")
_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
             "qwen3_moe": "Qwen3Moe"}


def make_tiny_hf(out_dir: str | Path, variant: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                 **overrides) -> Path:
    """Save a randomly initialised model of the variant (every weight random, norms too); `overrides` change
    config fields (e.g. vocab_size to match a real tokenizer)."""
    import transformers

    kwargs = {**VARIANTS[variant], **overrides}
    family = _FAMILIES[kwargs.pop("kind")]
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
