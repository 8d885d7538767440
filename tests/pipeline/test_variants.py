"""Several merges of the same checkpoints: method lists and OBIM's total-share sweep."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.errors import ConfigError
from obim_trainer.pipeline.variants import merge_variants, plan_variants, scaled_ratios
from obim_trainer.settings.merge import MergeConfig


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
    folders = {name: result.output for name, result in merge_variants(config, variants, tmp_path / "merges").items()}
    assert folders == {"obim": tmp_path / "merges" / "obim", "obim@0.3": tmp_path / "merges" / "obim@0.3"}
    for path in folders.values():  # each checkpoint still owns a third of what is merged
        shares = json.loads((path / "obim_merge.json").read_text())["ownership_share"]
        assert shares == pytest.approx([1 / 3] * 3, abs=0.01)
    manifest = json.loads((folders["obim@0.3"] / "obim_merge.json").read_text())
    assert manifest["base_share"] == pytest.approx(0.7, abs=0.01)  # the model card states it, measured
    card = (folders["obim@0.3"] / "README.md").read_text()
    assert re.search(r"the base keeps 7\d\.\d%; taken from each checkpoint, in merge order: (\d+\.\d%(, )?){3}", card)
    assert all(9.0 < float(s) < 11.0 for s in re.findall(r"(\d+\.\d)%", card.split("merge order:")[-1]))
    weight = "model.layers.0.mlp.up_proj.weight"
    kept = load_file(folders["obim@0.3"] / "model.safetensors")[weight] == load_file(base / "model.safetensors")[weight]
    assert float(kept.float().mean()) == pytest.approx(0.7, abs=0.01)
    full = load_file(folders["obim"] / "model.safetensors")[weight]
    assert not torch.equal(full, load_file(folders["obim@0.3"] / "model.safetensors")[weight])


def test_a_swept_parameter_makes_one_merge_per_value_for_the_methods_that_have_it():
    variants = plan_variants(["regmean", "ties"], {}, None, num_models=3, sweeps={"base_weight": [0.3, 1.0, 3]})
    assert [v.name for v in variants] == [
        "regmean@base_weight=0.3",
        "regmean@base_weight=1",
        "regmean@base_weight=3",
        "ties",
    ]
    assert [v.params for v in variants[:3]] == [{"base_weight": 0.3}, {"base_weight": 1.0}, {"base_weight": 3}]
    assert variants[1].swept == {"base_weight": 1.0} and variants[3].swept is None


def test_several_swept_parameters_give_their_product_and_combine_with_total_shares():
    variants = plan_variants(["regmean"], {}, None, 2, sweeps={"base_weight": [1, 3], "alpha": [0.9, 1.0]})
    assert [v.name for v in variants] == [
        "regmean@base_weight=1,alpha=0.9",
        "regmean@base_weight=1,alpha=1",
        "regmean@base_weight=3,alpha=0.9",
        "regmean@base_weight=3,alpha=1",
    ]
    obim = plan_variants(["obim"], {"saliency": "forgetting_aware"}, [1.0, 0.4], 2, sweeps={"gamma": [0.5, 2]})
    assert [v.name for v in obim] == ["obim@gamma=0.5", "obim@gamma=2", "obim@0.4@gamma=0.5", "obim@0.4@gamma=2"]
    assert obim[3].params == {"saliency": "forgetting_aware", "ratios": pytest.approx([0.2, 0.2]), "gamma": 2}
    assert obim[3].total_share == 0.4


def test_an_aliased_parameter_is_swept_under_the_name_users_give():
    variants = plan_variants(["magmax", "task_arithmetic"], {}, None, 2, sweeps={"lambda": [0.5, 1]})
    assert [v.name for v in variants] == [
        "magmax@lambda=0.5",
        "magmax@lambda=1",
        "task_arithmetic@lambda=0.5",
        "task_arithmetic@lambda=1",
    ]


@pytest.mark.parametrize(
    ("sweeps", "match"),
    [
        ({"bogus": [1, 2]}, "swept parameter 'bogus' belongs to none"),
        ({"base_weight": []}, "needs a list of values"),
        ({"base_weight": 1.0}, "needs a list of values"),
        ({"ratios": [0.5, 0.5]}, r"sweep their total with total_shares=\[1.0, 0.6\]"),
        ({"base_weight": [1, 1.0]}, "share a folder name"),
    ],
)
def test_bad_sweeps_are_refused_before_merging(sweeps, match):
    with pytest.raises(ConfigError, match=match):
        plan_variants(["regmean", "obim"], {}, None, num_models=2, sweeps=sweeps)


def test_a_bad_swept_value_is_refused_before_the_first_merge():
    with pytest.raises(ConfigError, match="'regmean': base_weight: Input should be greater than 0"):
        plan_variants(["regmean"], {}, None, 2, sweeps={"base_weight": [1, 0]})
