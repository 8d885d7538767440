"""Selected checkpoints survive ``save_total_limit``.

The Trainer deletes old ``checkpoint-N`` folders as soon as more than ``save_total_limit``
exist, whatever their evaluation. At each save the checkpoint's model files (weights, config,
tokenizer, statistics — not the optimizer or DeepSpeed state) are hard-linked into
``<output_dir>/obim/selected/checkpoint-N``: no extra disk space while the original exists, and
the files stay when rotation deletes it. The copy is what merges read, and it is deleted as
soon as the checkpoint is not (or no longer) selected. Where hard links are impossible, files
are copied with their timestamps, which keeps the checkpoint's fingerprint and so its cached
statistics.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from pathlib import Path

from obim_trainer.checkpoints.atomic import atomic_output_dir
from obim_trainer.errors import OutputError

logger = logging.getLogger(__name__)

# training state a merge never reads: DeepSpeed shards, optimizer, scheduler, RNG states
SKIPPED = ("optimizer*", "scheduler*", "scaler*", "rng_state*", "global_step*", "latest", "zero_to_*.py")


def _skipped(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in SKIPPED)


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst``, or copy it with its timestamps where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class CheckpointGuard:
    """Protected copies of checkpoints under ``root`` (``<output_dir>/obim/selected``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, step: int) -> Path:
        return self.root / f"checkpoint-{step}"

    def protect(self, checkpoint: Path, step: int) -> Path:
        """The protected copy of ``checkpoint`` (made now unless it exists); raises :class:`OutputError`."""
        target = self.path_for(step)
        if target.is_dir():
            return target
        try:
            with atomic_output_dir(target, inputs=(checkpoint,)) as staging:
                shutil.copytree(
                    checkpoint,
                    staging,
                    ignore=lambda _d, names: [n for n in names if _skipped(n)],
                    copy_function=link_or_copy,
                    dirs_exist_ok=True,
                )
        except (OSError, OutputError) as exc:  # OutputError: the staging folder could not be made or published
            raise OutputError(
                f"cannot keep a copy of the selected {checkpoint} in {target} ({exc}); check free space and "
                "permissions in the output folder, or raise save_total_limit"
            ) from None
        logger.info("protected %s from checkpoint rotation as %s", checkpoint.name, target)
        return target

    def release(self, step: int) -> None:
        """Delete the protected copy of the checkpoint of ``step`` (nothing if there is none)."""
        target = self.path_for(step)
        if target.is_dir():
            shutil.rmtree(target)
            logger.info("released %s: it is no longer selected", target)
