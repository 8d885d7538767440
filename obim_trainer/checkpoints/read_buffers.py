"""Byte buffers for reading tensors, recycled from one tensor to the next.

Reading a tensor into fresh memory costs about five times the copy from the page cache: the
kernel maps and zeroes every new page on first touch. The engine reads each checkpoint's tensor
into a buffer of exactly its size that an earlier tensor of that size gave back (a model repeats
a handful of shapes), so that after the first decoder block reading costs only the copy.
A buffer that becomes a result (iterative merging returns the first checkpoint's tensor) is given
back once the result is written, or leaves with it (:meth:`ReadBuffers.keep`) when the writer keeps
its tensors. Memory: the buffers of the tensors in flight, per distinct size.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor


class ReadBuffers:
    """Lends uint8 buffers by exact size and takes them back; thread-safe (the engine reads on its own thread)."""

    def __init__(self) -> None:
        self._free: dict[int, list[Tensor]] = defaultdict(list)
        self._lent: dict[int, Tensor] = {}  # data pointer -> buffer
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Tensor:
        """A buffer of ``nbytes`` bytes: a returned one of that size, or a new one."""
        with self._lock:
            free = self._free.get(nbytes)
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._lent[buffer.data_ptr()] = buffer
        return buffer

    def lends(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` lives in a lent buffer (and will be overwritten once it is given back)."""
        with self._lock:
            return tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in self._lent

    def keep(self, tensor: Tensor) -> bool:
        """Let ``tensor``'s buffer go with it, never to be lent again (a result handed on); whether it was lent."""
        with self._lock:
            return tensor.device.type == "cpu" and self._lent.pop(tensor.untyped_storage().data_ptr(), None) is not None

    def give_back(self, tensors: Iterable[Tensor | None]) -> None:
        """Return the buffers behind ``tensors`` for reuse; tensors that were not lent are ignored.

        The caller must hold no other view of them: the next :meth:`take` of that size overwrites them.
        """
        with self._lock:
            for tensor in tensors:
                if tensor is None or tensor.device.type != "cpu":
                    continue
                buffer = self._lent.pop(tensor.untyped_storage().data_ptr(), None)
                if buffer is not None:
                    self._free[buffer.numel()].append(buffer)
