"""Every file the project writes appears whole or not at all, through ``checkpoints/atomic.py`` alone."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

import obim_trainer
from obim_trainer.checkpoints import atomic
from obim_trainer.checkpoints.atomic import atomic_output_file, write_atomically
from obim_trainer.evaluation.comparison import TABLE_JSON, TABLE_MD, ComparisonRow, ComparisonTable

PACKAGE = Path(obim_trainer.__file__).parent
ALLOWED = {
    Path("checkpoints/atomic.py"): "the one home of temporary files and renames",
    Path("merging/native/build.py"): "setup.py loads it by path before the package exists (standard library only)",
}


def hand_written_renames(source: str) -> list[int]:
    """Lines that rename or replace a path, or make a temporary file, by hand.

    ``x.replace(y)`` with one argument is ``Path.replace`` (``str.replace`` takes two).
    """
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, receiver = node.func.attr, node.func.value
        path_replace = len(node.args) == 1 and not node.keywords
        module = receiver.id if isinstance(receiver, ast.Name) else None
        if (
            name in {"rename", "mkstemp", "NamedTemporaryFile"}
            or (name == "replace" and (path_replace or module == "os"))
            or (name == "move" and module == "shutil")
        ):
            lines.append(node.lineno)
    return lines


def test_no_module_renames_files_by_hand():
    found = {
        f"{path.relative_to(PACKAGE)}:{line}"
        for path in PACKAGE.rglob("*.py")
        if path.relative_to(PACKAGE) not in ALLOWED
        for line in hand_written_renames(path.read_text(encoding="utf-8"))
    }
    assert not found, f"write through checkpoints/atomic.py (write_atomically, atomic_output_file): {sorted(found)}"


def test_the_guard_sees_each_hand_written_form():
    source = "tmp.replace(path)\nos.replace(a, b)\nfolder.rename(x)\ntempfile.mkstemp()\nshutil.move(a, b)\n"
    assert hand_written_renames(source + "name.replace('a', 'b')\ndataclasses.replace(v, name=n)\n") == [1, 2, 3, 4, 5]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_crash_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output_file(target) as partial:
        partial.write_text("half of the n")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and not leftovers(tmp_path)
    write_atomically(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓" and not leftovers(tmp_path)


def test_files_get_the_permissions_a_plain_write_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "a.json", b"{}")
        (tmp_path / "b.json").write_bytes(b"{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644


def test_a_comparison_table_that_fails_mid_write_keeps_the_earlier_one(tmp_path, monkeypatch):
    def table(loss: float) -> ComparisonTable:
        row = ComparisonRow("obim", Path("obim"), "merge", {"obim_en_loss": loss})
        return ComparisonTable(rows=[row], columns={"en": "obim_en_loss"})

    table(1.0).write(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (TABLE_MD, TABLE_JSON)}

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)  # the new bytes are written, not yet published
    with pytest.raises(OSError, match="No space left"):
        table(2.0).write(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert json.loads(before[TABLE_JSON])["rows"][0]["metrics"]["obim_en_loss"] == 1.0
    assert not leftovers(tmp_path)
