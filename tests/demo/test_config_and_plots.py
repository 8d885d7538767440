"""The demo's comparison list (configs/demo/*.yaml), its trade-off plot and its table, without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from obim_trainer.demo.config import DemoConfig
from obim_trainer.demo.pipeline import DemoResult, tradeoff_points, write_report
from obim_trainer.demo.plots import Point, place_labels, tradeoff_figure, value_label
from obim_trainer.errors import ConfigError
from obim_trainer.evaluation.comparison import ComparisonRow, ComparisonTable, Objective, pick

ROOT = Path(__file__).parents[2]


def test_the_cpu_config_lists_every_merge_of_the_comparison_by_family():
    config = DemoConfig.from_yaml(ROOT / "configs" / "demo" / "cpu.yaml")
    variants = {v.name: v for v in config.planned_merges()}
    families = config.family_of()
    assert {n for n, f in families.items() if f == "regmean"} == {f"regmean@base_weight={c}" for c in ("0.3", "1", "3")}
    assert variants["regmean@base_weight=3"].params == {"base_weight": 3}  # sequential: the method's default
    assert variants["regmean-parallel@base_weight=1"].params == {"sequential": False, "base_weight": 1}
    assert variants["ta-mean@lambda=0.8"].params == {"normalize": True, "lambda": 0.8}  # mean δ × λ, not Σ δ × λ
    assert variants["task_arithmetic"].params == {}
    fa = [v for v in variants.values() if families[v.name] == "obim-fa"]
    assert [v.total_share for v in fa] == [0.6, 0.4, 0.3]
    assert all(
        v.params["saliency"] == "forgetting_aware" and sum(v.params["ratios"]) == pytest.approx(v.total_share)
        for v in fa
    )
    assert {
        "obim",
        "obim@0.6",
        "obim@0.3",
        "fisher_merging@base_weight=0.3",
        "fisher_merging@base_weight=1",
        "lines",
        "magmax",
        "ties",
        "dare_ties",
        "della",
        "widen",
        "consensus",
        "pcb",
    } <= set(variants)
    (few,) = [spec for spec in config.merges if spec.family == "regmean-8texts"]
    assert few.calibration_samples == 8 and config.calibration_samples == 32


def write(tmp_path: Path, merges: list[dict]) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"merges": merges}))
    return path


@pytest.mark.parametrize(
    ("merges", "message"),
    [
        ([{"method": "regmean"}, {"method": "regmean", "params": {"sequential": False}}], "appear twice"),
        ([{"method": "no_such_method"}], "no_such_method"),
        ([{"method": "regmean", "sweep": {"density": [0.1]}}], "density"),
        ([{"method": "regmean", "params": {"base_weight": -1}}], "base_weight"),
        ([{"method": "obim", "total_shares": [1.5]}], "total share 1.5"),
        ([{"method": "obim", "label": "a/b"}], "label"),
        ([], "merges"),
    ],
)
def test_a_bad_merge_list_is_one_config_error_naming_the_entry(tmp_path, merges, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig.from_yaml(write(tmp_path, merges))


def test_value_labels_name_what_sets_a_point_apart_in_its_curve():
    assert value_label(Point("regmean@base_weight=0.3", 1, 1, family="regmean")) == "0.3"
    assert value_label(Point("obim-fa@0.4", 1, 1, family="obim-fa")) == "0.4"
    assert value_label(Point("obim", 1, 1, family="obim")) == "1"
    assert value_label(Point("x@0.6@gamma=2", 1, 1, family="x")) == "0.6,2"


def fake_points() -> list[Point]:
    points = [Point("base", 13.0, 4.4, base=True), Point("ckpt-300 (last)", 5.0, 5.9)]
    points += [Point(n, x, y, family="obim") for n, x, y in [("obim", 5.03, 5.8), ("obim@0.6", 5.2, 5.6)]]
    points += [
        Point(f"regmean@base_weight={c}", x, y, family="regmean", picked=c == 1)
        for c, x, y in [(0.3, 5.1, 4.7), (1, 5.3, 4.5), (3, 5.9, 4.45)]
    ]
    points += [Point("ties", 6.5, 4.9, family="ties"), Point("task_arithmetic", 8.6, 16.3, family="task_arithmetic")]
    return points


def test_the_tradeoff_draws_one_curve_per_family_and_marks_references_and_the_pick():
    figure = tradeoff_figure(fake_points(), "zh")
    ax = figure.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["regmean"].get_xdata()) == [5.1, 5.3, 5.9] and lines["regmean"].get_linestyle() == "-"
    assert list(lines["obim"].get_ydata()) == [5.8, 5.6]
    assert lines["ties"].get_linestyle() == "None"  # one point: a marker, no curve
    base = "base (zh 13.00, old 4.40)"  # the old-language level to get back to, across the plot
    assert list(lines[base].get_ydata()) == [4.4, 4.4] and lines[base].get_linestyle() == "--"
    assert (lines["ckpt-300 (last)"].get_xdata()[0], lines["ckpt-300 (last)"].get_ydata()[0]) == (5.0, 5.9)
    assert ax.get_xlim()[1] < 10  # the base's new-language loss does not stretch the axis
    assert (lines["picked"].get_xdata()[0], lines["picked"].get_ydata()[0]) == (5.3, 4.5)
    assert "task_arithmetic" not in lines  # far beyond base and checkpoints: listed under the plot instead
    assert any("task_arithmetic (8.60, 16.30)" in t.get_text() for t in figure.texts)
    assert {t.get_text() for t in ax.texts} == {"0.3", "1", "3"} | {"1", "0.6"}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["obim", "regmean", "ties", base, "ckpt-300 (last)", "picked"]


def test_the_tradeoff_figures_own_labels_do_not_intersect():
    """The labels as drawn in the figure, measured by matplotlib's renderer: no two boxes intersect, and none
    covers a point of the plot, with two families' curves crowded into one corner."""
    crowded = [Point(f"obim@{s}", 5.0 + 0.02 * i, 5.0 - 0.01 * i, family="obim") for i, s in enumerate("12345")]
    crowded += [Point(f"ta@{s}", 5.01 + 0.02 * i, 5.0 - 0.01 * i, family="ta") for i, s in enumerate("6789")]
    points = [*fake_points(), *crowded]
    figure = tradeoff_figure(points, "zh")
    ax = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    assert len(boxes) == 5 + len(crowded)
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :]), [t.get_text() for t in ax.texts]
    markers = [ax.transData.transform((p.new_loss, p.old_loss)) for p in points if p.new_loss < 9]
    assert not any(box.contains(*xy) for box in boxes for xy in markers)


def test_labels_of_crowded_points_overlap_neither_each_other_nor_the_markers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5, 4))
    anchors = [(f"label{i}", 1.0 + 0.01 * (i % 4), 1.0 + 0.01 * (i // 4)) for i in range(12)]
    ax.plot([x for _, x, _ in anchors], [y for _, _, y in anchors], "o")
    ax.set_xlim(0.9, 1.2)
    ax.set_ylim(0.9, 1.2)
    obstacles = [(1.0 + 0.01 * i, 0.99) for i in range(4)]  # other markers just below the crowd
    boxes = place_labels(ax, anchors, obstacles)
    assert len(boxes) == len(anchors) == len(ax.texts)
    markers = [ax.transData.transform(xy) for xy in [*((x, y) for _, x, y in anchors), *obstacles]]
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :])
        assert not any(box.contains(*xy) for xy in markers)
    plt.close(figure)


def fake_table() -> ComparisonTable:
    def row(name: str, kind: str, en: float, de: float, zh: float) -> ComparisonRow:
        return ComparisonRow(name, Path(name), kind, {"obim_en_loss": en, "obim_de_loss": de, "obim_zh_loss": zh})

    rows = [
        row("base", "base", 4.4, 4.3, 13.0),
        row("ckpt-250", "checkpoint", 5.7, 5.9, 5.1),
        row("ckpt-300", "checkpoint", 5.8, 6.0, 5.0),
        row("obim", "merge", 5.8, 5.9, 5.0),
        row("regmean@base_weight=1", "merge", 4.5, 4.4, 5.4),
        row("ties", "merge", 5.0, 4.8, 6.5),
    ]
    return ComparisonTable(rows, {x: f"obim_{x}_loss" for x in ("en", "de", "zh")})


def test_the_report_marks_the_objectives_pick_and_the_plot_gets_families(tmp_path):
    config = DemoConfig.model_validate(
        {"merges": [{"method": "obim"}, {"method": "regmean", "sweep": {"base_weight": [1]}}, {"method": "ties"}]}
    )
    table = fake_table()
    pick(table, Objective())
    report = write_report(config, DemoResult(table, {"en": 1.4, "de": 1.7}), tmp_path).read_text(encoding="utf-8")
    marked = [line for line in report.splitlines() if line.endswith(" ✓ |")]
    assert marked == ["| regmean@base_weight=1 | merge | 4.500 | 4.400 | 5.400 | 4.767 | ✓ |"]
    assert "Picked **regmean@base_weight=1**: best average over all languages." in report
    points = {p.name: p for p in tradeoff_points(config, table)}
    assert set(points) == {"base", "ckpt-300 (last)", "obim", "regmean@base_weight=1", "ties"}
    assert points["regmean@base_weight=1"].picked and points["regmean@base_weight=1"].family == "regmean"
    assert points["base"].base and not points["ckpt-300 (last)"].base
    assert points["base"].family is None and points["ckpt-300 (last)"].old_loss == pytest.approx(5.9)
