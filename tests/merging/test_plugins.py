"""Every built-in method is a well-behaved plugin of the registry: a config in configs/merge, parameters
that round-trip through the manifest, and a merge of every kind of tensor that reads each checkpoint once.

(Third-party plugins through the ``obim_trainer.methods`` entry points: tests/merging/test_registry.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from obim_trainer.merging import ParamKind, TensorTask, available_methods, build_method, registry
from obim_trainer.settings.merge import MergeConfig
from tests.conftest import make_tiny_llama, perturbed_copy

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "merge"
BUILT_IN = {name for name, cls in available_methods().items() if cls.__module__.startswith("obim_trainer.")}
KINDS = {
    "model.embed_tokens.weight": ParamKind.EMBEDDING,
    "model.layers.1.self_attn.k_proj.weight": ParamKind.LINEAR,
    "model.layers.0.mlp.down_proj.weight": ParamKind.LINEAR,
    "model.layers.0.input_layernorm.weight": ParamKind.OTHER,
    "lm_head.weight": ParamKind.LINEAR,
}


def models_for(name: str) -> int:
    cls = available_methods()[name]
    return cls.max_models if cls.max_models is not None and cls.max_models < 3 else 3


def test_the_registry_knows_every_method_of_the_issue():
    expected = {
        "obim", "average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "breadcrumbs",
        "breadcrumbs_ties", "consensus", "pcb", "widen", "model_stock", "slerp", "ties_obm", "ties_im",
        "regmean", "fisher_merging", "lines", "magmax",
    }  # fmt: skip
    assert expected <= BUILT_IN
    assert set(registry.BUILT_IN_MODULES) >= {
        cls.__module__.rsplit(".", 1)[1]
        for cls in available_methods().values()
        if cls.__module__.startswith("obim_trainer.")
    }


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_each_config_builds_its_method(path):
    config = yaml.safe_load(path.read_text())
    assert set(config) - {"method", "params"} <= set(MergeConfig.model_fields), "unknown merge-run settings"
    params = config.get("params", {})
    num_models = len(params["ratios"]) if "ratios" in params else models_for(config["method"])
    method = build_method(config["method"], params, num_models=num_models)
    assert {k: v for k, v in method.describe().items() if k in params} == params


def test_every_built_in_method_has_a_config_named_after_it():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= BUILT_IN


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_described_parameters_round_trip(name):
    num_models = models_for(name)
    described = build_method(name, {}, num_models=num_models).describe()
    assert described.pop("method") == name
    assert build_method(name, described, num_models=num_models).describe() == {"method": name, **described}
    assert all(not key.endswith("_") for key in described), "parameters are spelled as users know them"


@pytest.fixture(scope="module")
def llama_tensors():
    base = make_tiny_llama(seed=2)
    trend = perturbed_copy(base, seed=29, scale=0.1)  # checkpoints of one run share a direction
    ckpts = [perturbed_copy(trend, seed=30 + i, scale=0.05 * (i + 1)) for i in range(3)]
    sds = [m.state_dict() for m in (base, *ckpts)]
    return {name: [sd[name].float() for sd in sds] for name in KINDS}


def statistics_for(method, kind: ParamKind, base: torch.Tensor, num_models: int) -> dict:
    """The TensorTask statistics fields the engine fills for ``method`` (what ``method.statistics()`` asks)."""
    needs, gen = method.statistics(), torch.Generator().manual_seed(1)
    fields: dict = {"num_blocks": 4}
    if kind is ParamKind.LINEAR and (needs.activations or method.needs_activation_stats):
        fields["input_sq_mean"] = [torch.rand(1, base.shape[1], generator=gen) for _ in range(num_models)]
    if kind is ParamKind.LINEAR and needs.grams:
        xs = [torch.randn(3 * base.shape[1], base.shape[1], generator=gen, dtype=torch.float64) for _ in range(4)]
        grams = [x.T @ x / x.shape[0] for x in xs]
        fields["base_gram"], fields["checkpoint_grams"] = grams[0], grams[1 : 1 + num_models]
    if needs.fishers:
        fields["base_fisher"] = torch.rand(base.shape, generator=gen)
        fields["checkpoint_fishers"] = [torch.rand(base.shape, generator=gen) for _ in range(num_models)]
    return fields


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_every_kind_of_tensor_merges_finite_reading_each_checkpoint_once(name, llama_tensors):
    num_models = models_for(name)
    method = build_method(name, {}, num_models=num_models)
    for tensor_name, kind in KINDS.items():
        base, *ckpts = llama_tensors[tensor_name]
        ckpts = ckpts[:num_models]
        loads: list[int] = []

        def load(k: int, ckpts=ckpts, loads=loads) -> torch.Tensor:
            loads.append(k)
            return ckpts[k].clone()

        task = TensorTask(
            name=tensor_name,
            base_float32=base,
            _load=load,
            num_models=num_models,
            kind=kind,
            block_index=1,
            **statistics_for(method, kind, base, num_models),
        )
        merged = method.merge(task).tensor
        assert merged.shape == base.shape and merged.dtype == torch.float32
        assert torch.isfinite(merged).all() and not torch.equal(merged, base), f"{name} on {tensor_name}"
        assert sorted(loads) == list(range(num_models)), f"{name} read checkpoints {loads} for {tensor_name}"


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_checkpoints_equal_to_the_base_give_the_base(name):
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    num_models = models_for(name)
    method = build_method(name, {}, num_models=num_models)
    stats = statistics_for(method, ParamKind.OTHER, base, num_models)
    task = TensorTask.from_tensors("model.norm.weight", base, [base.clone() for _ in range(num_models)], **stats)
    torch.testing.assert_close(method.merge(task).tensor, base)
