"""The forgetting-recovery demo end to end: data, tokenizer, base, continued pretraining with the
callback, merges with OBIM and the baselines, one evaluator for every model, table and plots.

The demo reports whatever the numbers are; nothing here is tuned to make a method win.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from obim_trainer.checkpoints.atomic import write_atomically
from obim_trainer.demo.config import DemoConfig
from obim_trainer.demo.corpus import prepare_corpus, read_texts
from obim_trainer.demo.plots import Point, plot_losses, plot_ownership, plot_tradeoff
from obim_trainer.demo.tokenizer import train_tokenizer
from obim_trainer.demo.training import continue_pretraining, pretrain_base
from obim_trainer.evaluation import metric_names
from obim_trainer.evaluation.comparison import ComparisonTable, RowKind, evaluate_folders
from obim_trainer.pipeline.compare import Comparison, merge_evaluate_pick
from obim_trainer.pipeline.merge import MergeResult
from obim_trainer.tracking import Image, Table, block_group, make_run_logger, summarize_report
from obim_trainer.training.callback import OBIMCallback

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What the demo measured and where it wrote it."""

    table: ComparisonTable
    forgetting: dict[str, float]
    files: dict[str, Path] = field(default_factory=dict)


def loss(metrics: dict[str, float], language: str) -> float:
    return metrics[metric_names(language)[0]]


def old_average(config: DemoConfig, metrics: dict[str, float]) -> float:
    return math.fsum(loss(metrics, x) for x in config.old_languages) / len(config.old_languages)


def run_demo(config: DemoConfig, output: Path) -> DemoResult:
    """Run every stage into ``output`` (intermediate models under ``output/work``)."""
    output = Path(output)
    work = output / "work"
    corpus = prepare_corpus(config, work / "data")
    texts = [t for language in config.languages for t in read_texts(corpus.train(language))]
    tokenizer_dir = train_tokenizer(texts, config.vocab_size, work / "tokenizer")
    base_dir = pretrain_base(config, corpus, tokenizer_dir, work / "base", work)
    callback = continue_pretraining(config, corpus, base_dir, work / "run")
    comparison = compare(config, callback, base_dir, work)
    table = comparison.table
    assert table is not None
    result = DemoResult(table=table, forgetting=forgetting(config, table))
    result.files.update(zip(("table_md", "table_json"), table.write(output), strict=True))
    result.files.update(draw(config, callback, comparison, output))
    result.files["report"] = write_report(config, result, output)
    log_to_wandb(config, callback, result)
    return result


def checkpoint_folders(corpus_run: Path) -> dict[str, tuple[Path, RowKind]]:
    folders = sorted(corpus_run.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return {f"ckpt-{p.name.rsplit('-', 1)[1]}": (p, "checkpoint") for p in folders}


def compare(config: DemoConfig, callback: OBIMCallback, base_dir: Path, work: Path) -> Comparison:
    """Merge the selected checkpoints as every entry of ``config.merges`` says (an entry's own
    ``calibration_samples`` replaces the demo's for its merges), then evaluate the base, every checkpoint
    and every merge with the callback's own evaluator; the objective picks one merge."""
    assert callback.evaluator is not None
    evaluator = callback.evaluator
    chosen = [callback.candidates[s].merge_path for s in callback.selected]
    root = work / "merges"
    merge_config = callback.config.merge_config(chosen, root)
    batches = [
        (
            merge_config.model_copy(
                update={"calibration_samples": spec.calibration_samples or merge_config.calibration_samples}
            ),
            spec.plan(len(chosen)),
        )
        for spec in config.merges
    ]

    def evaluate(merges: dict[str, Path]) -> ComparisonTable:
        folders: dict[str, tuple[Path, RowKind]] = {
            "base": (base_dir, "base"),
            **checkpoint_folders(work / "run"),
            **{name: (path, "merge") for name, path in merges.items()},
        }
        return evaluate_folders(folders, evaluator)

    comparison = merge_evaluate_pick(batches, root, evaluate=evaluate, objective=config.objective)
    assert comparison.table is not None
    comparison.table.extra.update(families=config.family_of(), selected=[f"ckpt-{s}" for s in callback.selected])
    return comparison


def forgetting(config: DemoConfig, table: ComparisonTable) -> dict[str, float]:
    """Per old language, how much the last checkpoint's loss exceeds the base's."""
    rows = {row.name: row for row in table.rows}
    last = [row for row in table.rows if row.kind == "checkpoint"][-1]
    return {x: loss(last.metrics, x) - loss(rows["base"].metrics, x) for x in config.old_languages}


def draw(config: DemoConfig, callback: OBIMCallback, comparison: Comparison, output: Path) -> dict[str, Path]:
    table = comparison.table
    assert table is not None
    rows = {row.name: row for row in table.rows}
    curves = {
        x: {c.step: loss(c.metrics, x) for c in callback.candidates.values() if metric_names(x)[0] in c.metrics}
        for x in config.languages
    }
    base = {x: loss(rows["base"].metrics, x) for x in config.languages}
    merges = {r.name: {x: loss(r.metrics, x) for x in config.languages} for r in table.rows if r.kind == "merge"}
    return {
        "losses_png": plot_losses(curves, base, merges, output / "losses.png"),
        "ownership_png": plot_ownership(*ownership_by_block(callback, comparison.results), output / "ownership.png"),
        "tradeoff_png": plot_tradeoff(tradeoff_points(config, table), config.new_language, output / "tradeoff.png"),
    }


def tradeoff_points(config: DemoConfig, table: ComparisonTable) -> list[Point]:
    """The base, the last checkpoint and every merge (with its family, the pick marked) for the trade-off plot."""
    families = config.family_of()
    last = [r for r in table.rows if r.kind == "checkpoint"][-1]
    return [
        Point(
            f"{r.name} (last)" if r is last else r.name,
            loss(r.metrics, config.new_language),
            old_average(config, r.metrics),
            family=families.get(r.name) if r.kind == "merge" else None,
            picked=r.name == table.picked,
            base=r.kind == "base",
        )
        for r in table.rows
        if r.kind != "checkpoint" or r is last
    ]


def ownership_by_block(
    callback: OBIMCallback, results: dict[str, MergeResult]
) -> tuple[dict[str, list[float]], list[str]]:
    """Per decoder block, the share of positions each selected checkpoint owns in the OBIM merge (``obim``,
    else the first merge that reports ownership), as that merge's engine counted them."""
    owning = [name for name, r in results.items() if r.report is not None and r.report.owned]
    name = "obim" if "obim" in owning else next(iter(owning), None)
    labels = [f"ckpt-{s}" for s in callback.selected]
    if name is None:
        logger.info("no merge of the comparison reports ownership; the ownership plot is empty")
        return {}, labels
    result = results[name]
    assert result.report is not None
    layers = summarize_report(result.report, result.plan, group_by=block_group)
    return {group: summary.ownership_share() or [] for group, summary in layers.items()}, labels


def write_report(config: DemoConfig, result: DemoResult, output: Path) -> Path:
    """``README.md`` of the output folder: the table, the forgetting, the pictures."""
    lines = [
        "# Forgetting and its recovery",
        "",
        f"Base pretrained on {', '.join(config.old_languages)}; continued on {config.new_language}; "
        f"the {config.top_k} best checkpoints by {config.new_language} loss merged back into the base.",
        "",
        result.table.to_markdown(),
        "",
        "Forgetting (last checkpoint's loss minus the base's): "
        + ", ".join(f"{x} {v:+.3f}" for x, v in result.forgetting.items()),
        "",
        "![losses](losses.png)",
        "![ownership](ownership.png)",
        "![trade-off](tradeoff.png)",
        "",
    ]
    path = output / "README.md"
    write_atomically(path, "\n".join(lines))
    return path


def log_to_wandb(config: DemoConfig, callback: OBIMCallback, result: DemoResult) -> None:
    """The comparison and the pictures, into the W&B run the Trainer opened (nothing when W&B is off)."""
    run_logger = make_run_logger(config.report_to)
    if not run_logger.enabled:
        return
    rows = result.table.rows
    names = sorted({m for r in rows for m in r.metrics})
    values = {
        "obim/comparison": Table(
            ["model", "kind", *names], [[r.name, r.kind, *(r.metrics.get(n) for n in names)] for r in rows]
        ),
        **{
            f"obim/plots/{key.removesuffix('_png')}": Image(path)
            for key, path in result.files.items()
            if key.endswith("_png")
        },
    }
    run_logger.emit(max(callback.candidates), values)
    import wandb

    wandb.finish()
