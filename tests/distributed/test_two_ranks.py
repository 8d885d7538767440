"""Two real gloo processes: rank-0 decisions, forward passes in step, statistics and evaluation shared
by the ranks, and weights loaded on rank 0 reaching every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

from obim_trainer.calibration import ActivationStats, CalibrationSet, tokenize_calibration
from obim_trainer.checkpoints import open_checkpoint
from obim_trainer.distributed import (
    ZeroGatherer,
    broadcast_object,
    lockstep_batches,
    max_over_ranks,
    rank,
    run_on_every_rank,
    run_on_main,
    world_size,
)
from obim_trainer.distributed.teardown import process_group_teardown
from obim_trainer.evaluation import PerLanguageEvaluator
from tests.conftest import make_texts

pytestmark = pytest.mark.slow  # two processes

WORLD = 2


def calibration_of(tokenizer_dir: str) -> CalibrationSet:
    # 7 samples: rank 0 gets 4 (2 batches of 3), rank 1 gets 3 (1 batch): uneven on purpose
    return tokenize_calibration(make_texts(7, seed=5), AutoTokenizer.from_pretrained(tokenizer_dir), 32)


def fail() -> None:
    raise ValueError("boom")


def worker(local_rank: int, init_file: str, folder: str, model_dir: str, tokenizer_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=WORLD)
    with process_group_teardown():  # the model goes before the process group, on failure too
        work(folder, model_dir, tokenizer_dir)


def work(folder: str, model_dir: str, tokenizer_dir: str) -> None:
    """Every rank's share: decisions, failures, batches, statistics, evaluation and loading."""
    out: dict = {"rank": rank(), "world_size": world_size()}
    out["broadcast"] = broadcast_object({"sender": rank()})
    out["max"] = max_over_ranks(10 * rank() + 1)
    out["result"] = run_on_main(lambda: f"computed on rank {rank()}", "a test step")
    try:
        run_on_main(fail, "the failing step")
    except Exception as exc:
        out["failure"] = [type(exc).__name__, str(exc)]
    out["everywhere"] = run_on_every_rank(lambda: 10 * rank(), "a step of every rank")
    try:
        run_on_every_rank(lambda: fail() if rank() == 1 else None, "a step failing on rank 1")
    except Exception as exc:
        out["failure_everywhere"] = [type(exc).__name__, str(exc)]
    calibration = calibration_of(tokenizer_dir)
    out["batches"] = [[b.real, b.input_ids.shape[0]] for b in lockstep_batches(calibration, 3)]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    stats = ActivationStats.collect(model, calibration, batch_size=3, progress=False, across_ranks=True)
    stats.save(Path(folder) / f"stats-{rank()}.safetensors", "live")
    out["eval"] = PerLanguageEvaluator({"en": calibration}, batch_size=3).evaluate_model(model, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(rank() + 1))  # every rank's copy differs from the file
    ZeroGatherer(model).load_checkpoint(Path(model_dir))
    out["state"] = {k: float(v.double().sum()) for k, v in model.state_dict().items()}
    (Path(folder) / f"rank-{rank()}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ranks_out(llama_family, tokenizer_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    model_dir = llama_family[1][0]
    mp.spawn(
        worker,
        args=(str(folder / "init"), str(folder), str(model_dir), str(tokenizer_dir)),
        nprocs=WORLD,
        join=True,
    )
    results = [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    return folder, model_dir, results


def test_ranks_come_from_the_process_group_and_rank_0_decides(ranks_out):
    _, _, (zero, one) = ranks_out
    assert [zero["rank"], one["rank"]] == [0, 1] and zero["world_size"] == one["world_size"] == 2
    assert zero["broadcast"] == one["broadcast"] == {"sender": 0}
    assert zero["max"] == one["max"] == 11
    assert zero["result"] == one["result"] == "computed on rank 0"


def test_a_failure_on_rank_0_is_raised_on_every_rank(ranks_out):
    _, _, (zero, one) = ranks_out
    assert zero["failure"] == ["ValueError", "boom"]
    assert one["failure"][0] == "RankFailure"
    assert "the failing step failed on rank 0 (ValueError: boom)" in one["failure"][1]


def test_work_of_every_rank_reaches_every_rank_and_so_does_a_failure(ranks_out):
    _, _, (zero, one) = ranks_out
    assert zero["everywhere"] == one["everywhere"] == [0, 10]
    assert one["failure_everywhere"] == ["ValueError", "boom"]
    assert zero["failure_everywhere"][0] == "RankFailure"
    assert "a step failing on rank 1 failed on rank 1 (ValueError: boom)" in zero["failure_everywhere"][1]


def test_ranks_run_the_same_number_of_forward_passes(ranks_out):
    _, _, (zero, one) = ranks_out
    assert zero["batches"] == [[True, 3], [True, 1]]
    assert one["batches"] == [[True, 3], [False, 1]]  # a filler batch keeps rank 1 in step


def test_shared_statistics_equal_one_process_statistics(ranks_out, tokenizer_dir):
    folder, model_dir, _ = ranks_out
    single = ActivationStats.collect(
        AutoModelForCausalLM.from_pretrained(model_dir), calibration_of(tokenizer_dir), batch_size=3, progress=False
    )
    for r in range(WORLD):
        live = ActivationStats.load(folder / f"stats-{r}.safetensors", "live")
        assert live.count == single.count
        assert torch.equal(live.token_counts, single.token_counts)
        for name, sq in single.sq_sum.items():
            torch.testing.assert_close(live.sq_sum[name], sq, rtol=1e-5, atol=1e-6)


def test_shared_evaluation_equals_one_process_evaluation(ranks_out, tokenizer_dir):
    _, model_dir, (zero, one) = ranks_out
    evaluator = PerLanguageEvaluator({"en": calibration_of(tokenizer_dir)}, batch_size=3)
    single = evaluator.evaluate_model(AutoModelForCausalLM.from_pretrained(model_dir), "cpu")
    assert zero["eval"] == one["eval"] == pytest.approx(single, rel=1e-6)


def test_weights_read_on_rank_0_reach_every_rank(ranks_out):
    _, model_dir, (zero, one) = ranks_out
    with open_checkpoint(model_dir) as reader:
        stored = {name: float(reader.read(name).double().sum()) for name in reader.tensor_infos()}
    assert zero["state"] == one["state"]
    assert {k: zero["state"][k] for k in stored} == stored
