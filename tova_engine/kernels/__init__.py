"""Triton kernels for the CUDA path. Nothing here is imported on CPU: callers check
`triton_available()` first and import the kernel modules lazily."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available(device: torch.device) -> bool:
    """Triton kernels can run on `device`: a CUDA device with Triton installed, or any
    device under Triton's CPU interpreter (TRITON_INTERPRET=1, for development)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
