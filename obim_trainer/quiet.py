"""Warnings and log lines a user cannot act on, hidden only where this project causes or answers them.

* DeepSpeed's ZeRO collectives call ``torch.distributed.all_gather_into_tensor`` and
  ``reduce_scatter_tensor``, which torch deprecates with a ``FutureWarning`` at every call: thousands of
  lines in a ZeRO-3 log, about DeepSpeed's code. :func:`deepspeed_deprecations_hidden` hides exactly
  those, around the callback's own gathers; :func:`hide_deepspeed_deprecations` does it for a whole
  training script (the example's choice, for the Trainer's steps too).
* Under ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``, transformers says at every save
  to "use zero_to_fp32.py to recover weights"; when the callback (or the example) writes the weights
  into the same folder right after, the advice is wrong. :func:`zero_to_fp32_advice_hidden` drops that
  line while they do.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

DEEPSPEED_DEPRECATIONS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
ZERO_TO_FP32_ADVICE = "zero_to_fp32.py to recover weights"
TRAINER_LOGGER = "transformers.trainer"


def hide_deepspeed_deprecations() -> None:
    """For the whole process: hide torch's deprecation warnings about the collectives DeepSpeed calls."""
    warnings.filterwarnings("ignore", message=DEEPSPEED_DEPRECATIONS, category=FutureWarning)


@contextmanager
def deepspeed_deprecations_hidden() -> Iterator[None]:
    """Inside: :func:`hide_deepspeed_deprecations`; the warning filters are restored on leaving."""
    with warnings.catch_warnings():
        hide_deepspeed_deprecations()
        yield


class _DropLine(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class ZeroToFp32AdviceHidden:
    """Drops transformers' "use zero_to_fp32.py" line from the Trainer's log between :meth:`start` and
    :meth:`stop` (the callback's training: it writes each checkpoint's weights itself)."""

    def __init__(self) -> None:
        self._filter = _DropLine(ZERO_TO_FP32_ADVICE)

    def start(self) -> None:
        logging.getLogger(TRAINER_LOGGER).addFilter(self._filter)

    def stop(self) -> None:
        logging.getLogger(TRAINER_LOGGER).removeFilter(self._filter)


@contextmanager
def zero_to_fp32_advice_hidden() -> Iterator[None]:
    """Inside, the Trainer's "use zero_to_fp32.py" line is dropped (a save whose weights we write next)."""
    hidden = ZeroToFp32AdviceHidden()
    hidden.start()
    try:
        yield
    finally:
        hidden.stop()
