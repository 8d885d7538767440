"""Outputs appear whole or not at all; earlier outputs and inputs survive failures."""

from __future__ import annotations

import pytest

from obim_trainer.checkpoints import atomic_output_dir
from obim_trainer.errors import OutputError


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_success_renames_into_place(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("new")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "new" and not leftovers(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_keeps_the_earlier_output(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(type(error)), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
        raise error
    assert (out / "a.txt").read_text() == "old" and not leftovers(tmp_path)


def test_overwrite_replaces_whole_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and not leftovers(tmp_path)


def test_refusals_happen_before_anything_is_written(tmp_path):
    inp = tmp_path / "ckpt"
    inp.mkdir()
    (tmp_path / "exists").mkdir()
    cases = [
        (tmp_path / "exists", "--overwrite"),
        (inp, "is the input"),
        (inp / "sub", "inside"),
        (tmp_path, "contains"),
    ]
    for output, fragment in cases:
        with (
            pytest.raises(OutputError, match=fragment),
            atomic_output_dir(output, overwrite=output != cases[0][0], inputs=[inp]),
        ):
            pytest.fail("must not be entered")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "exists"]
