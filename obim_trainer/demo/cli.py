"""``obim-demo``: the CPU forgetting-recovery experiment, end to end, in one command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from obim_trainer.demo.config import DemoConfig
from obim_trainer.errors import OBIMError

logger = logging.getLogger("obim_trainer.demo")

DESCRIPTION = """\
Show forgetting and its recovery on a CPU in minutes (OBIM paper, Table 2, in miniature):

  1. read real English, German and Chinese text from Debian's fortunes packages;
  2. train a byte-level BPE tokenizer and pretrain a tiny Llama on the old languages;
  3. continue pretraining it on the new language with OBIMCallback attached: every save records
     activation statistics and the loss per language; the best checkpoints are merged at the end;
  4. merge the same checkpoints as every entry of `merges:` says (OBIM at several total shares,
     forgetting-aware RegMean and Fisher merging with calibration per language, the baselines),
     evaluate every model on every language with one evaluator, pick one by the objective;
  5. write README.md (the table), comparison.md/.json, losses.png, ownership.png, tradeoff.png.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="obim-demo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML settings (configs/demo/cpu.yaml); defaults: DemoConfig's."
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="Folder for results and models.")
    parser.add_argument(
        "--report-to", choices=["none", "wandb"], default=None, help="Also log to W&B (overrides YAML)."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from obim_trainer.demo.pipeline import run_demo

    try:
        config = DemoConfig.from_yaml(options.config) if options.config else DemoConfig()
        if options.report_to:
            config = config.model_copy(update={"report_to": options.report_to})
        result = run_demo(config, options.output)
    except OBIMError as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(result.files["report"].read_text(encoding="utf-8"))
    logger.info("results in %s", options.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
