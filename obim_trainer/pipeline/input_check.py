"""The engine's check that an input tensor holds no NaN or Inf, which would poison every merge rule.

Every input tensor is checked once, on the engine's reading thread while the previous tensor merges.
The native library tests each value's exponent bits in one single-threaded pass at memory speed.
Without it, torch sums the tensor (NaN/Inf propagate into the sum, and only a suspicious sum pays
for the exact elementwise test); that sum is multi-threaded, and on a small machine the OpenMP
threads it wakes then spin on the cores the merge needs (0.3–0.4 s of a 2 s merge on a 2-core CI machine).
"""

from __future__ import annotations

import torch
from torch import Tensor

from obim_trainer.checkpoints import CheckpointReader
from obim_trainer.errors import CheckpointError
from obim_trainer.merging.native_library import native_library

_EXPONENT_BITS = {
    torch.bfloat16: 0x7F80,
    torch.float16: 0x7C00,
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
}
"""Each dtype's exponent field: a value is Inf or NaN when every bit of it is set."""


def all_finite(tensor: Tensor) -> bool:
    """Whether the floating-point ``tensor`` holds no NaN and no Inf."""
    library = native_library()
    exponent = _EXPONENT_BITS.get(tensor.dtype)
    if library is not None and exponent is not None and tensor.device.type == "cpu" and tensor.is_contiguous():
        return library.obim_all_finite(tensor.data_ptr(), tensor.numel(), tensor.element_size(), exponent) == 1
    # the sum stays in the stored dtype (accumulated in float32 inside): asking for a float32 result is 10x slower
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_finite(tensor: Tensor, name: str, reader: CheckpointReader) -> Tensor:
    """``tensor`` if it holds no NaN/Inf (or is not floating-point), else a :class:`CheckpointError` naming the file."""
    if tensor.is_floating_point() and not all_finite(tensor):
        raise CheckpointError(
            f"tensor {name} in {reader.tensor_infos()[name].file} contains NaN or Inf. The checkpoint is "
            "broken (diverged training?); leave it out of the merge."
        )
    return tensor
