"""Free resources of this machine: available RAM, free VRAM, free disk under the store root (core)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    """Free resources of this machine."""

    ram: int
    vram: int
    disk: int
    cuda: bool


def this_machine(store_root: str | Path = ".") -> Machine:
    """Available RAM, free VRAM (0 without CUDA) and free disk under the store root."""
    import psutil
    import torch

    from quantmill import state

    path = Path(store_root) if "://" not in str(store_root) else state.home()  # URL stores build in a local cache
    while not path.exists():
        path = path.parent
    cuda = torch.cuda.is_available()
    vram = torch.cuda.mem_get_info()[0] if cuda else 0
    return Machine(psutil.virtual_memory().available, vram, shutil.disk_usage(path).free, cuda)
