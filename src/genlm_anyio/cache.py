"""genlm-backend's ``cache`` module: :class:`OutputCache`, a bounded LRU of tensors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import torch

from .checks import positive_int

__all__ = ["OutputCache"]


class OutputCache:
    """An LRU cache of at most ``maxsize`` tensors.

    With ``move_to_cpu=True`` a stored tensor is kept in host memory and goes back
    to the device it came from when it is read, so a GPU's memory holds none of it.

    Args:
        maxsize: the number of entries kept; storing one more drops the least
            recently used.
        move_to_cpu: keep the entries in host memory.
    """

    def __init__(self, maxsize: int, move_to_cpu: bool = False):
        self.maxsize = positive_int("maxsize", maxsize)
        self.move_to_cpu = move_to_cpu
        self.cache: OrderedDict[Hashable, tuple[torch.device, torch.Tensor]] = OrderedDict()

    def __getitem__(self, key: Hashable) -> torch.Tensor:
        device, value = self.cache[key]
        self.cache.move_to_end(key)
        return value.to(device) if self.move_to_cpu else value

    def __setitem__(self, key: Hashable, value: torch.Tensor) -> None:
        self.cache.pop(key, None)
        while len(self.cache) >= self.maxsize:
            self.cache.popitem(last=False)
        self.cache[key] = (value.device, value.cpu() if self.move_to_cpu else value)

    def __contains__(self, key: Any) -> bool:
        return key in self.cache

    def __len__(self) -> int:
        return len(self.cache)

    def clear(self) -> None:
        """Drop every entry."""
        self.cache.clear()
