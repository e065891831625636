"""Turning user arrays (numpy, torch, sequences) into what the Rust core reads."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def float_array(x: Any, name: str, ndim: int, width: int) -> np.ndarray:
    """``x`` as a C-contiguous float32/float64 array of shape (..., width) with ``ndim`` dims.

    Accepts numpy arrays and torch tensors of any float dtype. Native float32
    is kept; every other float type (float16, bfloat16, non-native byte order,
    longdouble) becomes native float64, so no weight is ever narrowed. Raises
    TypeError for non-float data and ValueError for a wrong shape, naming ``name``.
    """
    if is_torch_tensor(x):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if not x.is_floating_point():
            raise TypeError(f"{name} must hold floats, not {x.dtype}")
        if x.dtype not in _torch_native_floats():
            x = x.double()
        x = x.numpy()
    else:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must hold floats, not {x.dtype}")
        if x.dtype != np.dtype(np.float32) and x.dtype != np.dtype(np.float64):
            x = x.astype(np.float64)
    if x.ndim != ndim or x.shape[-1] != width:
        want = f"({width},)" if ndim == 1 else f"(B, {width})"
        raise ValueError(f"{name} must have shape {want}, not {tuple(x.shape)}")
    return np.ascontiguousarray(x)


def address(arr: np.ndarray) -> int:
    """The data address of a C-contiguous array, for the Rust core (the caller keeps ``arr`` alive)."""
    return arr.__array_interface__["data"][0]


def _torch_native_floats() -> tuple[Any, ...]:
    import torch

    return (torch.float32, torch.float64)
