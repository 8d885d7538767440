"""In which order the checkpoints claim positions of a tensor.

In iterative merging earlier models keep more of their task vector (the paper's Table 6:
"Math First" 40.93 vs "Math Last" 31.89). The default rotates the order by one per layer,
O^{l+1} = LR(O^l, 1), so that every checkpoint goes first in some blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from obim_trainer.errors import ConfigError

OrderMode = Literal["rotation", "given", "priority"]
ORDER_MODES: tuple[str, ...] = ("rotation", "given", "priority")


def merge_order(
    num_models: int,
    block_index: int | None,
    mode: OrderMode = "rotation",
    priority: Sequence[float] | None = None,
) -> list[int]:
    """Checkpoint indices in merge order for a tensor of decoder block ``block_index``.

    * ``rotation``: ``[0..K-1]`` rotated left by ``block_index`` (unrotated outside blocks);
    * ``given``: ``[0..K-1]`` everywhere;
    * ``priority``: by descending ``priority`` (one number per checkpoint), ties by index.
    """
    given = list(range(num_models))
    if mode == "given":
        return given
    if mode == "rotation":
        shift = (block_index or 0) % num_models if num_models else 0
        return given[shift:] + given[:shift]
    if mode == "priority":
        if priority is None or len(priority) != num_models:
            raise ConfigError(
                f"order 'priority' needs one priority per checkpoint ({num_models}), got {priority}; "
                "pass e.g. --priority 3 2 1"
            )
        return sorted(given, key=lambda k: (-priority[k], k))
    raise ConfigError(f"unknown merge order {mode!r}; choose one of {', '.join(ORDER_MODES)}")
