"""The compute device: which one to use and its human name (core, torch)."""

from __future__ import annotations

import torch


def pick_device() -> str:
    """'cuda' when a GPU is present, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """Human name of the device timings were taken on."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu, {torch.get_num_threads()} thread(s)"
