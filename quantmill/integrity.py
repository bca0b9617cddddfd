"""Integrity at the boundary: safetensors files checked against their headers, tokenizer files.

A damaged input must fail with one line naming the file, before anything is computed (or cached) from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantmill.errors import QuantmillError
from quantmill.safetensors_io import DTYPE_BYTES, LENGTH, MAX_HEADER, damaged, header_length

# A transformers tokenizer needs one of these sets of files (fast tokenizer, sentencepiece, BPE vocab + merges).
TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("tiktoken.model",),
                  ("vocab.txt",))


def check_safetensors(path: Path, field: str) -> None:
    """The file holds exactly what its header describes: every tensor's bytes, nothing missing or left over."""
    size = path.stat().st_size
    if size < LENGTH.size:
        raise damaged(field, path, f"{size} bytes, shorter than a safetensors header")
    with open(path, "rb") as fh:
        n = header_length(fh)
        if n > min(MAX_HEADER, size - LENGTH.size):
            raise damaged(field, path, f"header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise damaged(field, path, "its header is not valid JSON") from None
    data = size - LENGTH.size - n
    end = 0
    for name, info in header.items() if isinstance(header, dict) else ():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            want = DTYPE_BYTES.get(info["dtype"], 0) * math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise damaged(field, path, f"tensor {name} has no valid dtype/shape/data_offsets") from None
        if want and hi - lo != want:
            raise damaged(field, path, f"tensor {name} spans {hi - lo} bytes, its shape needs {want}")
        end = max(end, hi)
    if end != data:
        raise damaged(field, path, f"the header describes {end:,} bytes of tensor data, the file holds {data:,}: "
                                    f"{'truncated' if end > data else 'trailing bytes'}")


def check_folder_safetensors(folder: Path, field: str) -> None:
    """Every *.safetensors file of a folder (recursively) checked against its header."""
    for f in sorted(Path(folder).rglob("*.safetensors")):
        check_safetensors(f, field)


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
