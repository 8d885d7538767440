"""How long does RegMean's normal-equation solve take for one linear map of a 7B Llama?

RegMean (Jin et al. 2023, eq. 2 of the paper; ``obim_trainer/merging/least_squares.py``) solves
W·G = N per linear map, in float64 by Cholesky, with G the [in, in] input Gram and N the
[out, in] numerator. A 7B Llama has two kinds of input width: 4096 (q/k/v/o, gate, up) and 11008
(down_proj), each with 4096 output rows. This times the project's own
:func:`~obim_trainer.merging.least_squares.solve_least_squares` on a random positive-definite
system of each size, on the CPU and, when ``torch.cuda.is_available()``, on the GPU (prints
"no GPU" otherwise). Time excludes building the system; the fastest of ``--repeats`` counts.
Run: ``python benchmarks/regmean_solve.py [--sizes 4096,11008 --out 4096 --repeats 1]``.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from obim_trainer.merging.least_squares import solve_least_squares

logger = logging.getLogger("regmean_solve")


def system(size: int, out: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense, positive-definite Gram G = I + S (S symmetric, spectral norm ≈ 0.5) and a numerator N, float64.

    Cholesky's cost depends on the size only, so the system is built in O(size²), not as XᵀX.
    """
    gen = torch.Generator().manual_seed(size)
    noise = torch.randn(size, size, generator=gen, dtype=torch.float64).mul_(0.25 / size**0.5)
    gram = noise + noise.T
    gram.diagonal().add_(1.0)
    numerator = torch.randn(out, size, generator=gen, dtype=torch.float64)
    return gram.to(device), numerator.to(device)


def solve_seconds(size: int, out: int, device: str, repeats: int) -> float:
    """Fastest wall time of ``solve_least_squares`` on one system (synchronised on the GPU)."""
    gram, numerator = system(size, out, device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        solution, ridged = solve_least_squares(numerator, gram)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        if ridged or not torch.isfinite(solution).all():
            raise RuntimeError(f"the {size}² test system needed a ridge or gave non-finite values")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4096,11008", help="comma-separated input widths (Gram sizes)")
    parser.add_argument("--out", type=int, default=4096, help="output rows of the linear map (7B: 4096)")
    parser.add_argument("--repeats", type=int, default=1, help="timed solves per system; the fastest counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    logger.info("torch threads: %d; CUDA: %s", torch.get_num_threads(), torch.cuda.is_available())
    print(f"{'system':<14} {'device':<6} {'solve':>10}")
    for size in sizes:
        for device in devices:
            print(f"{f'{size}x{size}':<14} {device:<6} {solve_seconds(size, args.out, device, args.repeats):>9.3f}s")
    if "cuda" not in devices:
        print("no GPU")


if __name__ == "__main__":
    main()
