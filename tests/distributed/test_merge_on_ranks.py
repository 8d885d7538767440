"""A merge, and a sweep of variants, split between two real gloo ranks write the bytes of one-process
merges, and a failure on one rank stops both with nothing published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from obim_trainer.distributed.teardown import process_group_teardown
from obim_trainer.pipeline.merge import merge_checkpoints, merge_checkpoints_on_ranks, merge_sweep_on_ranks
from obim_trainer.pipeline.variants import merge_variants, plan_variants
from obim_trainer.settings.merge import MergeConfig
from tests.conftest import copy_tree

pytestmark = pytest.mark.slow  # two processes

WORLD = 2
POISONED = "lm_head.weight"
SWEPT = ["obim", "ties"]


def worker(local_rank: int, init_file: str, settings: dict, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=WORLD)
    with process_group_teardown():
        out: dict = {}
        for name in ("good", "poisoned"):
            try:
                result = merge_checkpoints_on_ranks(MergeConfig.build(settings[name]))
                out[name] = {"output": str(result.output), "workers": result.manifest["output"]["workers"]}
            except Exception as exc:
                out[name] = {"error": [type(exc).__name__, str(exc)]}
        config = MergeConfig.build(settings["good"])
        variants = plan_variants(SWEPT, {}, [1.0, 0.6], num_models=len(config.checkpoints))
        merge_variants(config, variants, Path(folder) / "sweep", sweep=merge_sweep_on_ranks)
        (Path(folder) / f"rank-{local_rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ranks_out(llama_family, calibration_jsonl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge_on_ranks")
    base, ckpts = llama_family
    ckpts = [copy_tree(c, folder / c.name) for c in ckpts]  # statistics are cached beside them
    poisoned = copy_tree(ckpts[2], folder / "poisoned")
    state = load_file(poisoned / "model.safetensors")
    state[POISONED][0, 0] = float("nan")
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    common = {"base": str(base), "calibration_data": str(calibration_jsonl), "progress": False}
    common["out_shard_size"] = "100KB"
    settings = {
        "good": {**common, "checkpoints": [str(c) for c in ckpts], "output": str(folder / "ranks")},
        "poisoned": {
            **common,
            "checkpoints": [str(c) for c in [*ckpts[:2], poisoned]],
            "method": "ties_im",
            "output": str(folder / "never"),
        },
    }
    mp.spawn(worker, args=(str(folder / "init"), settings, str(folder)), nprocs=WORLD, join=True)
    results = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    return folder, settings, results


def test_two_ranks_write_the_bytes_of_one_process(ranks_out):
    folder, settings, (zero, one) = ranks_out
    assert zero["good"] == one["good"] == {"output": str(folder / "ranks"), "workers": 2}
    merge_checkpoints(MergeConfig.build({**settings["good"], "output": str(folder / "single")}))
    written = {p.name: p.read_bytes() for p in sorted((folder / "ranks").glob("model*"))}
    assert len(written) > 2, "several shards and an index"
    assert written == {p.name: p.read_bytes() for p in sorted((folder / "single").glob("model*"))}


def test_a_failure_on_one_rank_is_raised_on_both_and_nothing_is_published(ranks_out):
    folder, _, results = ranks_out
    errors = [r["poisoned"]["error"] for r in results]
    assert sorted(e[0] for e in errors) == ["CheckpointError", "RankFailure"]
    assert all(POISONED in e[1] and "NaN or Inf" in e[1] for e in errors)
    assert not (folder / "never").exists()
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name], "temporary folder left behind"


def test_a_sweep_on_two_ranks_writes_the_bytes_of_one_process_merges(ranks_out):
    """The callback's sweep: every rank reads its run of tensors once for all the variants."""
    folder, settings, _ = ranks_out
    swept = sorted(p.name for p in (folder / "sweep").iterdir())
    assert swept == ["obim", "obim@0.6", "ties"]
    for variant in plan_variants(SWEPT, {}, [1.0, 0.6], num_models=3):
        alone = folder / "alone" / variant.name
        merge_checkpoints(
            MergeConfig.build(settings["good"]), method=variant.method, params=variant.params, output=alone
        )
        manifest = json.loads((folder / "sweep" / variant.name / "obim_merge.json").read_text())
        assert manifest["output"]["workers"] == 2, "split between the ranks"
        written = {p.name: p.read_bytes() for p in sorted((folder / "sweep" / variant.name).glob("model*"))}
        assert written == {p.name: p.read_bytes() for p in sorted(alone.glob("model*"))}, variant.name
