"""What do the calibration statistics cost compared with training on the same tokens?

Builds a Llama from a config (default ~30M parameters, float32, random weights: the cost of a
pass does not depend on the values) and random calibration samples of varying length, then runs
each pass of ``--kinds`` in a fresh process of its own, on the same batches:

* ``train``: one AdamW step (forward with labels, backward, optimizer step) per batch: the unit;
* ``forward``: a plain ``model(input_ids, attention_mask)`` loop under ``no_grad``;
* ``activations``: :meth:`ActivationStats.collect` (Σx² hooks on every Linear, for OBIM);
* ``grams``: :meth:`GramStats.collect` (XᵀX in float64 per distinct input, for RegMean);
* ``fishers``: :meth:`FisherStats.collect` (a forward and a backward pass per batch of 4 texts,
  by definition of the per-example Fisher, for Fisher merging).

Each process runs its pass once untimed, recording memory, then ``--repeats`` timed times; the
fastest counts. Memory is the process's peak resident set during that first pass minus its
resident set just before it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``,
minus ``VmRSS``), so it includes what the pass keeps (AdamW state, gradients, the statistics) and
its transient activations. Prints a table of each pass's time ÷ the training pass and peak memory
÷ the model's float32 weight bytes, all measured in the same invocation.
Run: ``python benchmarks/statistics_cost.py [--samples 32 --max-length 128 --layers 6 --hidden 512]``
(``--hidden 768 --layers 12 --samples 100 --max-length 256`` for the 127M model of the README's
earlier figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("statistics_cost")

KINDS = ("train", "forward", "activations", "grams", "fishers")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=args.vocab,
        max_position_embeddings=args.max_length,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def calibration(args: argparse.Namespace):
    from obim_trainer.calibration import CalibrationSet

    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.max_length // 4, args.max_length + 1, (args.samples,), generator=gen)
    ids = [torch.randint(1, args.vocab, (int(n),), generator=gen) for n in lengths]
    return CalibrationSet(input_ids=ids, pad_token_id=0)


def make_pass(kind: str, model: torch.nn.Module, samples, batch_size: int):
    """A zero-argument callable running one full pass of ``kind`` over the samples."""
    from obim_trainer.calibration import ActivationStats
    from obim_trainer.calibration.fisher_stats import FisherStats
    from obim_trainer.calibration.gram_stats import GramStats

    if kind == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def train() -> None:
            model.train()
            for ids, mask in samples.batches(batch_size):
                labels = ids.masked_fill(mask == 0, -100)
                model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.eval()

        return train
    if kind == "forward":

        def forward() -> None:
            with torch.no_grad():
                for ids, mask in samples.batches(batch_size):
                    model(input_ids=ids, attention_mask=mask, use_cache=False)

        return forward
    if kind == "fishers":  # its own batches of 4 texts, by definition
        return lambda: FisherStats.collect(model, samples, progress=False)
    collector = {"activations": ActivationStats, "grams": GramStats}[kind]
    return lambda: collector.collect(model, samples, batch_size=batch_size, progress=False)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def child(kind: str, args: argparse.Namespace) -> dict:
    """Memory of the first pass and the fastest of ``args.repeats`` timed passes, in this process."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, samples = build_model(args), calibration(args)
    run = make_pass(kind, model, samples, args.batch_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    run()
    peak = _status_bytes("VmHWM") - before
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": min(times), "peak_bytes": peak, "weight_bytes": weights, "tokens": samples.num_tokens}


def run_child(kind: str, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", kind], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the {kind} pass failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict]) -> str:
    """One row per pass: seconds, ÷ the training pass, peak memory and ÷ the weight bytes."""
    unit = results["train"]["seconds"]
    lines = [f"{'pass':<12} {'seconds':>9} {'/train':>7} {'peak MB':>9} {'/weights':>9}"]
    for kind, r in results.items():
        lines.append(
            f"{kind:<12} {r['seconds']:>9.3f} {r['seconds'] / unit:>7.3f} "
            f"{r['peak_bytes'] / 1e6:>9.1f} {r['peak_bytes'] / r['weight_bytes']:>9.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (the paper uses 100)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of every pass except fishers (4)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each after the untimed one")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per pass (default: torch's)")
    parser.add_argument(
        "--kinds", default="forward,activations,grams,fishers", help=f"comma-separated, of {', '.join(KINDS[1:])}"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args)) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown --kinds {', '.join(unknown)}; choose from {', '.join(KINDS[1:])}")
    argv = [a for a in sys.argv[1:]]
    results: dict[str, dict] = {}
    for kind in ["train", *(k for k in kinds if k != "train")]:
        results[kind] = run_child(kind, argv)
        logger.info("%s: %.2f s, peak +%.0f MB", kind, results[kind]["seconds"], results[kind]["peak_bytes"] / 1e6)
    first = results["train"]
    logger.info(
        "model: %.1f MB of float32 weights; %d samples, %d tokens; memory = peak RSS - RSS before the pass",
        first["weight_bytes"] / 1e6,
        args.samples,
        first["tokens"],
    )
    print(table(results))


if __name__ == "__main__":
    main()
