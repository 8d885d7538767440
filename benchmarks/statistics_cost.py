"""What do the calibration statistics cost compared with a plain forward pass over the same samples?

Builds a Llama from a config (default ~110M parameters, float32, random weights: the cost of
a forward pass does not depend on the values) and random calibration samples of varying length,
then times, alternately and on the same batches, a plain ``model(input_ids, attention_mask)``
loop under ``no_grad`` and each kind of statistics in ``--kinds``: :meth:`ActivationStats.collect`
(the same loop with Σx² hooks on every Linear; target ≤ 1.2), :meth:`GramStats.collect` (XᵀX in
float64 per distinct input) and :meth:`FisherStats.collect` (a forward and a backward pass per batch
of 4 texts). Prints each, the fastest of ``--repeats``, and its ratio to the plain forward passes.
Run: ``python benchmarks/statistics_cost.py [--samples 100 --max-length 256 --layers 12 --kinds activations,grams]``.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

logger = logging.getLogger("statistics_cost")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
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


def plain_forward(model: torch.nn.Module, samples, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for ids, mask in samples.batches(batch_size):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - start


def with_statistics(kind: str, model: torch.nn.Module, samples, batch_size: int) -> float:
    from obim_trainer.calibration import ActivationStats
    from obim_trainer.calibration.fisher_stats import FisherStats
    from obim_trainer.calibration.gram_stats import GramStats

    start = time.perf_counter()
    if kind == "fishers":
        FisherStats.collect(model, samples, progress=False)  # its own batches of 4 texts, by definition
    else:
        collector = {"activations": ActivationStats, "grams": GramStats}[kind]
        collector.collect(model, samples, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=100, help="calibration samples (the paper's 100)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating; the fastest counts")
    parser.add_argument(
        "--kinds", default="activations", help="comma-separated: activations, grams, fishers (default activations)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, samples = build_model(args), calibration(args)
    params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.0fM parameters; %d samples, %d tokens", params / 1e6, args.samples, samples.num_tokens)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    plain_forward(model, samples, args.batch_size)  # warm-up
    plain: list[float] = []
    stats: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        plain.append(plain_forward(model, samples, args.batch_size))
        for kind in kinds:
            stats[kind].append(with_statistics(kind, model, samples, args.batch_size))
    logger.info("plain forward passes: %.2f s", min(plain))
    for kind, times in stats.items():
        logger.info("%s: %.2f s, %.2f x the plain forward passes", kind, min(times), min(times) / min(plain))


if __name__ == "__main__":
    main()
