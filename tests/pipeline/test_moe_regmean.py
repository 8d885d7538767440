"""RegMean (sequential and not) and Fisher merging on MoE models, whose experts transformers loads fused.

Each expert's stored 2-D tensors must be solved on that expert's own statistics: its Grams over the tokens
routed to it, or its rows of the fused parameter's Fisher diagonal. References are computed here by hand
from the statistics files the merge stored, in float64.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from obim_trainer.calibration import stats_path
from obim_trainer.calibration.fisher_stats import FisherStats
from obim_trainer.calibration.gram_stats import GramStats
from obim_trainer.pipeline.layout import ModelLayout
from obim_trainer.pipeline.merge import MergeResult, merge_checkpoints
from tests.architectures import COMMON, EXPERTS, MOE, tiny_causal_lm
from tests.conftest import perturbed_copy, save_model_folder, write_jsonl
from tests.test_architectures import family

EXPERT = "model.layers.1.block_sparse_moe.experts.2.{}.weight"
"""A Mixtral expert's stored tensor (w1 gate, w3 up, w2 down)."""


def _merge(base: Path, ckpts: list[Path], files: dict[str, Path], output: Path, method: str, **params) -> MergeResult:
    return merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        calibration_data=files,
        new_languages=["zh"],
        method=method,
        params=params,
        output=output,
        stats_beside_checkpoints=True,  # where the tests read them back
        progress=False,
    )


def _stored(result: MergeResult, kind: str, load) -> list:
    """The statistics of ``kind`` the merge recorded (base first), loaded with ``load(path, key)``."""
    records = [r for r in result.manifest["statistics"] if r["kind"].startswith(kind)]
    assert records, result.manifest["statistics"]
    return [load(stats_path(Path(r["checkpoint"]), r["key"]), r["key"]) for r in records]


@pytest.mark.parametrize("architecture", MOE)
def test_sequential_regmean_solves_every_expert_and_loads(
    architecture, tokenizer_dir, language_files, tmp_path, caplog
):
    base, ckpts = family(tmp_path, tokenizer_dir, architecture)
    with caplog.at_level(logging.WARNING):
        result = _merge(base, ckpts, language_files, tmp_path / "merged", "regmean")
    assert result.manifest["method"]["sequential"] is True
    assert not [r for r in caplog.records if "experts" in r.getMessage()]  # every expert reached on both sides
    merged = load_file(Path(result.output) / "model.safetensors")
    models = [load_file(Path(d) / "model.safetensors") for d in (base, *ckpts)]
    experts = [n for n in merged if ".experts." in n and ".shared_expert" not in n]
    assert len(experts) == 2 * 4 * 3
    for name in experts:  # solved, not the shrink rule θ_B + mean δ/(1+c) of parameters without statistics
        shrunk = models[0][name] + sum(m[name] - models[0][name] for m in models[1:]) / len(ckpts) / 2
        assert not torch.allclose(merged[name], shrunk, atol=1e-5), name
    loaded = AutoModelForCausalLM.from_pretrained(result.output).state_dict()
    first = next(n for n in loaded if n.endswith("experts.gate_up_proj"))
    assert torch.isfinite(loaded[first]).all() and not torch.equal(loaded[first], torch.zeros_like(loaded[first]))


def test_sequential_equals_non_sequential_where_the_merged_inputs_are_the_originals(
    tokenizer_dir, language_files, tmp_path
):
    """Checkpoints that differ from the base only in block 1's experts: up to them the merged model is the base
    (on old text) and each checkpoint (on new text), its router routes as theirs do, so every expert's first
    projection must be the non-sequential solve on the per-expert Grams over the routed tokens."""
    base = tiny_causal_lm("mixtral")
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    ckpts = []
    for i in range(2):
        ckpt = tiny_causal_lm("mixtral")
        experts = ckpt.model.layers[1].mlp.experts
        gen = torch.Generator().manual_seed(50 + i)
        with torch.no_grad():
            for p in (experts.gate_up_proj, experts.down_proj):
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen))
        ckpts.append(save_model_folder(ckpt, tmp_path / f"c{i}", tokenizer_dir))
    sequential = _merge(base_dir, ckpts, language_files, tmp_path / "s", "regmean", base_weight=2.0)
    fixed = _merge(base_dir, ckpts, language_files, tmp_path / "f", "regmean", base_weight=2.0, sequential=False)
    s, f = (load_file(Path(r.output) / "model.safetensors") for r in (sequential, fixed))
    original = load_file(base_dir / "model.safetensors")
    for e in range(4):
        for proj in ("w1", "w3"):
            name = f"model.layers.1.block_sparse_moe.experts.{e}.{proj}.weight"
            torch.testing.assert_close(s[name], f[name], rtol=1e-4, atol=1e-5)
            assert (s[name] - original[name]).abs().max() > 1e-3, name  # not trivially the base


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, tokenizer_dir) -> tuple[Path, list[Path]]:
    return family(tmp_path_factory.mktemp("mixtral"), tokenizer_dir, "mixtral")


def test_non_sequential_expert_equals_least_squares_on_its_stored_grams(mixtral, language_files, tmp_path):
    base, ckpts = mixtral
    c = 2.0
    result = _merge(base, ckpts, language_files, tmp_path / "m", "regmean", base_weight=c, sequential=False)
    grams = _stored(result, "grams", GramStats.load)
    layout = ModelLayout.from_pretrained_dir(base)
    merged = load_file(Path(result.output) / "model.safetensors")
    for proj in ("w1", "w2"):
        name = EXPERT.format(proj)
        g = [stats.gram(layout.model_name(name)) for stats in grams]
        assert all(x is not None and float(x.abs().sum()) > 0 for x in g), name  # the expert's own, routed tokens
        w = [load_file(Path(d) / "model.safetensors")[name].double() for d in (base, *ckpts)]
        k = len(ckpts)
        # stacked problem: rows √(c)·L_Bᵀ against √(c)·L_BᵀW_Bᵀ and √(1/K)·L_kᵀ against √(1/K)·L_kᵀW_kᵀ (G = L·Lᵀ)
        factors = [torch.linalg.cholesky(x + 1e-12 * torch.eye(x.shape[0], dtype=x.dtype)) for x in g]
        weights = [c] + [1.0 / k] * k
        a = torch.cat([wt**0.5 * f.T for wt, f in zip(weights, factors, strict=True)])
        b = torch.cat([wt**0.5 * f.T @ wi.T for wt, f, wi in zip(weights, factors, w, strict=True)])
        expected = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-4, atol=1e-5)


def test_fisher_merging_weighs_each_expert_by_its_rows_of_the_fused_fisher(mixtral, language_files, tmp_path):
    base, ckpts = mixtral
    result = _merge(base, ckpts, language_files, tmp_path / "m", "fisher_merging")
    fishers = _stored(result, "fisher", FisherStats.load)
    merged = load_file(Path(result.output) / "model.safetensors")
    k = len(ckpts)
    for proj in ("w1", "w3", "w2"):
        name = EXPERT.format(proj)
        f = [stats.fisher(name).double() for stats in fishers]
        w = [load_file(Path(d) / "model.safetensors")[name].double() for d in (base, *ckpts)]
        assert f[0].shape == w[0].shape and float(f[1].sum()) > 0, name
        numerator = f[0] * w[0] + sum(fk * wk for fk, wk in zip(f[1:], w[1:], strict=True)) / k
        expected = numerator / (f[0] + sum(f[1:]) / k)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sequential", [True, False])
def test_experts_a_side_never_reaches_keep_the_shrink_rule_with_a_warning(
    mixtral, language_files, tmp_path, caplog, sequential
):
    """New-language text of one short text reaches only some experts (top-2 of 4, a few tokens): those get
    θ_B + mean δ/(1+c), every other expert is solved, and a warning counts them (sequential: one for the merge;
    otherwise the statistics pass's, per model)."""
    base, ckpts = mixtral
    files = {"en": language_files["en"], "zh": write_jsonl(tmp_path / "zh.jsonl", ["a"])}
    with caplog.at_level(logging.WARNING):
        result = _merge(base, ckpts, files, tmp_path / "m", "regmean", base_weight=3.0, sequential=sequential)
    warnings = [r.getMessage() for r in caplog.records if "calibration token" in r.getMessage()]
    assert len(warnings) == 1 if sequential else len(warnings) >= 1, warnings
    merged = load_file(Path(result.output) / "model.safetensors")
    models = [load_file(Path(d) / "model.safetensors") for d in (base, *ckpts)]
    shrunk, solved = 0, 0
    for layer in range(2):
        for e in range(4):
            name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"
            mean_delta = sum(m[name] - models[0][name] for m in models[1:]) / len(ckpts)
            if torch.allclose(merged[name], models[0][name] + mean_delta / 4.0, rtol=0, atol=1e-6):
                shrunk += 1
            else:
                solved += 1
    assert shrunk >= 1 and solved >= 1
    if sequential:
        assert warnings[0].startswith(f"{shrunk} MoE expert(s)")


@pytest.mark.parametrize(("method", "warned"), [("obim", "scored at random"), ("fisher_merging", None)])
def test_experts_stored_fused_are_named_in_one_warning(method, warned, tokenizer_dir, language_files, tmp_path, caplog):
    """gpt-oss stores its experts as 3-D tensors ``[E, in, out]``: no per-expert statistics exist for them, so a
    method that reads per-map statistics says so once (OBIM: scored at random); Fisher diagonals cover them."""
    import transformers

    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no GptOssConfig")
    config = transformers.GptOssConfig(
        **{**COMMON, **EXPERTS, "intermediate_size": 32, "num_local_experts": 4, "head_dim": 16},
        layer_types=["sliding_attention", "full_attention"],
    )
    base = transformers.AutoModelForCausalLM.from_config(config)
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    ckpts = [save_model_folder(perturbed_copy(base, seed=10 + i, scale=0.05), tmp_path / f"c{i}", None) for i in (0, 1)]
    fused = [n for n, t in load_file(base_dir / "model.safetensors").items() if t.dim() == 3]
    assert len(fused) == 4  # 2 blocks × (gate_up_proj, down_proj)
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(
            base=base_dir,
            checkpoints=ckpts,
            calibration_data=language_files,
            new_languages=["zh"],
            method=method,
            output=tmp_path / "m",
            dry_run=True,
        )
    warnings = [r.getMessage() for r in caplog.records if "stored fused" in r.getMessage()]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("4 tensor(s)") and warned in warnings[0], warnings
