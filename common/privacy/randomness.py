"""Randomness for privacy mechanisms: generators seeded from the OS, never from ``seed``.

DP noise must not be reproducible from the published config: ``seed`` governs splits
and initialisation only. No CSPRNG is available (torchcsprng does not install), so
the mechanisms draw from torch generators seeded with 63 bits of ``os.urandom``.
"""

from __future__ import annotations

import os

import torch


def urandom_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS, never from the config seed."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return gen
