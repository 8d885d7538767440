"""Several merges of the same checkpoints: method lists and OBIM's total-share sweep."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.config import MergeConfig
from obim_trainer.errors import ConfigError
from obim_trainer.variants import merge_variants, plan_variants, scaled_ratios


def test_shares_apply_to_obim_only_and_split_as_the_ratios_say():
    variants = plan_variants(["obim", "ties"], {"density": 0.4}, [1.0, 0.6], num_models=3)
    assert [v.name for v in variants] == ["obim", "obim@0.6", "ties"]
    assert variants[1].params["ratios"] == pytest.approx([0.2, 0.2, 0.2]) and variants[1].total_share == 0.6
    assert "density" not in variants[0].params and variants[2].params == {"density": 0.4}
    weighted = plan_variants(["obim"], {"ratios": [0.1, 0.3]}, [0.8], num_models=2)
    assert weighted[0].params["ratios"] == pytest.approx([0.2, 0.6])


def test_per_method_params_override_shared_ones():
    variants = plan_variants(["ties", "dare_ties"], {"density": 0.4, "ties": {"density": 0.9}}, None, num_models=2)
    assert [v.params["density"] for v in variants] == [0.9, 0.4]


@pytest.mark.parametrize(
    ("methods", "params", "shares", "match"),
    [
        (["obim"], {}, [1.5], "must lie in"),
        (["obim"], {}, [0.6, 0.6], "share a folder name"),
        (["obim", "ties"], {"bogus": 1}, None, "belongs to none"),
        (["nope"], {}, None, "unknown merge method"),
        ([], {}, None, "no merge method"),
    ],
)
def test_bad_variants_are_refused_before_merging(methods, params, shares, match):
    with pytest.raises(ConfigError, match=match):
        plan_variants(methods, params, shares, num_models=2)


def test_scaled_ratios_need_one_positive_ratio_per_checkpoint():
    with pytest.raises(ConfigError, match="one positive ratio per checkpoint"):
        scaled_ratios([0.5], 0.6, num_models=2)


def test_a_smaller_total_share_keeps_the_rest_of_the_base(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = llama_family
    config = MergeConfig.build(
        {"base": base, "checkpoints": ckpts, "calibration_data": calibration_jsonl, "output": tmp_path / "x"}
    )
    variants = plan_variants(["obim"], {}, [1.0, 0.3], num_models=len(ckpts))
    folders = merge_variants(config, variants, tmp_path / "merges")
    assert folders == {"obim": tmp_path / "merges" / "obim", "obim@0.3": tmp_path / "merges" / "obim@0.3"}
    for path in folders.values():  # each checkpoint still owns a third of what is merged
        shares = json.loads((path / "obim_merge.json").read_text())["ownership_share"]
        assert shares == pytest.approx([1 / 3] * 3, abs=0.01)
    weight = "model.layers.0.mlp.up_proj.weight"
    kept = load_file(folders["obim@0.3"] / "model.safetensors")[weight] == load_file(base / "model.safetensors")[weight]
    assert float(kept.float().mean()) == pytest.approx(0.7, abs=0.01)
    full = load_file(folders["obim"] / "model.safetensors")[weight]
    assert not torch.equal(full, load_file(folders["obim@0.3"] / "model.safetensors")[weight])
