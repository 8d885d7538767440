"""The callback's record of a run, ``<output_dir>/obim/candidates.json``, and how a resumed run picks it up.

Rank 0 alone reads and writes it. It holds every checkpoint evaluated (with its statistics key and kept
copy), the selection and the merges made, so that a resumed run selects and merges as the run it
continues would have; checkpoints the run saved but did not record (it stopped during the save) are
found from their files (:func:`unrecorded_checkpoints`), their weights rebuilt from the ZeRO shards
when the callback had not written them yet (:func:`weights_from_zero_shards`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from obim_trainer.calibration import ActivationStats, CalibrationSet, stats_key, stats_path
from obim_trainer.calibration.stats_cache import StatsOrigin, record_origin
from obim_trainer.checkpoints import ShardedSafetensorsWriter, open_checkpoint
from obim_trainer.checkpoints.atomic import rename_durably, write_atomically
from obim_trainer.checkpoints.detect import hf_format
from obim_trainer.distributed import plain_model_loading
from obim_trainer.evaluation import ModelEvaluator
from obim_trainer.pipeline.merge import checkpoint_stats
from obim_trainer.settings.callback import OBIMConfig
from obim_trainer.training.checkpoint_guard import CheckpointGuard, link_or_copy
from obim_trainer.training.run_dir import ARCHIVE_MARK, CHECKPOINT_DIR, RECORD_FILE
from obim_trainer.training.selectors import Candidate

logger = logging.getLogger(__name__)

TRAINER_TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def trainer_eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The Trainer's evaluation metrics (``eval_*``, timings left out) with a perplexity for each loss."""
    kept = {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("eval_") and not k.endswith(TRAINER_TIMING_SUFFIXES) and isinstance(v, (int, float))
    }
    for name, value in list(kept.items()):
        if name.endswith("_loss"):
            kept.setdefault(name.removesuffix("_loss") + "_perplexity", math.exp(min(value, 700.0)))
    return kept


@dataclass
class MergedModel:
    """A merge the callback made and kept."""

    step: int
    path: Path
    checkpoints: list[int]
    metrics: dict[str, float] = field(default_factory=dict)
    total_share: float | None = None
    variant: str | None = None
    """The candidate kept (``regmean@base_weight=1``) when several were compared."""


@dataclass
class RunRecord:
    """What was evaluated, selected and merged so far (rank 0's state; the file is its copy on disk)."""

    candidates: dict[int, Candidate] = field(default_factory=dict)
    selected: list[int] = field(default_factory=list)
    merged: list[MergedModel] = field(default_factory=list)
    saves: int = 0

    def write(self, root: Path, select_metric: str) -> None:
        """``root/candidates.json``, replaced in one step."""
        record = {
            "select_metric": select_metric,
            "candidates": [c.to_dict() for c in sorted(self.candidates.values(), key=lambda c: c.step)],
            "selected": self.selected,
            "merged": [{**m.__dict__, "path": str(m.path)} for m in self.merged],
            "saves": self.saves,
        }
        root.mkdir(parents=True, exist_ok=True)
        write_atomically(root / RECORD_FILE, (json.dumps(record, indent=2) + "\n").encode())

    @classmethod
    def read(cls, root: Path, global_step: int) -> RunRecord:
        """The record up to ``global_step`` (the step a run resumes from); empty when there is none or it
        cannot be read (with a warning: selection then starts afresh)."""
        file = root / RECORD_FILE
        if not file.is_file():
            return cls()
        try:
            record = json.loads(file.read_text())
            candidates = [Candidate.from_dict(c) for c in record["candidates"]]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable %s (%s); selection starts afresh", file, exc)
            return cls()
        kept = {c.step: c for c in candidates if c.step <= global_step}
        merged = [
            MergedModel(m["step"], Path(m["path"]), m["checkpoints"], m.get("metrics", {}), m.get("total_share"))
            for m in record.get("merged", [])
            if m["step"] <= global_step and Path(m["path"]).is_dir()
        ]
        selected = [s for s in record.get("selected", []) if s in kept]
        loaded = cls(kept, selected, merged, int(record.get("saves", len(kept))))
        logger.info("resumed the OBIM record: %d candidates, selected %s", len(kept), selected)
        return loaded


def archive_previous_record(root: Path) -> None:
    """A fresh run (step 0) into an ``output_dir`` with an OBIM folder: move it aside.

    Its record, kept copies and merges belong to the earlier run, whose checkpoints this run overwrites
    (a kept ``selected/checkpoint-N`` would even be taken for this run's), so the folder is renamed (one
    atomic step) to ``<output_subdir>.previous-<UTC time>`` rather than mixed in.
    """
    if not root.is_dir() or not any(root.iterdir()):
        return
    archive = root.with_name(f"{root.name}{ARCHIVE_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    rename_durably(root, archive)
    logger.warning(
        "%s holds the OBIM record of an earlier run; this run starts at step 0, so it was moved to %s "
        "(to continue that run instead, resume it: resume_from_checkpoint=True)",
        root,
        archive,
    )


def unrecorded_checkpoints(output_dir: Path, global_step: int, recorded: set[int]) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` up to ``global_step`` that is not in ``recorded``, by step."""
    found = []
    for folder in output_dir.glob("checkpoint-*"):
        match = CHECKPOINT_DIR.match(folder.name)
        step = int(match.group(1)) if match else None
        if step is not None and step <= global_step and step not in recorded and folder.is_dir():
            found.append((step, folder))
    return sorted(found)


def logged_metrics(folder: Path, step: int) -> dict[str, float]:
    """The Trainer's evaluation at ``step`` as the checkpoint's ``trainer_state.json`` logged it."""
    state_file = folder / "trainer_state.json"
    history = json.loads(state_file.read_text()).get("log_history", []) if state_file.is_file() else []
    metrics: dict[str, float] = {}
    for entry in history:
        if entry.get("step") == step:
            metrics.update(trainer_eval_metrics(entry))
    return metrics


def weights_from_zero_shards(folder: Path, max_shard_size: int) -> None:
    """Write Hugging Face weights (``model.safetensors``) into a DeepSpeed checkpoint that holds only its
    ZeRO shards, from those shards (the fp32 masters, as ``zero_to_fp32.py`` gathers them).

    The run stopped after the Trainer's save and before the callback wrote the weights; the live model no
    longer holds them (it trained on), the shards do. The files are written into a staging folder and moved
    in once complete, so the checkpoint never holds a partial ``model.safetensors``.
    """
    staging = folder / f".obim-rebuild.tmp-{os.getpid()}"
    try:
        with open_checkpoint(folder) as reader:
            plan = [(name, tuple(info.shape), info.dtype) for name, info in reader.tensor_infos().items()]
            staging.mkdir()
            with ShardedSafetensorsWriter(staging, plan, max_shard_size) as writer:
                for name, _, _ in plan:
                    writer.write(name, reader.read(name).contiguous())
                files = writer.close()
        for file in files:
            rename_durably(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    assert hf_format(folder) is not None
    logger.warning("%s held only DeepSpeed ZeRO shards; its model weights were rebuilt from them", folder)


def store_stats(stats: ActivationStats, candidate: Candidate, calibration: CalibrationSet) -> str:
    """Store a checkpoint's statistics under the key the offline merge computes for its weights.

    The key comes from the protected copy, which holds exactly the Hugging Face weights the merge
    reads; the file is linked beside the original too, where it serves every reader of the same files.
    """
    assert candidate.protected is not None
    with open_checkpoint(candidate.protected) as reader:
        fingerprint = reader.fingerprint()
    key = stats_key(calibration.fingerprint(), fingerprint)
    stored = stats_path(candidate.protected, key)
    stats.save(stored, key)
    beside = stats_path(candidate.path, key)
    beside.parent.mkdir(exist_ok=True)
    link_or_copy(str(stored), str(beside))
    for path in (stored, beside):  # what an offline merge compares its own calibration with
        record_origin(path, StatsOrigin.of(calibration, candidate.protected, fingerprint))
    return key


def recorded_afterwards(
    step: int,
    folder: Path,
    guard: CheckpointGuard,
    evaluator: ModelEvaluator | None,
    calibration: CalibrationSet | None,
    config: OBIMConfig,
    device: str,
) -> Candidate:
    """A candidate made from a checkpoint's files after the save (a resumed run records what it missed): the
    Trainer's evaluation logged at its step, the evaluator's (if any) and its statistics computed on its
    weights, as the merge would compute them; protected from rotation like a candidate recorded at its save.
    ``device``: the training's (the evaluator runs on ``eval_device`` when set)."""
    metrics = logged_metrics(folder, step)
    if evaluator is not None:
        metrics.update(evaluator.evaluate_folder(folder, config.eval_device or device))
    candidate = Candidate(step=step, path=folder, metrics=metrics)
    candidate.protected = guard.protect(folder, step)
    if calibration is not None:
        merge_config = config.merge_config([config.base_model], None)
        with open_checkpoint(candidate.protected) as reader, plain_model_loading():
            _, info = checkpoint_stats(reader, calibration, merge_config, torch.device(device))
        candidate.stats_key = info["key"]
    return candidate
