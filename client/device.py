"""Where a client trains and in which precision: CPU or CUDA, fp32 or autocast.

Everything here is decided from what the process can see (``torch.cuda``), so the
logic is testable without a GPU; the tests patch ``torch.cuda`` to play one.

Privacy note on autocast (Opacus 1.6, hooks mode): under ``torch.autocast`` the
forward pass and the backward activations run in bf16/fp16, so Opacus computes the
per-example gradients and their norms in that precision; it casts them up to fp32
before clipping and summing, and the noise is added in fp32 to fp32 parameters.
The per-example norm used for clipping therefore carries a relative rounding error
(about 2^-8 for bf16, 2^-11 for fp16): a clipped gradient may exceed C by that
factor. fp32 (the default) has no such caveat; ``auto`` picks bf16 only on a CUDA
device that supports it. fp16 without a gradient scaler risks underflow: prefer bf16.
"""

from __future__ import annotations

import contextlib
import gc
import logging

import torch

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str | None) -> torch.device:
    """``auto`` → the first CUDA device if one is visible, else CPU; ``cuda`` must exist."""
    name = (name or "auto").strip().lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={name} was asked for, but no CUDA device is visible to this process "
            "(check the driver and CUDA_VISIBLE_DEVICES, or use device=auto or cpu)"
        )
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str | None) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    Autocast is used on CUDA only: on CPU, bf16 matmuls are rarely faster and the
    rounding caveat (module docstring) would buy nothing.
    """
    precision = (precision or "fp32").lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        if precision in _DTYPES and device.type != "cuda":
            log.info("precision=%s ignored on %s: training in fp32", precision, device)
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("precision=bf16 but this GPU does not support bf16; use fp16 or fp32")
    return _DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context for the forward pass and loss: autocast when ``dtype`` is set."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def release_memory() -> None:
    """Give cached GPU memory back between rounds (the process may idle for minutes).

    Only when this process ever used CUDA: a full ``gc.collect()`` walks every object
    of a process that has imported torch, transformers and opacus (0.36 s per message
    measured in a simulation actor, more than a tiny_bert client round itself), and on
    CPU there is no cache to give back; CPython frees the round's tensors by reference
    counting and its own collector handles cycles as usual.
    """
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    gc.collect()  # cyclic garbage may still hold CUDA tensors the cache cannot release
    torch.cuda.empty_cache()
