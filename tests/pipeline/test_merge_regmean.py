"""RegMean through the command: the sequential merge (the default) and the merge on cached Grams
(``sequential: false``) from per-language calibration files, with what they did in ``obim_merge.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from obim_trainer.calibration.preparation import prepare_language_calibration
from obim_trainer.cli import main
from obim_trainer.merging.regmean import RIDGED_NOTE
from obim_trainer.settings.merge import MergeConfig
from tests.calibration.test_gram_stats import reference_grams
from tests.conftest import make_texts, write_jsonl
from tests.pipeline.test_sequential_regmean import _merge


@pytest.fixture(scope="module")
def language_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("languages")
    return {
        "en": write_jsonl(folder / "en.jsonl", make_texts(10, seed=31, min_words=10)),
        "zh": write_jsonl(folder / "zh.jsonl", make_texts(10, seed=32, min_words=10)),
    }


def _command(base: Path, ckpts: list[Path], files: dict[str, Path], output: Path, *extra: str) -> dict:
    calibration = [f"{language}={path}" for language, path in files.items()]
    args = ["--base", str(base), "--checkpoints", *map(str, ckpts), "--method", "regmean", "--output", str(output)]
    assert main([*args, "--calibration-data", *calibration, "--new-language", "zh", "--no-progress", *extra]) == 0
    return json.loads((output / "obim_merge.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


def test_the_command_merges_layer_by_layer_on_each_side_s_text(llama_family, language_files, tmp_path):
    base, ckpts = llama_family
    manifest = _command(base, ckpts, language_files, tmp_path / "merged")
    config = MergeConfig.build(
        {"base": base, "checkpoints": ckpts, "output": tmp_path / "x", "calibration_data": language_files}
    )
    sets = prepare_language_calibration(config, config.base).sets
    expected, _, report = _merge(base, ckpts, sets["en"], sets["zh"])
    written = _weights(tmp_path / "merged")
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert manifest["method"]["sequential"] is True
    assert manifest["notes"] == {RIDGED_NOTE: report.ridge_count}
    assert manifest["calibration"]["measured_on"] == {"checkpoints": ["zh"], "base": ["en"]}
    assert manifest["statistics"] == []  # nothing cached: the texts themselves are run through the models
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")


def test_sequential_false_solves_each_map_on_the_grams_of_the_original_models(llama_family, language_files, tmp_path):
    base, ckpts = llama_family
    _command(base, ckpts, language_files, tmp_path / "fixed", "--param", "sequential=false", "--param", "base_weight=2")
    config = MergeConfig.build(
        {"base": base, "checkpoints": ckpts, "output": tmp_path / "x", "calibration_data": language_files}
    )
    sets = prepare_language_calibration(config, config.base).sets
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in (base, *ckpts)]
    grams = [reference_grams(m, sets["en" if i == 0 else "zh"]) for i, m in enumerate(models)]
    written, k, c, checked = _weights(tmp_path / "fixed"), len(ckpts), 2.0, 0
    for name in grams[0]:
        weights = [m.state_dict()[name].double() for m in models]
        numerator = c * weights[0] @ grams[0][name]
        numerator += sum(w @ g[name] for w, g in zip(weights[1:], grams[1:], strict=True)) / k
        total = c * grams[0][name] + sum(g[name] for g in grams[1:]) / k
        expected = numerator @ torch.linalg.inv(total)
        if torch.linalg.cond(total) < 1e4:  # o_proj's Gram (cond ~1e6 here) turns float32 noise into 1e-4
            torch.testing.assert_close(written[name].double(), expected, rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 12
