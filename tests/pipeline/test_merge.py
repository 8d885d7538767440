"""End-to-end merges through the Python API on tiny real models."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from obim_trainer.calibration import ActivationStats
from obim_trainer.calibration.stats_cache import STATS_DIRNAME, stats_location
from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.merging import native_library as native
from obim_trainer.merging.native_library import native_library
from obim_trainer.pipeline.layout import ModelLayout, block_index
from obim_trainer.pipeline.merge import merge_checkpoints
from tests.conftest import VOCAB_SIZE, copy_tree, make_texts, make_tiny_llama, save_model_folder, write_jsonl
from tests.tiny_training import random_token_rows, training_arguments


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


def stats_of(ckpt: Path, manifest: dict, cache: Path) -> ActivationStats:
    """The statistics a merge used for ``ckpt``, from the cache folder ``cache``."""
    (key,) = [entry["key"] for entry in manifest["statistics"] if entry["checkpoint"] == str(ckpt)]
    return ActivationStats.load(stats_location(ckpt, key, cache, beside=False), key)


def snapshot(*folders: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folders`` (names, bytes, modification times), to show nothing was written there."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()}


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
    cache = tmp_path / "stats"  # not the session's: these statistics must be computed here
    result = merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        output=tmp_path / "merged",
        stats_cache_dir=cache,
        progress=False,
    )
    merged = load_output(result.output)
    base_sd = load_file(base / "model.safetensors")
    ckpt_sds = [load_file(c / "model.safetensors") for c in ckpts]
    stats = [stats_of(c, result.manifest, cache) for c in ckpts]
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
    # its own statistics cache: the session's may hold statistics of the same files (copies keep mtimes)
    common = dict(base=base, checkpoints=ckpts[:2], progress=False, stats_cache_dir=tmp_path / "stats")

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


def test_a_merge_writes_nothing_into_its_inputs_and_records_its_kernels(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    before = snapshot(base, *ckpts, calibration_jsonl.parent)
    result = merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        output=tmp_path / "merged",
        stats_cache_dir=tmp_path / "stats",
        progress=False,
    )
    assert [entry["source"] for entry in result.manifest["statistics"]] == ["computed"] * 3
    assert snapshot(base, *ckpts, calibration_jsonl.parent) == before
    kernels = json.loads((result.output / "obim_merge.json").read_text())["kernels"]
    assert kernels["path"] == ("native" if native_library() is not None else "torch")
    assert ("library" if kernels["path"] == "native" else "reason") in kernels
    beside = merge_checkpoints(
        base=base,
        checkpoints=ckpts,
        calibration_data=calibration_jsonl,
        output=tmp_path / "beside",
        recompute_stats=True,
        stats_beside_checkpoints=True,
        progress=False,
    )
    assert beside.manifest["statistics"][0]["source"] == "computed"
    assert all(len(list((c / STATS_DIRNAME).glob("*.safetensors"))) == 1 for c in ckpts), "asked: written beside"


def test_the_torch_path_is_recorded_with_its_reason(llama_family, calibration_jsonl, tmp_path, monkeypatch):
    base, ckpts = copied_family(llama_family, tmp_path)
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.kernel_state.cache_clear()  # as a new process with the variable set sees it
    try:
        result = merge_checkpoints(
            base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, output=tmp_path / "m", progress=False
        )
    finally:
        native.kernel_state.cache_clear()
    assert result.manifest["kernels"] == {"path": "torch", "origin": "none", "reason": "OBIM_NATIVE_KERNELS=0"}


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
        stats_cache_dir=tmp_path / "stats",  # not the session's, which may know these files already
        progress=False,
    )
    assert [s["source"] for s in result.manifest["statistics"]] == ["computed", "computed"]


# --- every checkpoint format a continued-pretraining run leaves (issue 5) -------------------------------

VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
NEW_TOKENS = 10


def assert_same_outputs(a: Path, b: Path) -> dict[str, torch.Tensor]:
    first, second = load_output(a), load_output(b)
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert tensor.dtype == second[name].dtype and torch.equal(tensor, second[name]), name
    return first


def hf_folder(dest: Path, state: dict[str, torch.Tensor], config_from: Path) -> Path:
    """A plain save_pretrained-style folder holding ``state`` and the config of ``config_from``."""
    dest.mkdir()
    save_file({n: t.contiguous().clone() for n, t in state.items()}, dest / "model.safetensors", {"format": "pt"})
    shutil.copy2(config_from / "config.json", dest / "config.json")
    return dest


def test_zero3_checkpoint_merges_as_its_deepspeed_consolidation(
    zero_checkpoint, tokenizer_dir, calibration_jsonl, tmp_path
):
    """A ZeRO-3 checkpoint-N without saved weights (its fp32 masters are read) beside a 16-bit HF
    checkpoint and an fp32 base: the merge equals merging DeepSpeed's own consolidation of it."""
    zero_to_fp32 = pytest.importorskip("deepspeed.utils.zero_to_fp32")
    run = zero_checkpoint(3)
    base = save_model_folder(make_tiny_llama(seed=0, tie=True), tmp_path / "base", tokenizer_dir)
    zero_only = Path(shutil.copytree(run, tmp_path / "zero3", ignore=shutil.ignore_patterns("model.safetensors")))
    saved = hf_folder(tmp_path / "saved", load_file(run / "model.safetensors"), run)
    consolidated = hf_folder(
        tmp_path / "consolidated", zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(run)), run
    )
    common = dict(base=base, calibration_data=calibration_jsonl, progress=False, stats_cache_dir=tmp_path / "stats")
    result = merge_checkpoints(checkpoints=[zero_only, saved], output=tmp_path / "a", **common)
    merge_checkpoints(checkpoints=[consolidated, saved], output=tmp_path / "b", **common)
    merged = assert_same_outputs(tmp_path / "a", tmp_path / "b")
    assert [c["format"] for c in result.manifest["checkpoints"]] == ["deepspeed-zero", "safetensors"]
    assert [s["source"] for s in result.manifest["statistics"]] == ["computed", "computed"]
    assert {t.dtype for t in merged.values()} == {torch.float32}  # the base's dtype; the inputs mix fp32 and bf16
    assert "lm_head.weight" not in merged  # tied: written once
    base_sd = load_file(base / "model.safetensors")
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base_sd["model.layers.0.mlp.up_proj.weight"])


def test_zero_checkpoint_with_saved_weights_reads_the_masters_on_request(
    zero_checkpoint, tokenizer_dir, calibration_jsonl, tmp_path
):
    run = zero_checkpoint(3)
    base = save_model_folder(make_tiny_llama(seed=0, tie=True), tmp_path / "base", tokenizer_dir)
    both = copy_tree(run, tmp_path / "both")
    masters = Path(shutil.copytree(run, tmp_path / "masters", ignore=shutil.ignore_patterns("model.safetensors")))
    common = dict(base=base, calibration_data=calibration_jsonl, method="task_arithmetic", progress=False)
    default = merge_checkpoints(checkpoints=[both], output=tmp_path / "auto", **common)
    merge_checkpoints(checkpoints=[both], output=tmp_path / "master", zero_weights="master", **common)
    merge_checkpoints(checkpoints=[masters], output=tmp_path / "only-masters", **common)
    assert default.manifest["checkpoints"][0]["format"] == "safetensors"
    assert_same_outputs(tmp_path / "master", tmp_path / "only-masters")
    auto, master = load_output(tmp_path / "auto"), load_output(tmp_path / "master")
    assert any(not torch.equal(auto[n], master[n]) for n in auto), "the 16-bit saved weights are not the masters"


LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "modules_to_save": ["lm_head"]}


@pytest.fixture(scope="module")
def lora_adapters(llama_family, tmp_path_factory) -> list[Path]:
    """Two adapters trained by a real Trainer on the llama family's base (statistics may be cached beside them)."""
    pytest.importorskip("peft")
    from tests.checkpoints.lora_run import train_adapter

    root = tmp_path_factory.mktemp("lora_merge")
    return [train_adapter(llama_family[0], root / f"run{seed}", LORA, seed=seed) for seed in (0, 1)]


def test_obim_over_lora_checkpoints_equals_obim_over_their_merge_and_unload(
    llama_family, lora_adapters, calibration_jsonl, tmp_path
):
    from tests.checkpoints.lora_run import merged_model

    base = llama_family[0]
    unloaded = []
    for k, adapter in enumerate(lora_adapters):
        merged_model(base, adapter).save_pretrained(tmp_path / f"unloaded{k}")
        unloaded.append(tmp_path / f"unloaded{k}")
    common = dict(base=base, calibration_data=calibration_jsonl, progress=False)
    result = merge_checkpoints(checkpoints=lora_adapters, output=tmp_path / "from-adapters", **common)
    merge_checkpoints(checkpoints=unloaded, output=tmp_path / "from-unloaded", **common)
    merged = assert_same_outputs(tmp_path / "from-adapters", tmp_path / "from-unloaded")
    assert [c["format"] for c in result.manifest["checkpoints"]] == ["peft-lora", "peft-lora"]
    base_sd = load_file(base / "model.safetensors")
    changed = {n for n in merged if not torch.equal(merged[n], base_sd[n])}
    assert {"lm_head.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= (
        changed
    )
    assert "model.layers.0.mlp.up_proj.weight" not in changed  # not a LoRA target: no task vector


def train_extended_vocabulary(base: Path, output: Path) -> list[Path]:
    """A real Trainer run after ``resize_token_embeddings``: three checkpoints with NEW_TOKENS more rows, each
    with the extended tokenizer, and the train loss logged at every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([f"<ja{i}>" for i in range(NEW_TOKENS)])
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    data = random_token_rows(12, 16, VOCAB_SIZE - 40, len(tokenizer), seed=0)  # new tokens included
    args = training_arguments(
        output, max_steps=3, save_steps=1, logging_steps=1, eval_strategy="no", learning_rate=2e-2
    )
    Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    return [output / f"checkpoint-{step}" for step in (1, 2, 3)]


@pytest.fixture(scope="module")
def extended_run(llama_family, tmp_path_factory) -> tuple[Path, list[Path], Path]:
    """(base, three extended-vocabulary checkpoints, calibration JSONL using the new tokens); module-owned."""
    root = tmp_path_factory.mktemp("extended")
    ckpts = train_extended_vocabulary(llama_family[0], root / "run")
    texts = [f"{t} <ja{i % NEW_TOKENS}> <ja{(3 * i) % NEW_TOKENS}>" for i, t in enumerate(make_texts(24, seed=3))]
    return llama_family[0], ckpts, write_jsonl(root / "calib.jsonl", texts)


def test_extended_vocabulary_new_rows_are_owned_by_the_checkpoints(extended_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ckpts, calib = extended_run
    result = merge_checkpoints(base=base, checkpoints=ckpts, calibration_data=calib, output=tmp_path / "m")
    out = result.output
    rows = VOCAB_SIZE + NEW_TOKENS
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert len(AutoTokenizer.from_pretrained(out)) == rows  # the checkpoints' tokenizer, not the base's
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape[0] == rows
    assert result.manifest["output"]["vocab_size"] == rows
    merged, sds = load_output(out), [load_file(c / "model.safetensors") for c in ckpts]
    for name in VOCAB_NAMES:
        new = merged[name][VOCAB_SIZE:]
        sources = torch.stack([sd[name][VOCAB_SIZE:] == new for sd in sds])
        assert bool(sources.any(0).all()), f"{name}: a new-row value comes from no checkpoint"
        only = [(sources[k] & ~sources[[j for j in range(3) if j != k]].any(0)).sum() for k in range(3)]
        assert all(int(n) > 0 for n in only), f"{name}: every checkpoint owns a share of the new rows ({only})"


def truncated(ckpt: Path, dest: Path) -> Path:
    """The checkpoint as if it had kept the base's vocabulary: its first VOCAB_SIZE rows."""
    state = load_file(ckpt / "model.safetensors")
    for name in VOCAB_NAMES:
        state[name] = state[name][:VOCAB_SIZE]
    folder = hf_folder(dest, state, ckpt)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB_SIZE}))
    return folder


def test_extended_vocabulary_base_rows_merge_as_without_the_extension(extended_run, tmp_path):
    base, ckpts, calib = extended_run
    common = dict(base=base, calibration_data=calib, tokenizer_source=base, progress=False)  # same calibration ids
    merge_checkpoints(checkpoints=ckpts, output=tmp_path / "extended", **common)
    plain = [truncated(c, tmp_path / f"plain-{c.name}") for c in ckpts]
    merge_checkpoints(checkpoints=plain, output=tmp_path / "plain", **common)
    extended, expected = load_output(tmp_path / "extended"), load_output(tmp_path / "plain")
    assert extended.keys() == expected.keys()
    for name, tensor in expected.items():
        got = extended[name][:VOCAB_SIZE] if name in VOCAB_NAMES else extended[name]
        assert torch.equal(got, tensor), name
    base_sd = load_file(base / "model.safetensors")
    assert not torch.equal(extended["lm_head.weight"][:VOCAB_SIZE], base_sd["lm_head.weight"])


def own_loss(ckpt: Path) -> float:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return next(e["loss"] for e in state["log_history"] if e.get("step") == state["global_step"] and "loss" in e)


@pytest.mark.parametrize("rule", ["first", "best", "average"])
def test_extended_vocabulary_new_rows_rules(rule, extended_run, tmp_path):
    base, ckpts, calib = extended_run
    common = dict(base=base, checkpoints=ckpts, calibration_data=calib, progress=False)
    merge_checkpoints(output=tmp_path / "obim", **common)
    merge_checkpoints(output=tmp_path / rule, new_rows=rule, metric="loss", **common)
    default, merged = load_output(tmp_path / "obim"), load_output(tmp_path / rule)
    sds = [load_file(c / "model.safetensors") for c in ckpts]
    best = min(range(len(ckpts)), key=lambda k: own_loss(ckpts[k]))
    for name in VOCAB_NAMES:
        news = [sd[name][VOCAB_SIZE:] for sd in sds]
        expected = {"first": news[0], "best": news[best], "average": torch.stack(news).mean(0)}[rule]
        assert torch.equal(merged[name][VOCAB_SIZE:], expected), name
        assert torch.equal(merged[name][:VOCAB_SIZE], default[name][:VOCAB_SIZE]), name
        assert not torch.equal(merged[name][VOCAB_SIZE:], default[name][VOCAB_SIZE:]), name
    if rule == "best":
        tokenizer_source = json.loads((tmp_path / rule / "obim_merge.json").read_text())["output"]["tokenizer"]
        assert Path(tokenizer_source) == ckpts[best].resolve()


def test_extended_vocabulary_without_a_tokenizer_in_the_checkpoint_asks_for_one(extended_run, tmp_path):
    base, ckpts, calib = extended_run
    bare = Path(shutil.copytree(ckpts[0], tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*")))
    with pytest.raises(ConfigError, match=r"extend the vocabulary to 330 tokens, but .*bare holds no tokenizer"):
        merge_checkpoints(base=base, checkpoints=[bare, ckpts[1]], calibration_data=calib, output=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_mixed_dtypes_merge_in_float32_and_write_the_base_or_requested_dtype(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = copied_family(llama_family, tmp_path)
    for ckpt, dtype in zip(ckpts, (torch.bfloat16, torch.float16), strict=False):
        state = {n: t.to(dtype) for n, t in load_file(ckpt / "model.safetensors").items()}
        save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    common = dict(base=base, checkpoints=ckpts, calibration_data=calibration_jsonl, progress=False)
    merge_checkpoints(output=tmp_path / "auto", **common)
    merge_checkpoints(output=tmp_path / "bf16", dtype="bfloat16", **common)
    auto, bf16 = load_output(tmp_path / "auto"), load_output(tmp_path / "bf16")
    base_sd = load_file(base / "model.safetensors")
    sds = [load_file(c / "model.safetensors") for c in ckpts]
    for name, tensor in auto.items():
        assert tensor.dtype == torch.float32 and bf16[name].dtype == torch.bfloat16, name
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name  # one rounding, of the float32 result
        sources = torch.stack([base_sd[name] == tensor, *(sd[name].float() == tensor for sd in sds)])
        assert bool(sources.any(0).all()), f"{name}: a value that is no input's"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_checkpoints_sharded_differently_merge_as_unsharded(llama_family, tokenizer_dir, calibration_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ckpts = copied_family(llama_family, tmp_path)
    resharded = []
    for ckpt, size in zip(ckpts, ("60KB", "150KB", "100KB"), strict=True):
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        folder = tmp_path / f"sharded-{ckpt.name}"
        resharded.append(save_model_folder(model, folder, tokenizer_dir, max_shard_size=size))
    maps = [json.loads((f / "model.safetensors.index.json").read_text())["weight_map"] for f in resharded]
    assert len({tuple(sorted(m.items())) for m in maps}) == 3, "the shard boundaries differ"
    common = dict(base=base, calibration_data=calibration_jsonl, progress=False)
    merge_checkpoints(checkpoints=ckpts, output=tmp_path / "single", **common)
    merge_checkpoints(checkpoints=resharded, output=tmp_path / "sharded", **common)
    assert_same_outputs(tmp_path / "single", tmp_path / "sharded")


def test_a_folder_in_no_format_fails_before_anything_is_written(llama_family, calibration_jsonl, tmp_path):
    base, ckpts = llama_family
    junk = tmp_path / "checkpoint-99"
    (junk / "logs").mkdir(parents=True)
    (junk / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError) as caught:
        merge_checkpoints(
            base=base, checkpoints=[ckpts[0], junk], calibration_data=calibration_jsonl, output=tmp_path / "m"
        )
    message = str(caught.value)
    assert f"no checkpoint format recognised in {junk} (found: logs/, weights.npz)" in message
    assert all(s in message for s in ("model.safetensors", "DeepSpeed ZeRO", "PEFT LoRA"))
    assert not (tmp_path / "m").exists()


def test_dry_run_shows_the_extended_vocabulary(extended_run, tmp_path):
    base, ckpts, calib = extended_run
    result = merge_checkpoints(
        base=base, checkpoints=ckpts, calibration_data=calib, output=tmp_path / "m", dry_run=True, new_rows="average"
    )
    assert "vocabulary: the checkpoints extend it to 330 rows; new rows: average" in result.plan_text
    assert "model.embed_tokens.weight" in result.plan_text and "330x64" in result.plan_text


def model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


@pytest.mark.parametrize("shard_size", ["100KB", "5GB"])
def test_two_workers_write_the_bytes_one_worker_writes(llama_family, calibration_jsonl, tmp_path, shard_size):
    base, ckpts = copied_family(llama_family, tmp_path)
    common = {"base": base, "checkpoints": ckpts, "calibration_data": calibration_jsonl, "progress": False}
    one = merge_checkpoints(**common, out_shard_size=shard_size, output=tmp_path / "one")
    two = merge_checkpoints(**common, out_shard_size=shard_size, output=tmp_path / "two", workers=2)
    written = model_files(tmp_path / "one")
    assert len(written) == (1 if shard_size == "5GB" else len(two.manifest["output"]["files"]))
    assert model_files(tmp_path / "two") == written
    assert two.manifest["output"]["workers"] == 2 and one.manifest["output"]["workers"] == 1
    assert two.manifest["ownership_share"] == one.manifest["ownership_share"]
    assert [s["source"] for s in two.manifest["statistics"]] == ["cached"] * 3, "computed once, by the leader"


def test_a_merge_with_cached_statistics_needs_neither_tokenizer_nor_transformers(
    llama_family, calibration_jsonl, tmp_path
):
    """Start-up dominates small merges: with statistics, layout and token ids cached, transformers is not imported."""
    base, ckpts = copied_family(llama_family, tmp_path)
    script = (
        "import sys\n"
        "from obim_trainer.pipeline.merge import merge_checkpoints\n"
        "result = merge_checkpoints(base=sys.argv[1], checkpoints=sys.argv[2:4], calibration_data=sys.argv[4],\n"
        "                           output=sys.argv[5], progress=False)\n"
        "print([s['source'] for s in result.manifest['statistics']], 'transformers' in sys.modules)\n"
    )

    def run(out: str) -> str:
        args = [sys.executable, "-c", script, str(base), str(ckpts[0]), str(ckpts[1]), str(calibration_jsonl)]
        env = {**os.environ, "OBIM_STATS_CACHE": str(tmp_path / "stats")}  # not the session's statistics
        done = subprocess.run([*args, str(tmp_path / out)], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    assert run("first") == "['computed', 'computed'] True"
    assert run("second") == "['cached', 'cached'] False"
    first, second = (tmp_path / out / "model.safetensors" for out in ("first", "second"))
    assert first.read_bytes() == second.read_bytes()
