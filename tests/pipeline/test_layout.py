"""Parameter kinds, block indices and tied embeddings, read from config.json alone, and cached."""

from __future__ import annotations

import json

import pytest

from obim_trainer.merging import ParamKind
from obim_trainer.pipeline.layout import ModelLayout, block_index


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


def test_the_layout_is_cached_by_config_content(llama_family, gpt2_family, tmp_path, monkeypatch):
    """Building the model imports transformers (seconds): a second read of the same config uses the cache."""
    monkeypatch.setenv("OBIM_CACHE_DIR", str(tmp_path))
    built = ModelLayout.from_pretrained_dir(llama_family[0])
    assert len(list((tmp_path / "layouts").glob("*.json"))) == 1

    def no_build(folder):
        raise AssertionError(f"{folder} was built again")

    monkeypatch.setattr(ModelLayout, "_built", classmethod(lambda cls, folder: no_build(folder)))
    assert ModelLayout.from_pretrained_dir(llama_family[0]) == built
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_bytes((llama_family[0] / "config.json").read_bytes())
    assert ModelLayout.from_pretrained_dir(copy) == built, "the key is the config's content, not its folder"
    with pytest.raises(AssertionError, match="built again"):
        ModelLayout.from_pretrained_dir(gpt2_family[0])


def test_an_unreadable_cache_entry_is_rebuilt(llama_family, tmp_path, monkeypatch):
    monkeypatch.setenv("OBIM_CACHE_DIR", str(tmp_path))
    built = ModelLayout.from_pretrained_dir(llama_family[0])
    (entry,) = (tmp_path / "layouts").glob("*.json")
    entry.write_text("{not json")
    assert ModelLayout.from_pretrained_dir(llama_family[0]) == built
    assert ModelLayout.from_json(json.loads(entry.read_text())) == built, "rewritten"


def test_input_axes_and_number_of_blocks(llama_family, gpt2_family):
    gpt2 = ModelLayout.from_pretrained_dir(gpt2_family[0])
    assert gpt2.in_axis("transformer.h.0.attn.c_attn.weight") == 0 and gpt2.in_axis("h.1.mlp.c_proj.weight") == 0
    assert gpt2.in_axis("lm_head.weight") == 1 and gpt2.num_blocks == 2
    llama = ModelLayout.from_pretrained_dir(llama_family[0])
    assert llama.in_axis("model.layers.0.mlp.down_proj.weight") == 1 and llama.num_blocks == 2
    assert ModelLayout().num_blocks is None
