"""The architecture matrix (issue 15.3): tiny models of the architectures users merge, each merged with OBIM.

Per architecture, session-scoped: a base (2 blocks, hidden 64, ≤ 4 experts), two perturbed checkpoints and
one OBIM merge with calibration text. Each test then checks one promise on every architecture: the output
loads and holds the merged tensors, no 2-D weight but the embeddings is scored at random, and every linear
map's selection (Linear, Conv1D, fused qkv, LM head, MoE router and each expert) equals a brute-force
re-derivation from the statistics the merge stored. Stored and loaded names differ for GPT-NeoX's LM head
and for MoE experts; both are checked here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from obim_trainer.calibration import ActivationStats, stats_path
from obim_trainer.merging import ParamKind
from obim_trainer.pipeline.layout import ModelLayout
from obim_trainer.pipeline.merge import MergeResult, merge_checkpoints
from tests.architectures import ARCHITECTURES, MOE, tiny_causal_lm
from tests.conftest import VOCAB_SIZE, make_texts, perturbed_copy, save_model_folder, write_jsonl


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Merged:
    """One architecture's inputs, its OBIM merge and what the merge logged."""

    base: Path
    checkpoints: list[Path]
    result: MergeResult
    warnings: list[str]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(Path(self.result.output) / "model.safetensors")

    def stored_stats(self) -> list[ActivationStats]:
        """The activation statistics the merge stored beside each checkpoint, as it recorded them."""
        records = [r for r in self.result.manifest["statistics"] if r["kind"] == "activations"]
        assert [Path(r["checkpoint"]) for r in records] == self.checkpoints
        return [ActivationStats.load(stats_path(Path(r["checkpoint"]), r["key"]), r["key"]) for r in records]


def family(root: Path, tokenizer_dir: Path, architecture: str, **overrides: Any) -> tuple[Path, list[Path]]:
    """A base and two perturbed checkpoints of ``architecture`` saved under ``root``."""
    base = tiny_causal_lm(architecture, **overrides)
    base_dir = save_model_folder(base, root / "base", tokenizer_dir)
    ckpts = [
        save_model_folder(perturbed_copy(base, seed=10 + i, scale=0.05 * (i + 1)), root / f"c{i}", tokenizer_dir)
        for i in range(2)
    ]
    return base_dir, ckpts


@pytest.fixture(scope="session")
def short_calibration(tmp_path_factory) -> Path:
    """12 texts (~800 tokens): enough for every expert of every model here, and a third of the cost of 40."""
    return write_jsonl(tmp_path_factory.mktemp("matrix") / "calib.jsonl", make_texts(12, seed=7))


@pytest.fixture(scope="session", params=list(ARCHITECTURES))
def merged(request, tmp_path_factory, tokenizer_dir, short_calibration) -> Merged:
    root = tmp_path_factory.mktemp(request.param)
    base, ckpts = family(root, tokenizer_dir, request.param)
    records = _Records()
    logging.getLogger("obim_trainer").addHandler(records)
    try:
        result = merge_checkpoints(
            base=base,
            checkpoints=ckpts,
            calibration_data=short_calibration,
            output=root / "merged",
            stats_beside_checkpoints=True,
            progress=False,
        )
    finally:
        logging.getLogger("obim_trainer").removeHandler(records)
    return Merged(base, ckpts, result, records.messages)


def test_the_merge_loads_and_holds_the_merged_tensors(merged):
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    model = AutoModelForCausalLM.from_pretrained(merged.result.output)
    as_stored = revert_weight_conversion(model, model.state_dict())  # the names save_pretrained writes
    tensors = merged.tensors
    assert set(tensors) <= set(as_stored)
    for name, tensor in tensors.items():
        assert torch.equal(as_stored[name], tensor), name


def test_no_two_d_weight_but_the_embeddings_is_scored_at_random(merged):
    plan = {t.name: t for t in merged.result.plan.tensors}
    random_2d = [n for n, t in plan.items() if len(t.shape) == 2 and t.kind is ParamKind.OTHER]
    assert not random_2d
    assert any(t.kind is ParamKind.LINEAR for t in plan.values())
    assert not [m for m in merged.warnings if "got no calibration token" in m]  # every expert was reached
    stats = merged.stored_stats()
    layout = ModelLayout.from_pretrained_dir(merged.base)
    for name, t in plan.items():
        if t.kind is ParamKind.LINEAR:
            assert all(s.count[layout.model_name(name)] > 0 for s in stats), name


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Flat positions by score, highest first, ties to the lowest position (the merge's exact selection)."""
    return torch.sort(scores.flatten(), descending=True, stable=True).indices


def brute_force_obim(name: str, block: int | None, models: list[dict], base: dict, scales: list) -> torch.Tensor:
    """OBIM with n_k = 1/2 for two checkpoints by full sorts: the first in the block's rotated order takes the
    ⌈numel/2⌉ positions of highest δ²·E[x²] (eq. 5), the other the rest; values copied whole."""
    first, second = (block or 0) % 2, (1 + (block or 0)) % 2
    theta_b = base[name].float()
    scores = (models[first][name].float() - theta_b).square() * scales[first]
    taken = _rank(scores)[: -(-theta_b.numel() // 2)]
    out = models[second][name].clone().flatten()
    out[taken] = models[first][name].flatten()[taken]
    return out.view_as(theta_b)


def test_each_linear_map_selection_equals_a_brute_force_from_the_stored_statistics(merged):
    layout = ModelLayout.from_pretrained_dir(merged.base)
    stats = merged.stored_stats()
    base = load_file(merged.base / "model.safetensors")
    models = [load_file(c / "model.safetensors") for c in merged.checkpoints]
    tensors = merged.tensors
    checked = []
    for t in merged.result.plan.tensors:
        if t.kind is not ParamKind.LINEAR:
            continue
        key = layout.model_name(t.name)
        scales = [s.input_sq_mean(key) for s in stats]
        assert torch.equal(tensors[t.name], brute_force_obim(t.name, t.block_index, models, base, scales)), t.name
        checked.append(key)
    assert checked
    if "experts" in " ".join(checked):  # MoE: a router and both maps of an expert were among them
        assert any(k.endswith(".gate.weight") for k in checked)
        assert any(".experts.gate_up_proj." in k for k in checked) and any(".experts.down_proj." in k for k in checked)


def test_gpt_neox_embed_out_is_the_lm_head_and_extended_vocabularies_merge(tokenizer_dir, short_calibration, tmp_path):
    from transformers import AutoModelForCausalLM

    new_rows = 16
    base = tiny_causal_lm("gpt_neox")
    base_dir = save_model_folder(base, tmp_path / "base", tokenizer_dir)
    assert "embed_out.weight" in load_file(base_dir / "model.safetensors")  # stored name, not the loaded one
    layout = ModelLayout.from_pretrained_dir(base_dir)
    assert layout.model_name("embed_out.weight") == "lm_head.weight" == layout.output_embedding
    assert layout.kind("embed_out.weight") is ParamKind.LINEAR and layout.is_vocabulary_tensor("embed_out.weight")

    ckpts = []
    for i in range(2):
        model = perturbed_copy(base, seed=10 + i, scale=0.05 * (i + 1))
        model.resize_token_embeddings(VOCAB_SIZE + new_rows)
        ckpts.append(save_model_folder(model, tmp_path / f"checkpoint-{i + 1}", tokenizer_dir))
    result = merge_checkpoints(
        base=base_dir, checkpoints=ckpts, calibration_data=short_calibration, output=tmp_path / "m", progress=False
    )
    merged = load_file(Path(result.output) / "model.safetensors")
    assert merged["embed_out.weight"].shape == (VOCAB_SIZE + new_rows, 64)
    sds = [load_file(c / "model.safetensors") for c in ckpts]
    new = merged["embed_out.weight"][VOCAB_SIZE:]
    assert bool(torch.stack([sd["embed_out.weight"][VOCAB_SIZE:] == new for sd in sds]).any(0).all())
    loaded = AutoModelForCausalLM.from_pretrained(result.output)
    assert torch.equal(loaded.get_output_embeddings().weight, merged["embed_out.weight"])


@pytest.mark.parametrize("architecture", MOE)
def test_moe_stored_names_map_to_the_router_and_each_expert(architecture, tokenizer_dir, tmp_path):
    base = tiny_causal_lm(architecture)
    stored = load_file(save_model_folder(base, tmp_path / "base", tokenizer_dir) / "model.safetensors")
    layout = ModelLayout.from_pretrained_dir(tmp_path / "base")
    experts = {n: layout.model_name(n) for n in stored if ".experts." in n and ".shared_expert" not in n}
    assert len(experts) == 2 * 4 * 3  # 2 blocks × 4 experts × (gate, up, down)
    for name, key in experts.items():
        expert = name.split(".experts.")[1].split(".")[0]
        fused = "down_proj" if name.endswith(("w2.weight", "down_proj.weight")) else "gate_up_proj"
        assert key.endswith(f".mlp.experts.{fused}.{expert}") and layout.kind(name) is ParamKind.LINEAR
    routers = [n for n in stored if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))]
    assert len(routers) == 2 and all(layout.kind(n) is ParamKind.LINEAR for n in routers)


def test_dry_run_shows_each_tensors_kind_and_statistics(tokenizer_dir, short_calibration, tmp_path):
    base, ckpts = family(tmp_path, tokenizer_dir, "mixtral")
    result = merge_checkpoints(
        base=base, checkpoints=ckpts, calibration_data=short_calibration, output=tmp_path / "m", dry_run=True
    )
    rows = {line.split()[0]: line.split()[1:] for line in result.plan_text.splitlines() if line.startswith("model.")}
    # columns: shape, dtype, kind, statistics, block, how
    assert rows["model.layers.1.block_sparse_moe.experts.3.w2.weight"][2:4] == ["linear", "x²"]
    assert rows["model.layers.0.block_sparse_moe.gate.weight"][2:4] == ["linear", "x²"]
    assert rows["model.layers.0.input_layernorm.weight"][2:4] == ["other", "none"]
    assert rows["model.embed_tokens.weight"][2:4] == ["embedding", "none"]
    assert not (tmp_path / "m").exists()
