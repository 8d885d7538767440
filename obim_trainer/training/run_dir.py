"""Which checkpoints to merge: the top-k of a Trainer run by a metric in ``trainer_state.json``.

The paper merges "the 3 best checkpoints by Japanese evaluation" with the base. A
Trainer run records every evaluation in ``log_history`` of ``trainer_state.json``
(in the run folder at the end of training and in every ``checkpoint-N``), so the
choice needs nothing but files already on disk. A run trained with ``OBIMCallback``
also has the callback's record (``<output_dir>/obim/candidates.json``, with the
evaluator's ``obim_<lang>_*`` metrics too) and the copies it kept of the selected
checkpoints (``obim/selected/checkpoint-N``), which ``save_total_limit`` rotation
did not delete: both count, so the offline merge sees what the callback saw.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from obim_trainer.errors import CheckpointError, ConfigError
from obim_trainer.settings.names import setting_name
from obim_trainer.training.ranking import MetricMode, best_by_metric
from obim_trainer.training.ranking import resolve_mode as resolve_mode  # re-exported: its 0.1 home

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
RECORD_FILE = "candidates.json"
"""The callback's record in ``<output_dir>/<output_subdir>/``
(see :class:`~obim_trainer.training.callback.OBIMCallback`)."""
ARCHIVE_MARK = ".previous-"
"""In the name of a record folder moved aside by a fresh run into the same output folder; never read."""


@dataclass(frozen=True)
class ScoredCheckpoint:
    """A checkpoint folder with the metric the Trainer logged at its step."""

    path: Path
    step: int
    value: float


def _checkpoint_folders(folder: Path) -> dict[int, Path]:
    found = {}
    for child in folder.iterdir() if folder.is_dir() else ():
        match = CHECKPOINT_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return found


def callback_records(run_dir: Path) -> list[Path]:
    """The folders of the callback's records in a run folder (``obim/`` by default): a ``candidates.json`` or
    kept copies in ``selected/`` (a run stopped before its first record); archived ones left out."""
    if not run_dir.is_dir():
        return []
    return sorted(
        child
        for child in run_dir.iterdir()
        if ((child / RECORD_FILE).is_file() or (child / "selected").is_dir()) and ARCHIVE_MARK not in child.name
    )


def list_checkpoints(run_dir: Path) -> dict[int, Path]:
    """``checkpoint-N`` folders of a run by step; where rotation deleted one, the callback's kept copy."""
    if not run_dir.is_dir():
        raise CheckpointError(
            f"run folder {run_dir} does not exist; set {setting_name('run_dir', 'DIR')} to the Trainer's output_dir"
        )
    found = _checkpoint_folders(run_dir)  # the Trainer's own folder wherever it still exists
    for record in callback_records(run_dir):
        kept = {s: p for s, p in _checkpoint_folders(record / "selected").items() if s not in found}
        if kept:
            logger.info("reading %d checkpoint(s) from %s: the originals were deleted", len(kept), record / "selected")
        found |= kept
    if not found:
        raise CheckpointError(f"run folder {run_dir} holds no checkpoint-N folders; is it the Trainer's output_dir?")
    return dict(sorted(found.items()))


def recorded_metric(run_dir: Path, metric: str) -> dict[int, float]:
    """``metric`` by step from the callback's records of the run (e.g. ``obim_ja_loss``, which no
    ``trainer_state.json`` has)."""
    values: dict[int, float] = {}
    for record in callback_records(run_dir):
        file = record / RECORD_FILE
        if not file.is_file():
            continue
        try:
            candidates = json.loads(file.read_text())["candidates"]
            values |= {int(c["step"]): float(c["metrics"][metric]) for c in candidates if metric in c["metrics"]}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable OBIM record ({exc}); remove or repair it") from None
    return values


def metric_by_step(run_dir: Path, checkpoints: dict[int, Path], metric: str) -> dict[int, float]:
    """Every logged value of ``metric`` by step, merged from all ``trainer_state.json`` files of the run
    and the callback's record (the Trainer's own value wins where both have one)."""
    states = [run_dir / "trainer_state.json", *(p / "trainer_state.json" for p in checkpoints.values())]
    values = recorded_metric(run_dir, metric)
    for state_file in states:
        if not state_file.is_file():
            continue
        try:
            history = json.loads(state_file.read_text()).get("log_history", [])
        except (json.JSONDecodeError, OSError, AttributeError) as exc:
            raise CheckpointError(
                f"{state_file} is not a readable trainer_state.json ({exc}); remove or repair it"
            ) from None
        for entry in history:
            if metric in entry and "step" in entry:
                values[int(entry["step"])] = float(entry[metric])
    return values


def select_top_checkpoints(
    run_dir: str | Path, metric: str, top_k: int, mode: MetricMode = "auto"
) -> list[ScoredCheckpoint]:
    """The ``top_k`` best checkpoints of a run by ``metric``, best first (ranked by :func:`best_by_metric`:
    ties go to the later step).

    Only checkpoints whose own step has a logged value are candidates. Raises
    :class:`CheckpointError` / :class:`ConfigError` naming the run folder and the fix.
    """
    run_dir = Path(run_dir)
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    checkpoints = list_checkpoints(run_dir)
    values = metric_by_step(run_dir, checkpoints, metric)
    if not values:
        raise ConfigError(
            f"no '{metric}' in the trainer_state.json files of {run_dir}; pick a metric the Trainer logged "
            "(e.g. eval_loss, or eval_<name>_loss when eval_dataset is a dict)"
        )
    scored = [ScoredCheckpoint(path, step, values[step]) for step, path in checkpoints.items() if step in values]
    missing = [step for step in checkpoints if step not in values]
    if missing:
        logger.warning("checkpoints without a logged %s are not candidates: steps %s", metric, missing)
    if len(scored) < top_k:
        raise ConfigError(
            f"top_k={top_k} but only {len(scored)} checkpoint(s) of {run_dir} have a logged '{metric}'; "
            f"lower {setting_name('top_k')}"
        )
    chosen = best_by_metric(scored, lambda c: c.value, lambda c: c.step, metric, mode, top_k)
    logger.info("selected by %s: %s", metric, ", ".join(f"{c.path.name} ({c.value:.4g})" for c in chosen))
    return chosen


def own_metric(checkpoint: Path, metric: str) -> float | None:
    """The value of ``metric`` a checkpoint's own ``trainer_state.json`` logged at the checkpoint's step."""
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise CheckpointError(
            f"{state_file} is not a readable trainer_state.json ({exc}); remove or repair it"
        ) from None
    step = state.get("global_step") if isinstance(state, dict) else None
    history = state.get("log_history", []) if isinstance(state, dict) else []
    values = [float(e[metric]) for e in history if isinstance(e, dict) and metric in e and e.get("step") == step]
    return values[-1] if values else None


def best_checkpoint(checkpoints: list[Path], metric: str | None, mode: MetricMode = "auto") -> int:
    """Index of the best of ``checkpoints`` by the ``metric`` each logged at its own step, ranked by
    :func:`best_by_metric` (ties: the later one in the list).

    Raises :class:`ConfigError` when there is no metric or a checkpoint did not log it.
    """
    if metric is None:
        raise ConfigError(
            f"new_rows='best' needs {setting_name('metric', 'NAME')} to know which checkpoint is best (or pick "
            f"checkpoints with {setting_name('run_dir', 'DIR')}); use {setting_name('new_rows', 'first')} to take "
            "the first checkpoint given"
        )
    values = [own_metric(c, metric) for c in checkpoints]
    missing = [str(c) for c, v in zip(checkpoints, values, strict=True) if v is None]
    if missing:
        raise ConfigError(
            f"no '{metric}' logged at the checkpoint's own step in trainer_state.json of {', '.join(missing)}; "
            "pick a metric the Trainer logged at every save, or use new_rows='first'"
        )
    logged = [v for v in values if v is not None]  # all of them: a missing one raised above
    return best_by_metric(range(len(checkpoints)), logged.__getitem__, lambda i: i, metric, mode, 1)[0]
