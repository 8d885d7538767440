"""How much memory does a non-sequential RegMean merge hold compared with an OBIM merge of the same model?

RegMean reads one input Gram [in, in] per linear map and model, float64 while summed: at 7B about
44 GB per model, more than the weights. The Grams are collected block by block and streamed
through the statistics file, so a merge should hold a few Grams, not all of them. This script writes
a bf16 Llama (default ~110M parameters: hidden 1024, 8 blocks, so that one model's Grams, 356 MB in
float32, outweigh its 220 MB of weights) and K checkpoints near it, then runs in fresh processes:

* ``obim``: ``merge_checkpoints(method="obim")`` with its activation statistics computed;
* ``regmean``: ``method="regmean", sequential=False`` with the Grams of the base and every checkpoint
  computed (collection, storage and merge: where the memory used to go);
* ``regmean cached``: the same merge again, its Grams read from the cache (the merge alone).

Each row prints the process's peak resident set (``ru_maxrss``) and its ratio to the OBIM merge's.
``--code DIR`` runs the merges with another checkout's ``obim_trainer`` (for a before/after: the
model files are the same). Run: ``python benchmarks/gram_memory.py [--hidden 1024 --layers 8 --k 2]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("gram_memory")

SAMPLES = 8
ROWS: dict[str, tuple[str, dict, bool]] = {
    "obim": ("obim", {}, True),
    "regmean": ("regmean", {"sequential": False, "alpha": 0.9}, True),
    "regmean cached": ("regmean", {"sequential": False, "alpha": 0.9}, False),
}
"""Row -> (method, params, statistics recomputed). α = 0.9: the Grams of a few random texts are near singular."""


def child(work: Path, row: str, k: int) -> dict:
    """One merge in this process; its peak resident set."""
    from obim_trainer.pipeline.merge import merge_checkpoints

    method, params, fresh = ROWS[row]
    start = time.perf_counter()
    merge_checkpoints(
        base=work / "base",
        checkpoints=[work / f"checkpoint-{i}" for i in range(k)],
        method=method,
        params=params,
        calibration_data={"en": work / "calib.jsonl", "de": work / "calib-de.jsonl"},
        new_languages=["de"],
        calibration_samples=SAMPLES,
        calibration_max_length=64,
        stats_cache_dir=work / "cache",
        recompute_stats=fresh,
        output=work / "merged",
        overwrite=True,
        progress=False,
    )
    shutil.rmtree(work / "merged", ignore_errors=True)
    return {"seconds": time.perf_counter() - start, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def run_child(work: Path, row: str, k: int, code: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code or Path(__file__).resolve().parents[1])}
    args = [sys.executable, __file__, "--child", row, "--work", str(work), "--k", str(k)]
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{row} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_inputs(work: Path, args: argparse.Namespace) -> None:
    """The base, K checkpoints (the merge benchmark's writer), a tokenizer and two languages' texts."""
    sys.path.insert(0, str(Path(__file__).parent))
    from merge_speed import llama_config, tensor_shapes, write_model, write_tokenizer

    args.intermediate = args.hidden * 11 // 4
    config = llama_config(args)
    shapes = tensor_shapes(config)
    write_model(work / "base", config, shapes, seed=0, base=None)
    write_tokenizer(work / "base")
    for i in range(args.k):
        write_model(work / f"checkpoint-{i}", config, shapes, seed=i + 1, base=work / "base")
    words = {
        "en": "merging checkpoints recovers what continued pre-training forgot".split(),
        "de": "fortgesetztes Vortrainieren lehrt eine neue Sprache und vergisst die alte".split(),
    }
    for language, name in (("en", "calib.jsonl"), ("de", "calib-de.jsonl")):
        texts = [" ".join(words[language][(i + j) % len(words[language])] for j in range(40)) for i in range(SAMPLES)]
        (work / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _is_gram_file(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("kind", "").startswith("grams")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--code", type=Path, default=None, help="a checkout whose obim_trainer runs the merges")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.work, args.child, args.k)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        write_inputs(work, args)
        weights = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
        results = {row: run_child(work, row, args.k, args.code) for row in ROWS}
        grams = max(f.stat().st_size for f in (work / "cache").glob("*.safetensors") if _is_gram_file(f))
    obim = results["obim"]["peak_rss"]
    print(f"model: hidden {args.hidden}, {args.layers} blocks, K={args.k}; weights {weights / 1e6:.0f} MB (bf16)")
    print(f"one model's Gram file: {grams / 1e6:.0f} MB (float32)")
    print(f"{'merge':<16} {'seconds':>8} {'peak MB':>8} {'/obim':>6}")
    for row, result in results.items():
        peak = result["peak_rss"]
        print(f"{row:<16} {result['seconds']:>8.1f} {peak / 1024:>8.0f} {peak / obim:>6.2f}")


if __name__ == "__main__":
    main()
