"""Turning user arrays (numpy, torch, sequences) into what the Rust core reads."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_torch_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def float_array(x: Any) -> np.ndarray:
    """``x`` (a numpy array, a torch tensor on any device, a sequence) as a
    C-contiguous numpy array for the Rust core, which checks its dtype and shape.

    Native float32 and float64 pass unchanged (or as a contiguous copy); every
    other float type (float16, bfloat16, non-native byte order, longdouble)
    becomes native float64, so no weight is ever narrowed. Other dtypes pass
    as they are, for the core to refuse by name.
    """
    if is_torch_tensor(x):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.is_floating_point() and x.dtype not in _torch_native_floats():
            x = x.double()
        x = x.numpy()
    else:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating) and x.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            x = x.astype(np.float64)
    return np.asarray(x, order="C")


def _torch_native_floats() -> tuple[Any, ...]:
    import torch

    return (torch.float32, torch.float64)
