"""Outputs that appear whole or not at all.

A merge writes into a temporary sibling of the output folder (same filesystem, so the final
rename is atomic), fsyncs everything and renames it into place. Any failure, Ctrl-C
included, removes the temporary folder: the inputs and any earlier output are untouched.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from obim_trainer.errors import OutputError

logger = logging.getLogger(__name__)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(output: Path, *, overwrite: bool, inputs: Sequence[Path]) -> Path:
    """Refuse an output that is, contains or lies inside an input, or that exists without ``overwrite``."""
    target = output.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if _is_within(target, source) or _is_within(source, target):
            relation = "is" if target == source else ("inside" if _is_within(target, source) else "contains")
            raise OutputError(
                f"output {output} {relation} the input folder {given}; write the merged model somewhere else"
                if relation != "inside"
                else f"output {output} lies inside the input folder {given}; choose a folder outside every input"
            )
    if target.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; pass --overwrite to replace it or choose another folder")
    return target


@contextmanager
def atomic_output_dir(output: Path, *, overwrite: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``output`` when the block ends without an exception."""
    target = check_output_location(Path(output), overwrite=overwrite, inputs=inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", target)
