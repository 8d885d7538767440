"""Parameter kinds, block indices and tied embeddings, read from config.json alone."""

from __future__ import annotations

from obim_trainer.merging import ParamKind
from obim_trainer.model_layout import ModelLayout, block_index


def test_llama_kinds_and_untied_embeddings(llama_family):
    layout = ModelLayout.from_pretrained_dir(llama_family[0])
    assert layout.kind("model.layers.0.self_attn.q_proj.weight") is ParamKind.LINEAR
    assert layout.kind("lm_head.weight") is ParamKind.LINEAR
    assert layout.kind("model.embed_tokens.weight") is ParamKind.EMBEDDING
    assert layout.kind("model.layers.1.input_layernorm.weight") is ParamKind.OTHER
    assert not layout.tied and layout.redundant_tied_name({"lm_head.weight", "model.embed_tokens.weight"}) is None


def test_gpt2_conv1d_is_linear_biases_are_other_and_tied(gpt2_family):
    layout = ModelLayout.from_pretrained_dir(gpt2_family[0])
    assert layout.kind("transformer.h.0.attn.c_attn.weight") is ParamKind.LINEAR
    assert layout.kind("transformer.h.0.attn.c_attn.bias") is ParamKind.OTHER
    assert layout.kind("transformer.wpe.weight") is ParamKind.EMBEDDING
    # files saved without the base_model_prefix still match
    assert layout.kind("h.1.mlp.c_fc.weight") is ParamKind.LINEAR
    assert layout.tied
    assert layout.redundant_tied_name({"lm_head.weight", "transformer.wte.weight"}) == "lm_head.weight"
    assert layout.is_vocabulary_tensor("wte.weight")


def test_block_index():
    assert block_index("model.layers.12.mlp.up_proj.weight") == 12
    assert block_index("transformer.h.3.ln_1.bias") == 3
    assert block_index("model.embed_tokens.weight") is None
    assert block_index("model.norm.weight") is None
