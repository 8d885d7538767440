"""Peak memory of reading a DeepSpeed ZeRO checkpoint tensor by tensor, against DeepSpeed's consolidation.

Trains a Llama-shaped model (default ~19M parameters) for two steps under ZeRO-2 and ZeRO-3 on
two CPU processes (the run of ``tests/checkpoints/zero_run.py``), then measures, in a fresh process
each, on the same checkpoint:

* ``reader``: :class:`ZeroCheckpointReader`, every tensor read and released in turn, as the merge
  engine reads them;
* ``deepspeed``: ``get_fp32_state_dict_from_zero_checkpoint`` — the whole fp32 state dict;
* ``deepspeed-lazy``: the same with ``lazy_mode=True``, each pseudo-tensor materialised and released
  in turn.

Memory is the private (anonymous) memory a process gains over its state after imports, sampled
every millisecond and after each tensor. Mapped checkpoint pages that a read touches are clean page
cache the kernel reclaims under pressure, so they are shown apart (peak RSS) and left out of the
ratio, which is ``reader`` over ``deepspeed``.
Run: ``python benchmarks/zero_read_memory.py [--layers 8 --hidden 512] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # for the training run shared with the tests
from tests.checkpoints.zero_run import launch

logger = logging.getLogger("zero_read_memory")
MODES = ("reader", "deepspeed", "deepspeed-lazy")


def rss_anon() -> int:
    """Bytes of private memory (RssAnon) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon (this benchmark needs Linux)")


class PeakSampler:
    """The highest RssAnon seen by a 1 ms sampling thread or an explicit :meth:`sample`."""

    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def child(mode: str, folder: Path) -> dict:
    """Read ``folder`` one way; report the private memory gained at the peak."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from obim_trainer.checkpoints.zero_reader import ZeroCheckpointReader

    gc.collect()
    baseline = rss_anon()
    largest = 0
    with PeakSampler() as sampler:
        if mode == "reader":
            with ZeroCheckpointReader(folder) as reader:
                for name in reader.tensor_infos():
                    tensor = reader.read(name)
                    largest = max(largest, tensor.nbytes)
                    sampler.sample()
                    del tensor
        elif mode == "deepspeed":
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder))
            largest = max(t.nbytes for t in state.values())
            sampler.sample()
            del state
        else:
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(folder), lazy_mode=True)
            for pseudo in lazy.values():
                tensor: torch.Tensor = pseudo.contiguous()
                largest = max(largest, tensor.nbytes)
                sampler.sample()
                del tensor
    return {
        "peak_private": sampler.peak - baseline,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "largest": largest,
    }


def run_child(mode: str, folder: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(folder)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} on {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # DeepSpeed prints its progress before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size; the MLP is twice as wide")
    parser.add_argument("--stages", default="2,3", help="comma-separated ZeRO stages")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        sys.stdout.write(json.dumps(child(args.child[0], Path(args.child[1]))) + "\n")
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="obim-zero-bench-"))
    rows = [f"{'stage':<6} {'mode':<15} {'private peak':>13} {'x largest':>10} {'peak RSS':>10} {'/deepspeed':>11}"]
    for stage in (int(s) for s in args.stages.split(",")):
        folder = work / f"zero{stage}" / "checkpoint-2"
        if not folder.exists():
            logger.info(
                "training %d layers x %d hidden under ZeRO-%d on two CPU processes", args.layers, args.hidden, stage
            )
            start = time.perf_counter()
            launch(work / f"zero{stage}", stage, args.layers, args.hidden)
            logger.info("  done in %.0f s", time.perf_counter() - start)
        results = {mode: run_child(mode, folder) for mode in MODES}
        reference = results["deepspeed"]["peak_private"]
        for mode, r in results.items():
            rows.append(
                f"{stage:<6} {mode:<15} {r['peak_private'] / 1e6:>10.1f} MB {r['peak_private'] / r['largest']:>10.1f} "
                f"{r['peak_rss'] / 1e6:>7.0f} MB {r['peak_private'] / reference:>11.3f}"
            )
    logger.info(
        "\n%s\n(largest tensor: the largest fp32 master weight; private peak: RssAnon over the baseline)",
        "\n".join(rows),
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
