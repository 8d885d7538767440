"""The registry: lookup errors and third-party methods through the obim_trainer.methods entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from obim_trainer.errors import ConfigError
from obim_trainer.merging import TensorTask, available_methods, build_method, registry


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    """An installed-looking distribution whose entry point names a MergeMethod subclass."""
    (tmp_path / "my_merge_plugin.py").write_text(
        textwrap.dedent("""
        from obim_trainer.merging import MergeMethod, MergeOutput, MethodParams

        class HalfwayParams(MethodParams):
            share: float = 0.5

        class Halfway(MergeMethod):
            name = "halfway"
            summary = "Moves a share of the way to the first checkpoint."
            Params = HalfwayParams

            def merge(self, task):
                return MergeOutput(tensor=task.base + self.params.share * task.delta(0))
    """)
    )
    dist = tmp_path / "my_merge_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-merge-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[obim_trainer.methods]\nhalfway = my_merge_plugin:Halfway\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield
    registry._REGISTRY.pop("halfway", None)
    sys.modules.pop("my_merge_plugin", None)


def test_third_party_method_registers_through_entry_points(plugin_on_path):
    assert "halfway" in available_methods()
    method = build_method("halfway", {"share": 0.25}, num_models=1)
    task = TensorTask.from_tensors("w", torch.zeros(3), [torch.full((3,), 4.0)])
    assert torch.equal(method.merge(task).tensor, torch.ones(3))


def test_broken_plugin_does_not_break_the_built_ins(tmp_path, monkeypatch, caplog):
    dist = tmp_path / "broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[obim_trainer.methods]\nbroken = no_such_module:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "obim" in available_methods()
    assert "could not load merge method plugin 'broken'" in caplog.text


def test_unknown_method_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown merge method 'tie'.*ties"):
        build_method("tie", {}, num_models=2)


def test_every_built_in_declares_what_it_needs():
    methods = available_methods()
    assert {n for n, m in methods.items() if m.needs_activation_stats} == {"obim", "ties_obm"}
    for name, cls in methods.items():
        assert cls.summary, f"{name} has no summary for --list-methods"
