"""In which order the checkpoints claim the positions of a tensor.

In iterative merging (Algorithm 1) a checkpoint merged earlier chooses among more free
positions, so it keeps more of what matters to it: the paper's Table 6 has "Math First" at
40.93 and "Math Last" at 31.89. The default spreads that advantage over the model by rotating
the order left by one per layer, O^{l+1} = LR(O^l, 1), so every checkpoint goes first in some
decoder blocks. A fixed order and an explicit per-checkpoint priority are the alternatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

from obim_trainer.errors import ConfigError

OrderMode = Literal["rotation", "given", "priority"]
ORDER_MODES: tuple[str, ...] = get_args(OrderMode)


def merge_order(
    num_models: int,
    block_index: int | None,
    mode: OrderMode = "rotation",
    priority: Sequence[float] | None = None,
) -> list[int]:
    """Checkpoint indices in merge order for a tensor of decoder block ``block_index``.

    * ``rotation``: ``[0..K-1]`` rotated left by ``block_index`` mod K; unrotated outside blocks;
    * ``given``: ``[0..K-1]`` everywhere;
    * ``priority``: by descending ``priority`` (one number per checkpoint), ties by index.

    Raises:
        ConfigError: no checkpoints, an unknown mode, or ``priority`` missing, of the wrong
            length, not finite, or given with another mode.
    """
    if num_models < 1:
        raise ConfigError(f"a merge order needs at least one checkpoint, got {num_models}")
    if mode not in ORDER_MODES:
        raise ConfigError(f"unknown merge order {mode!r}; choose one of {', '.join(ORDER_MODES)}")
    if mode != "priority" and priority is not None:
        raise ConfigError(
            f"priority {list(priority)} is only used with order 'priority'; set order: priority or drop it"
        )
    given = list(range(num_models))
    if mode == "given":
        return given
    if mode == "rotation":
        shift = (block_index or 0) % num_models
        return given[shift:] + given[:shift]
    if priority is None or len(priority) != num_models or not all(math.isfinite(p) for p in priority):
        shown = None if priority is None else list(priority)
        raise ConfigError(
            f"order 'priority' needs one finite priority per checkpoint ({num_models}), got {shown}; "
            "higher goes first, e.g. priority: [3, 2, 1]"
        )
    return sorted(given, key=lambda k: (-priority[k], k))
