"""How fast is a merge compared with just reading the inputs and writing the output, and with mergekit?

Builds a synthetic Llama-shaped model (default ~270M parameters, bf16) and K checkpoints
on disk, computes their activation statistics once (cached beside each checkpoint, as a
real run would have them; the first run also fills the per-user caches of the compiled merge
loops, the model layout and the tokenized calibration set), then measures in fresh processes,
on the same warm files, each timed from after its imports (Python and torch start-up excluded
on both sides):

* the I/O floor: read every tensor of the base and the K checkpoints, write one output (and, for the
  sweeps, write three);
* OBIM with 1 worker and with N (``--workers``, default: one per core), and any other
  ``--methods``: ``merge_checkpoints`` end to end, and the streaming part alone (the engine's
  own timing: reading, merging and writing the tensors);
* two sweeps of three variants with ``merge_variants`` (OBIM at total shares 1, 0.8 and 0.6; obim,
  ties and task_arithmetic), each made together (each input tensor read once for all three) and, for
  reference, one merge after the other;
* ``mergekit-yaml`` TIES on the same folders (and mergekit's version of every other method
  timed, where it has one), if mergekit is installed;

and prints the times, the ratios the project targets (OBIM ≤ 2 × the floor, ≥ 5 × faster than
mergekit TIES, a 3-variant sweep ≤ 1.5 × one merge) and each process's peak RSS against the budget
2 GB + 4 × the largest tensor.
Run: ``python benchmarks/merge_speed.py [--workers 2] [--methods obim,ties] [--layers 16 ...]``.
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

import torch

logger = logging.getLogger("merge_speed")


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=args.vocab,
        architectures=["LlamaForCausalLM"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama checkpoint, from the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def write_model(folder: Path, config, shapes: dict[str, tuple[int, ...]], seed: int, base: Path | None) -> None:
    """Write a model tensor by tensor; checkpoints are the base plus small structured noise."""
    from obim_trainer.checkpoints import ShardedSafetensorsWriter, open_checkpoint

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    plan = [(n, s, torch.bfloat16) for n, s in shapes.items()]
    reader = open_checkpoint(base) if base is not None else None
    with ShardedSafetensorsWriter(folder, plan, max_shard_size=2 * 10**9, metadata={"format": "pt"}) as writer:
        for name, shape in shapes.items():
            if reader is None:
                t = torch.randn(shape, generator=gen) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
            else:
                t = reader.read(name).float() + torch.randn(shape, generator=gen) * 0.002
            writer.write(name, t.to(torch.bfloat16))
        writer.close()
    if reader is not None:
        reader.close()


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["merging checkpoints recovers what continued pre-training forgot"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>").save_pretrained(folder)


def child_floor(work: Path, k: int, outputs: int = 1) -> dict:
    """Read every input tensor once and write ``outputs`` outputs: the least a merge (or a sweep of
    ``outputs`` variants) must do."""
    from obim_trainer.checkpoints import ShardedSafetensorsWriter, open_checkpoint

    start = time.perf_counter()
    readers = [open_checkpoint(work / "base"), *(open_checkpoint(work / f"checkpoint-{i}") for i in range(k))]
    infos = readers[0].tensor_infos()
    plan = [(n, i.shape, i.dtype) for n, i in infos.items()]
    folders = [work / f"floor-out-{j}" for j in range(outputs)]
    writers = []
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        writers.append(ShardedSafetensorsWriter(folder, plan, max_shard_size=5 * 10**9, metadata={"format": "pt"}))
    for name in infos:
        tensors = [r.read(name).clone() for r in readers]  # clone: really touch every byte
        for writer in writers:
            writer.write(name, tensors[-1])
    for writer in writers:
        writer.close()
    seconds = time.perf_counter() - start
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return {"seconds": seconds}


def calibration_kwargs(work: Path, method: str) -> dict:
    """One calibration file, or for the methods measuring base and checkpoints on different languages, two."""
    if method not in {m for m, _ in STATISTICS_ROWS.values()}:
        return {"calibration_data": work / "calib.jsonl"}
    return {"calibration_data": {"en": work / "calib.jsonl", "de": work / "calib-de.jsonl"}, "new_languages": ["de"]}


def child_merge(work: Path, k: int, method: str, workers: int, params: dict | None = None, fresh: bool = False) -> dict:
    """One ``merge_checkpoints`` run; ``fresh`` recomputes the statistics instead of reading the cached ones."""
    from obim_trainer.merging import get_method
    from obim_trainer.pipeline.merge import merge_checkpoints

    k = get_method(method).max_models or k
    start = time.perf_counter()
    result = merge_checkpoints(
        base=work / "base",
        checkpoints=[work / f"checkpoint-{i}" for i in range(k)],
        method=method,
        params=params or {},
        **calibration_kwargs(work, method),
        calibration_samples=CALIBRATION_SAMPLES,
        stats_beside_checkpoints=True,  # where the callback leaves them in a real run
        recompute_stats=fresh,
        output=work / f"merged-{method}",
        overwrite=True,
        progress=False,
        workers=workers,
    )
    seconds = time.perf_counter() - start  # deleting the output is not part of the merge
    shutil.rmtree(work / f"merged-{method}", ignore_errors=True)
    return {"seconds": seconds, "stream_seconds": result.manifest["timings"]["merge_s"]}


SWEEPS = {
    "obim at total shares 1, 0.8, 0.6": (["obim"], [1.0, 0.8, 0.6]),
    "obim, ties, task_arithmetic": (["obim", "ties", "task_arithmetic"], None),
}
"""The 3-variant sweeps timed against one merge: name -> (methods, total shares)."""


def child_sweep(work: Path, k: int, name: str, together: bool) -> dict:
    """``merge_variants`` of the sweep ``name`` (see :data:`SWEEPS`): together (one read of the inputs for
    all), or one merge per variant (``merge_checkpoints`` on each configuration in turn)."""
    from obim_trainer.pipeline.merge import merge_checkpoints
    from obim_trainer.pipeline.variants import merge_variants, plan_variants
    from obim_trainer.settings.merge import MergeConfig

    start = time.perf_counter()
    settings = {"base": work / "base", "checkpoints": [work / f"checkpoint-{i}" for i in range(k)], "progress": False}
    settings |= {**calibration_kwargs(work, "obim"), "calibration_samples": CALIBRATION_SAMPLES}
    config = MergeConfig.build({**settings, "stats_beside_checkpoints": True, "output": work / "sweep"})
    methods, shares = SWEEPS[name]
    variants = plan_variants(methods, {}, shares, k)
    one_by_one = None if together else lambda configs: [merge_checkpoints(c) for c in configs]
    merge_variants(config, variants, work / "sweep", sweep=one_by_one)
    seconds = time.perf_counter() - start
    shutil.rmtree(work / "sweep", ignore_errors=True)
    return {"seconds": seconds}


def timed_sweep(work: Path, k: int, name: str, together: bool, repeats: int) -> dict:
    """The fastest of ``repeats`` fresh-process sweeps, and the largest peak RSS among them."""
    mode = "together" if together else "separate"
    runs = [run_child("sweep", str(work), str(k), name, mode) for _ in range(repeats)]
    return {"seconds": min(r["seconds"] for r in runs), "peak_rss": max(r["peak_rss"] for r in runs)}


def sweep_summary(work: Path, k: int, repeats: int, one: float, floor: float) -> list[str]:
    """Each of :data:`SWEEPS` made together and one merge after the other, against one OBIM merge; and,
    since a sweep writes three outputs where a merge writes one, each against its own I/O floor."""
    sweep_floor = min(run_child("floor", str(work), str(k), "3")["seconds"] for _ in range(repeats))
    lines = [
        f"I/O floor of a 3-variant sweep (read {k + 1} models once, write 3): {sweep_floor:.2f}s = "
        f"{sweep_floor / one:.2f} x one merge; one merge / its floor: {one / floor:.2f}"
    ]
    logger.info(lines[-1])
    for name in SWEEPS:
        together, separate = (timed_sweep(work, k, name, mode, repeats) for mode in (True, False))
        lines.append(
            f"3-variant sweep ({name}) / one merge: {together['seconds'] / one:.2f} (target <= 1.5; "
            f"{together['seconds']:.2f}s vs {one:.2f}s, / its floor {together['seconds'] / sweep_floor:.2f}, "
            f"peak RSS {together['peak_rss'] / 1e9:.2f}GB); one merge after the other: "
            f"{separate['seconds'] / one:.2f} ({separate['seconds']:.2f}s, peak RSS "
            f"{separate['peak_rss'] / 1e9:.2f}GB)"
        )
        logger.info(lines[-1])
    return lines


CALIBRATION_SAMPLES = 8

# Methods that need statistics other than OBIM's: row name -> (method, params). Timed with the statistics
# cached (merge only) and recomputed (statistics included); sequential RegMean always runs the model on
# the texts (its Grams depend on the merged earlier layers), so it has one time.
STATISTICS_ROWS: dict[str, tuple[str, dict]] = {
    "regmean seq.": ("regmean", {}),
    # the paper's α = 0.9: with α = 1 the fp32 Grams of these few repeated texts can fail even the ridged
    # Cholesky (measured at hidden 512)
    "regmean non-seq.": ("regmean", {"sequential": False, "alpha": 0.9}),
    "fisher_merging": ("fisher_merging", {}),
}

MERGEKIT_NAMES = {
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "della": "della",
    "breadcrumbs": "breadcrumbs",
    "breadcrumbs_ties": "breadcrumbs_ties",
    "model_stock": "model_stock",
    "slerp": "slerp",
    "average": "linear",
}


def mergekit_config(work: Path, k: int, name: str) -> dict:
    """The same merge as a mergekit config (default parameters, density 0.5 where it applies)."""
    params = {} if name in ("model_stock", "slerp") else {"weight": 1.0}
    if name not in ("model_stock", "slerp", "linear", "task_arithmetic"):
        params["density"] = 0.5
    models = [{"model": str(work / f"checkpoint-{i}"), **({"parameters": params} if params else {})} for i in range(k)]
    config: dict = {"merge_method": name, "models": models, "dtype": "bfloat16"}
    if name != "linear":
        config["models"].insert(0, {"model": str(work / "base")})
        config["base_model"] = str(work / "base")
    if name == "slerp":
        config["parameters"] = {"t": 0.5}
    return config


def mergekit_seconds(work: Path, k: int, method: str) -> float | None:
    """Wall time of ``mergekit-yaml`` for the same merge, or None when mergekit is not installed."""
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    if method not in MERGEKIT_NAMES or not Path(exe).exists():
        return None
    cfg = work / f"mergekit-{method}.yml"
    cfg.write_text(json.dumps(mergekit_config(work, 1 if method == "slerp" else k, MERGEKIT_NAMES[method])))
    out = work / f"mergekit-out-{method}"
    start = time.perf_counter()
    run = subprocess.run([exe, str(cfg), str(out), "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if run.returncode != 0:
        logger.warning("mergekit %s failed: %s", method, run.stderr[-500:])
        return None
    return seconds


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss() -> int:
    """Bytes: the largest resident set of this process and of any worker process it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) * 1024


def timed_merge(
    work: Path, k: int, method: str, workers: int, repeats: int, params: dict | None = None, fresh: bool = False
) -> dict:
    """The fastest of ``repeats`` fresh-process merges, and the largest peak RSS among them."""
    extra = (json.dumps(params or {}), "fresh" if fresh else "cached")
    runs = [run_child("merge", str(work), str(k), method, str(workers), *extra) for _ in range(repeats)]
    return {
        "seconds": min(r["seconds"] for r in runs),
        "stream_seconds": min(r["stream_seconds"] for r in runs),
        "peak_rss": max(r["peak_rss"] for r in runs),
    }


def row(name: str, merge: dict, floor: float, budget: int, theirs: float | None) -> str:
    total, stream, peak = merge["seconds"], merge["stream_seconds"], merge["peak_rss"]
    return (
        f"{name:<28} {total:>9.2f}s {total / floor:>7.2f} {stream:>7.2f}s {stream / floor:>7.2f} "
        f"{peak / 1e9:>7.2f}GB{'' if peak <= budget else '!'} "
        + (f"{theirs:>8.2f}s {theirs / total:>8.2f}" if theirs else f"{'-':>9} {'-':>8}")
    )


def statistics_rows(work: Path, args: argparse.Namespace, floor: float, budget: int) -> list[str]:
    """RegMean (sequential and not) and Fisher merging, merge only (cached statistics) and with statistics."""
    out = []
    for name, (method, params) in STATISTICS_ROWS.items():
        kinds = ("with stats",) if params.get("sequential", True) and method == "regmean" else ("cached", "with stats")
        if "cached" in kinds:
            run_child("merge", str(work), str(args.k), method, "1", json.dumps(params))  # fill the cache, untimed
        for kind in kinds:
            merge = timed_merge(work, args.k, method, 1, args.repeats, params, fresh=kind == "with stats")
            out.append(row(f"{name} {kind}", merge, floor, budget, None))
            logger.info(out[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=3, help="number of checkpoints")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for the parallel OBIM merge")
    parser.add_argument("--methods", default="", help="comma-separated methods to time besides OBIM, or 'all'")
    parser.add_argument(
        "--mergekit", action=argparse.BooleanOptionalAction, default=True, help="time mergekit-yaml where installed"
    )
    parser.add_argument(
        "--statistics-methods",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also time {', '.join(STATISTICS_ROWS)} with cached and with recomputed statistics (default on)",
    )
    parser.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time 3-variant sweeps, made together and one by one, against one merge (default on)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the fastest counts")
    parser.add_argument("--workdir", type=Path, help="keep the synthetic models here (default: a temp dir)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, work, k = args.child[0], Path(args.child[1]), int(args.child[2])
        if kind == "floor":
            result = child_floor(work, k, int(args.child[3]) if len(args.child) > 3 else 1)
        elif kind == "sweep":
            result = child_sweep(work, k, args.child[3], args.child[4] == "together")
        else:
            params = json.loads(args.child[5]) if len(args.child) > 5 else None
            fresh = len(args.child) > 6 and args.child[6] == "fresh"
            result = child_merge(work, k, args.child[3], int(args.child[4]), params, fresh)
        result["peak_rss"] = peak_rss()
        sys.stdout.write(json.dumps(result) + "\n")
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="obim-bench-"))
    config = llama_config(args)
    shapes = tensor_shapes(config)
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    largest = max(torch.Size(s).numel() for s in shapes.values()) * 2  # bf16 bytes
    if not (work / "base").exists():
        logger.info("writing a %.0fM-parameter base and %d checkpoints to %s", numel / 1e6, args.k, work)
        write_model(work / "base", config, shapes, seed=0, base=None)
        write_tokenizer(work / "base")
        for i in range(args.k):
            write_model(work / f"checkpoint-{i}", config, shapes, seed=i + 1, base=work / "base")
        calib = ["continued pre-training teaches a new language"] * 8
        (work / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in calib))
        calib_de = ["fortgesetztes Vortrainieren lehrt eine neue Sprache"] * 8
        (work / "calib-de.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in calib_de))
    from obim_trainer.merging import available_methods

    extra = list(available_methods()) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    logger.info("computing (or reusing) activation statistics once, untimed")
    run_child("merge", str(work), str(args.k), "obim", "1")

    floors = [run_child("floor", str(work), str(args.k)) for _ in range(args.repeats)]
    floor = min(f["seconds"] for f in floors)
    budget = 2 * 10**9 + 4 * largest
    logger.info("model: %.0fM parameters, bf16, K=%d, largest tensor %.0f MB", numel / 1e6, args.k, largest / 1e6)
    logger.info(
        "I/O floor (read %d models, write 1): %.2f s, peak RSS %.2f GB",
        args.k + 1,
        floor,
        max(f["peak_rss"] for f in floors) / 1e9,
    )
    ties_mergekit = mergekit_seconds(work, args.k, "ties") if args.mergekit else None
    obim = {w: timed_merge(work, args.k, "obim", w, args.repeats) for w in sorted({1, args.workers})}
    rows = [
        f"{'method':<28} {'end-to-end':>10} {'/floor':>7} {'stream':>8} {'/floor':>7} "
        f"{'peak RSS':>9} {'mergekit':>9} {'mk/ours':>8}"
    ]
    rows += [row(f"obim ({w} worker{'s' if w > 1 else ''})", m, floor, budget, ties_mergekit) for w, m in obim.items()]
    for method in extra:
        merge = timed_merge(work, args.k, method, 1, args.repeats)
        rows.append(
            row(method, merge, floor, budget, mergekit_seconds(work, args.k, method) if args.mergekit else None)
        )
        logger.info(rows[-1])
    if args.statistics_methods:
        rows += statistics_rows(work, args, floor, budget)
    best = min(obim.values(), key=lambda m: m["seconds"])
    stream = min(m["stream_seconds"] for m in obim.values())
    summary = [
        f"OBIM streaming / I/O floor: {stream / floor:.2f} (target <= 2)",
        f"OBIM end to end / I/O floor: {best['seconds'] / floor:.2f}",
        f"OBIM {args.workers} workers vs 1: {obim[1]['seconds'] / obim[args.workers]['seconds']:.2f}x as fast",
    ]
    if args.sweep:
        summary += sweep_summary(work, args.k, args.repeats, obim[1]["seconds"], floor)
    if ties_mergekit:
        summary.append(f"mergekit TIES / OBIM: {ties_mergekit / best['seconds']:.2f}x (target >= 5; mk/ours above)")
    else:
        summary.append("mergekit TIES: not measured (--no-mergekit, or mergekit-yaml not installed)")
    print("\n".join(rows))  # the result table, to stdout
    print(
        f"(mk/ours: mergekit's time for the same method, OBIM rows against mergekit TIES; RSS budget 2 GB + 4 x "
        f"largest tensor = {budget / 1e9:.2f} GB; '!' marks a process over it)"
    )
    print("\n".join(summary))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
