"""End-to-end merges through the Python API on tiny real models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from obim_trainer.calibration import ActivationStats
from obim_trainer.calibration.stats_cache import STATS_DIRNAME
from obim_trainer.merge import merge_checkpoints
from obim_trainer.model_layout import ModelLayout, block_index
from tests.conftest import copy_tree, make_texts, write_jsonl


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / shard))
        return out
    return load_file(folder / "model.safetensors")


def copied_family(family, tmp_path: Path) -> tuple[Path, list[Path]]:
    base, ckpts = family
    return copy_tree(base, tmp_path / "base"), [copy_tree(c, tmp_path / c.name) for c in ckpts]


def stats_of(ckpt: Path) -> ActivationStats:
    files = list((ckpt / STATS_DIRNAME).glob("*.safetensors"))
    assert len(files) == 1, files
    return ActivationStats.load(files[0])


def plain_counts(numel: int, ratios: list[float]) -> list[int]:
    """Largest-remainder apportionment written out plainly (ties to the earlier model in the order)."""
    total = math.floor(numel * sum(ratios) + 0.5)
    counts = [math.floor(r * numel) for r in ratios]
    remainders = sorted(range(len(ratios)), key=lambda i: (-(ratios[i] * numel - counts[i]), i))
    for i in remainders[: total - sum(counts)]:
        counts[i] += 1
    return counts


def brute_force_obim(base, ckpts, sq_means, block, ratios):
    """OBIM on one Linear weight, written without the library: saliency, rotation, greedy exclusive picks."""
    k_models = len(ckpts)
    order = list(range(k_models))
    if block is not None:
        order = order[block % k_models :] + order[: block % k_models]
    flat_base = base.flatten().tolist()
    result = list(flat_base)
    taken: set[int] = set()
    counts = plain_counts(base.numel(), [ratios[k] for k in order])
    for k, count in zip(order, counts, strict=False):
        delta = ckpts[k].float() - base.float()
        saliency = (sq_means[k] * delta**2).flatten().tolist()
        candidates = sorted((i for i in range(len(saliency)) if i not in taken), key=lambda i: (-saliency[i], i))
        ck = ckpts[k].flatten().tolist()
        for i in candidates[:count]:
            taken.add(i)
            result[i] = ck[i]
    return torch.tensor(result, dtype=torch.float32).view(base.shape)


@pytest.mark.parametrize("family_name", ["llama_family", "gpt2_family"])
def test_obim_merge_agrees_with_brute_force_on_every_linear_weight(family_name, request, calibration_jsonl, tmp_path):
    base, ckpts = copied_family(request.getfixturevalue(family_name), tmp_path)
    result = merge_checkpoints(
        base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, output=tmp_path / "merged", progress=False
    )
    merged = load_output(result.output)
    base_sd = load_file(base / "model.safetensors")
    ckpt_sds = [load_file(c / "model.safetensors") for c in ckpts]
    stats = [stats_of(c) for c in ckpts]
    layout = ModelLayout.from_pretrained_dir(base)
    linear = [n for n in base_sd if layout.kind(n).value == "linear"]
    assert len(linear) >= 8
    for name in linear:
        expected = brute_force_obim(
            base_sd[name],
            [sd[name] for sd in ckpt_sds],
            [s.input_sq_mean(name) for s in stats],
            block_index(name),
            [1 / 3] * 3,
        )
        torch.testing.assert_close(merged[name].float(), expected, rtol=0, atol=0, msg=name)
    manifest = json.loads((result.output / "obim_merge.json").read_text())
    assert [s["source"] for s in manifest["statistics"]] == ["computed"] * 3
    assert math.isclose(sum(manifest["ownership_share"]), 1.0)


def test_every_position_comes_from_exactly_one_checkpoint_or_base(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        output=tmp_path / "m",
        params={"ratios": [0.3, 0.2, 0.1]},
        progress=False,
    )
    merged = load_output(tmp_path / "m")
    base_sd = load_file(base / "model.safetensors")
    sds = [load_file(c / "model.safetensors") for c in ckpts]
    for name, out in merged.items():
        sources = torch.stack([base_sd[name] == out, *(sd[name] == out for sd in sds)])
        assert bool(sources.any(0).all()), f"{name}: a value comes from nowhere"
        owned_by_ckpt = torch.stack([(sd[name] == out) & (sd[name] != base_sd[name]) for sd in sds]).sum(1)
        numel = out.numel()
        # positions that equal the base are owned by the base unless a checkpoint coincides there
        assert int(owned_by_ckpt.sum()) <= math.floor(0.6 * numel + 0.5), name


def test_output_loads_and_generates_with_tied_embeddings_written_once(gpt2_family, calibration_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ckpts = copied_family(gpt2_family, tmp_path)
    out = merge_checkpoints(
        base=base, checkpoints=ckpts[:2], calibration_data=calibration_jsonl, output=tmp_path / "m", progress=False
    ).output
    names = set(load_output(out))
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the model learns", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 4


def test_bf16_inputs_give_bf16_output_and_sharding(llama_tied_bf16_family, calibration_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ckpts = copied_family(llama_tied_bf16_family, tmp_path)
    out = merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        output=tmp_path / "m",
        out_shard_size="40KB",
        progress=False,
    ).output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())  # noqa: SIM118
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_same_seed_same_bytes_other_seed_changes_only_random_saliency_tensors(
    llama_family, calibration_jsonl, tmp_path
):
    base, ckpts = copied_family(llama_family, tmp_path)
    common = dict(base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, progress=False)
    merge_checkpoints(**common, output=tmp_path / "a", seed=1)
    merge_checkpoints(**common, output=tmp_path / "b", seed=1)
    merge_checkpoints(**common, output=tmp_path / "c", seed=2)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    a, c = load_output(tmp_path / "a"), load_output(tmp_path / "c")
    layout = ModelLayout.from_pretrained_dir(base)
    changed = {n for n in a if not torch.equal(a[n], c[n])}
    assert changed, "another seed must change randomly scored tensors"
    assert all(layout.kind(n).value != "linear" for n in changed)


def test_statistics_are_reused_and_recomputed_when_stale(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    common = dict(base=base, checkpoints=ckpts[:2], progress=False)

    def sources(out: str, calib: Path = calibration_jsonl) -> list[str]:
        result = merge_checkpoints(**common, calibration_data=calib, output=tmp_path / out)
        return [s["source"] for s in result.manifest["statistics"]]

    assert sources("m1") == ["computed", "computed"]
    assert sources("m2") == ["cached", "cached"]
    # the first checkpoint changes on disk: its statistics are stale, the other's are not
    sd = load_file(ckpts[0] / "model.safetensors")
    name = next(iter(sd))
    sd[name] = sd[name] + 0.01
    save_file(sd, ckpts[0] / "model.safetensors", metadata={"format": "pt"})
    assert sources("m3") == ["computed", "cached"]
    # other calibration data: both recomputed
    other = write_jsonl(tmp_path / "other.jsonl", make_texts(20, seed=99))
    assert sources("m4", other) == ["computed", "computed"]


def test_run_dir_selection_picks_best_by_metric(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = llama_family
    run = tmp_path / "run"
    run.mkdir()
    losses = {10: 2.0, 20: 1.5, 30: 1.7}
    for c in ckpts:
        copy_tree(c, run / c.name)
    history = [{"step": s, "eval_ja_loss": v} for s, v in losses.items()]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    result = merge_checkpoints(
        base=base,
        run_dir=run,
        top_k=2,
        metric="eval_ja_loss",
        calibration_data=calibration_jsonl,
        output=tmp_path / "m",
        progress=False,
    )
    assert [p.name for p in result.checkpoints] == ["checkpoint-20", "checkpoint-30"]
    assert [Path(c["path"]).name for c in result.manifest["checkpoints"]] == ["checkpoint-20", "checkpoint-30"]


def test_dry_run_writes_nothing_and_shows_rotated_orders(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = llama_family
    before = {p: p.stat().st_mtime_ns for c in ckpts for p in c.rglob("*")}
    result = merge_checkpoints(
        base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, output=tmp_path / "m", dry_run=True
    )
    assert result.output is None and not (tmp_path / "m").exists()
    assert {p: p.stat().st_mtime_ns for c in ckpts for p in c.rglob("*")} == before
    lines = result.plan_text.splitlines()
    q0 = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj.weight"))
    q1 = next(line for line in lines if line.startswith("model.layers.1.self_attn.q_proj.weight"))
    assert "64x64" in q0 and "linear" in q0
    assert "order [0, 1, 2]" in q0 and "order [1, 2, 0]" in q1


def test_baseline_methods_need_no_calibration_and_compute_no_statistics(llama_family, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    result = merge_checkpoints(
        base=base, checkpoints=ckpts, method="ties", params={"density": 0.5}, output=tmp_path / "ties", progress=False
    )
    assert result.manifest["method"]["method"] == "ties" and result.manifest["statistics"] == []
    assert not any((c / STATS_DIRNAME).exists() for c in ckpts)
    merged = load_output(result.output)
    assert not torch.equal(merged["model.norm.weight"], load_file(base / "model.safetensors")["model.norm.weight"])


def test_ties_obm_computes_statistics(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    result = merge_checkpoints(
        base=base,
        checkpoints=ckpts[:2],
        method="ties_obm",
        calibration_data=calibration_jsonl,
        output=tmp_path / "m",
        progress=False,
    )
    assert [s["source"] for s in result.manifest["statistics"]] == ["computed", "computed"]
