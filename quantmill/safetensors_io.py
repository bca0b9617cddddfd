"""Safetensors files read and written without the library: headers, dtypes, single tensors, raw byte ranges (core).

A file is an 8-byte little-endian header length, a JSON header (`__metadata__` plus, per tensor, dtype, shape and
`data_offsets` relative to the data section), then the data section. The merge streams tensors through these
functions; the plan, the model summary and the integrity checks read headers only.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from quantmill.errors import QuantmillError

# safetensors dtype -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8), "F8_E8M0": ("float8_e8m0fnu", 1),
    "F4": ("float4_e2m1fn_x2", 1),
}
DTYPE_BYTES: dict[str, int] = {k: size for k, (_, size) in DTYPES.items()}
TORCH_DTYPE: dict[str, str] = {k: name for k, (name, _) in DTYPES.items()}
LENGTH = struct.Struct("<Q")  # the header length prefix
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
CHUNK = 16 << 20  # bytes copied at a time when the kernel cannot copy a range


def damaged(field: str, path: Path, what: str) -> QuantmillError:
    """The one-line error for a file that does not hold what its header says."""
    return QuantmillError(f"{field}: {path} is damaged ({what}); copy or download the file again")


def header_length(fh: BinaryIO) -> int:
    """The header length prefix at the file's current position (its start)."""
    return LENGTH.unpack(fh.read(LENGTH.size))[0]


def read_header(path: Path) -> tuple[bytes, dict[str, Any], int]:
    """(raw header bytes, parsed header, offset of the data section) of one safetensors file."""
    with open(path, "rb") as fh:
        raw = fh.read(header_length(fh))
    return raw, json.loads(raw), LENGTH.size + len(raw)


def write_header(fh: BinaryIO, raw: bytes) -> None:
    """Write a header (its length prefix, then its bytes) at the file's current position."""
    fh.write(LENGTH.pack(len(raw)) + raw)


def tensor_entries(header: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Tensors of a header in data order."""
    return sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])


def num_params(path: Path) -> int:
    """Number of parameters in one .safetensors file, from its header only."""
    return sum(math.prod(info["shape"]) for _, info in tensor_entries(read_header(path)[1]))


def canonical_safetensors(path: Path) -> None:
    """Rewrite a .safetensors header with sorted keys, in place: safetensors writes `__metadata__` in a per-process
    random order, so identical tensors and metadata would give different bytes, digests and downstream cache keys."""
    with open(path, "r+b") as fh:
        size = header_length(fh)
        text = json.dumps(json.loads(fh.read(size)), sort_keys=True, separators=(",", ":")).encode()
        if len(text) <= size:  # same content, compact: never longer; padded with spaces as safetensors does
            fh.seek(LENGTH.size)
            fh.write(text + b" " * (size - len(text)))


def read_exact(fh: BinaryIO, buf: memoryview, field: str) -> None:
    """Fill `buf` from the file's current position; a short read names the file (never zeros in its place)."""
    got = 0
    while got < len(buf):
        n = fh.readinto(buf[got:])
        if not n:
            raise damaged(field, Path(fh.name), f"ended {len(buf) - got:,} bytes short of the tensor its header describes")
        got += n


def read_tensor(fh, start: int, info: dict):  # noqa: ANN001, ANN201 - file, torch.Tensor
    """One tensor read straight into a fresh buffer (no mmap, so only its bytes count towards RSS)."""
    import torch

    lo, hi = info["data_offsets"]
    buf = torch.empty(hi - lo, dtype=torch.uint8)
    fh.seek(start + lo)
    read_exact(fh, memoryview(buf.numpy()), "model.path")
    return buf.view(getattr(torch, TORCH_DTYPE[info["dtype"]])).reshape(info["shape"])


def write_tensor(out, t) -> None:  # noqa: ANN001 - file, torch.Tensor
    """Append a tensor's raw little-endian bytes."""
    import torch

    out.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))


def copy_range(src, dst, offset: int, count: int) -> None:  # noqa: ANN001 - binary files
    """Append `count` bytes of `src` at `offset` to `dst`: in the kernel (no user-space buffer) where it can."""
    dst.flush()
    try:
        while count > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
            if n <= 0:
                raise OSError("copy_file_range copied nothing")
            offset, count = offset + n, count - n
    except (OSError, AttributeError):  # another filesystem, an old kernel, not Linux
        src.seek(offset)
        for pos in range(0, count, CHUNK):
            buf = memoryview(bytearray(min(CHUNK, count - pos)))
            read_exact(src, buf, "model.path")
            dst.write(buf)
