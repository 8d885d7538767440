"""W&B logging through an already open run: offline records read back, and no run ever opened by us."""

from __future__ import annotations

import sys

import pytest

from obim_trainer.demo.plots import plot_ownership
from obim_trainer.tracking import Histogram, Image, NullLogger, Table, WandbLogger, make_run_logger
from tests.tracking.wandb_offline import fresh_wandb, history, run_dir, table


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    fresh_wandb()
    return tmp_path


def test_only_the_main_process_of_a_wandb_run_logs(monkeypatch):
    assert isinstance(make_run_logger(["wandb"]), WandbLogger)
    assert isinstance(make_run_logger("wandb"), WandbLogger)
    assert isinstance(make_run_logger([]), NullLogger)  # report_to="none"
    assert isinstance(make_run_logger(["tensorboard"]), NullLogger)
    monkeypatch.setenv("RANK", "1")  # another process of a launch, before or without a process group
    assert isinstance(make_run_logger(["wandb"]), NullLogger)


def test_without_wandb_installed_nothing_is_logged(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    assert isinstance(make_run_logger(["wandb"]), NullLogger)


def test_no_run_is_opened_when_none_is(wandb_dir):
    import wandb

    assert wandb.run is None
    WandbLogger(wandb).log_checkpoint(2, {"eval_loss": 1.0})
    assert wandb.run is None
    assert not list(wandb_dir.rglob("*.wandb"))


def test_values_reach_the_open_run_on_the_trainer_step_axis(wandb_dir):
    import wandb

    run = wandb.init(project="obim-test")  # what the Trainer's WandbCallback does
    wandb.define_metric("train/global_step")
    wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
    logger = WandbLogger(wandb)
    logger.emit(4, {"obim/checkpoint/eval_ja_loss": 2.5})
    logger.emit(6, {"obim/candidates": Table(["step", "selected"], [[4, True], [6, False]])})
    logger.emit(6, {"obim/saliency/mlp.up_proj/ckpt-4": Histogram([1, 3], [-2.0, -1.0, 0.0])})
    picture = plot_ownership({"block 0": [0.25, 0.75]}, ["ckpt-4", "ckpt-6"], wandb_dir / "ownership.png")
    logger.emit(8, {"obim/plots/ownership": Image(picture)})
    run.finish()

    folder = run_dir(wandb_dir)
    rows = [r for r in history(folder) if any(k.startswith("obim/") for k in r)]
    assert [r["train/global_step"] for r in rows] == [4, 6, 6, 8]
    assert rows[0]["obim/checkpoint/eval_ja_loss"] == 2.5
    assert table(folder, "obim/candidates", rows[1]) == {
        "columns": ["step", "selected"],
        "data": [[4, True], [6, False]],
    }
    assert rows[2]["obim/saliency/mlp.up_proj/ckpt-4/_type"] == "histogram"
    assert rows[2]["obim/saliency/mlp.up_proj/ckpt-4/values"] == [1, 3]
    assert rows[2]["obim/saliency/mlp.up_proj/ckpt-4/bins"] == [-2.0, -1.0, 0.0]
    image = rows[3]["obim/plots/ownership/path"]
    assert rows[3]["obim/plots/ownership/_type"] == "image-file" and (folder / "files" / image).is_file()
