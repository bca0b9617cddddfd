"""Integrity at the boundary: safetensors files checked against their headers, exact reads, tokenizer files.

A damaged input must fail with one line naming the file, before anything is computed (or cached) from it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

from quantmill.errors import QuantmillError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 1}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# A transformers tokenizer needs one of these sets of files (fast tokenizer, sentencepiece, BPE vocab + merges).
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("tiktoken.model",),
                  ("vocab.txt",))


def _damaged(field: str, path: Path, what: str) -> QuantmillError:
    return QuantmillError(f"{field}: {path} is damaged ({what}); copy or download the file again")


def check_safetensors(path: Path, field: str) -> None:
    """The file holds exactly what its header describes: every tensor's bytes, nothing missing or left over."""
    size = path.stat().st_size
    if size < 8:
        raise _damaged(field, path, f"{size} bytes, shorter than a safetensors header")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise _damaged(field, path, f"header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise _damaged(field, path, "its header is not valid JSON") from None
    data = size - 8 - n
    end = 0
    for name, info in header.items() if isinstance(header, dict) else ():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            want = DTYPE_BYTES.get(info["dtype"], 0) * math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise _damaged(field, path, f"tensor {name} has no valid dtype/shape/data_offsets") from None
        if want and hi - lo != want:
            raise _damaged(field, path, f"tensor {name} spans {hi - lo} bytes, its shape needs {want}")
        end = max(end, hi)
    if end != data:
        raise _damaged(field, path, f"the header describes {end:,} bytes of tensor data, the file holds {data:,}: "
                                    f"{'truncated' if end > data else 'trailing bytes'}")


def check_folder_safetensors(folder: Path, field: str) -> None:
    """Every *.safetensors file of a folder (recursively) checked against its header."""
    for f in sorted(Path(folder).rglob("*.safetensors")):
        check_safetensors(f, field)


def read_exact(fh: BinaryIO, buf: memoryview, field: str) -> None:
    """Fill `buf` from the file's current position; a short read names the file (never zeros in its place)."""
    got = 0
    while got < len(buf):
        n = fh.readinto(buf[got:])
        if not n:
            raise _damaged(field, Path(fh.name), f"ended {len(buf) - got:,} bytes short of the tensor its header describes")
        got += n


def tokenizer_problem(folder: Path) -> str | None:
    """None when the folder has tokenizer files transformers can load, else what is expected."""
    if any(all((folder / f).is_file() for f in files) for files in TOKENIZER_SETS):
        return None
    return "no tokenizer files (expected tokenizer.json, or tokenizer.model, or vocab.json + merges.txt)"


def check_tokenizer(folder: Path, field: str) -> None:
    """Refuse a model folder without tokenizer files, listing what is expected."""
    problem = tokenizer_problem(folder)
    if problem:
        raise QuantmillError(f"{field}: {folder} has {problem}; copy the tokenizer files next to config.json")
