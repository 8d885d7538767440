"""Tiny causal LMs of every architecture the tests merge, from configs (never from the hub): one builder."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import VOCAB_SIZE

COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
GQA = {"num_key_value_heads": 2}
EXPERTS = {**GQA, "num_experts_per_tok": 2}
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", GQA),
    "qwen2": ("Qwen2Config", GQA),
    "qwen3": ("Qwen3Config", {**GQA, "head_dim": 16}),
    "mistral": ("MistralConfig", GQA),
    "gemma2": ("Gemma2Config", {**GQA, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {**GQA, "head_dim": 16}),
    "phi3": ("Phi3Config", GQA),
    "gpt2": ("GPT2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {"tie_word_embeddings": False}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "falcon": ("FalconConfig", {}),
    "bloom": ("BloomConfig", {}),
    "stablelm": ("StableLmConfig", GQA),
    "olmo": ("OlmoConfig", GQA),
    "olmo2": ("Olmo2Config", GQA),
    "mixtral": ("MixtralConfig", {**EXPERTS, "num_local_experts": 4, "intermediate_size": 64}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {**EXPERTS, "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
    ),
    "qwen3_moe": ("Qwen3MoeConfig", {**EXPERTS, "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16}),
    "llama_tied": ("LlamaConfig", {**GQA, "tie_word_embeddings": True}),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_causal_lm(architecture: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``architecture`` (a key of :data:`ARCHITECTURES`).

    Skips the test when the installed transformers lacks the architecture.
    """
    import transformers

    config_name, specific = ARCHITECTURES[architecture]
    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config_class(**{**COMMON, **specific, **overrides}))
