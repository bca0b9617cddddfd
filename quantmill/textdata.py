"""Read text from local .txt/.jsonl/.csv files or Hugging Face datasets; tokenize into windows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from quantmill.errors import NetworkError, QuantmillError
from quantmill.profile import TextSource


def read_documents(source: TextSource, field: str) -> list[str]:
    """The documents of a text source (one per line of jsonl/csv, one per blank-line block of txt)."""
    if source.path is not None:
        path = Path(source.path)
        if not path.is_file():
            raise QuantmillError(f"{field}.path: {path} does not exist; fix the path")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs = [d for d in path.read_text(encoding="utf-8").split("\n\n")]
        elif suffix == ".jsonl":
            docs = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise QuantmillError(f"{field}.path: {path} line {n}: invalid JSON ({exc.msg})") from None
                    if source.text_field not in row:
                        raise QuantmillError(f"{field}.text_field: {path} line {n} has no key {source.text_field!r}")
                    docs.append(str(row[source.text_field]))
        else:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if source.text_field not in (reader.fieldnames or []):
                    raise QuantmillError(
                        f"{field}.text_field: {path} has no column {source.text_field!r} "
                        f"(columns: {', '.join(reader.fieldnames or [])})"
                    )
                docs = [row[source.text_field] for row in reader]
    else:
        docs = _hub_documents(source, field)
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise QuantmillError(f"{field}: {source.label} contains no text; point at a non-empty source")
    return docs


def _hub_documents(source: TextSource, field: str) -> list[str]:
    """Documents from a hub dataset (needs network or the local datasets cache)."""
    try:
        import datasets
    except ImportError:
        raise QuantmillError(f"{field}.dataset: install the 'datasets' package to read hub datasets") from None
    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except (ConnectionError, OSError) as exc:
        raise NetworkError(f"{field}.dataset: cannot load {source.label} ({exc}); check network or use a local path") from None
    except ValueError as exc:
        raise QuantmillError(f"{field}.dataset: {source.label}: {str(exc).splitlines()[0]}") from None
    if source.text_field not in ds.column_names:
        raise QuantmillError(f"{field}.text_field: {source.label} has no column {source.text_field!r}")
    return list(ds[source.text_field])


def tokenize_stream(docs: list[str], tokenizer) -> torch.Tensor:  # noqa: ANN001 - any HF tokenizer
    """One 1-D token stream: documents joined with the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def draw_windows(stream: torch.Tensor, num: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num` non-overlapping windows of `seq_len` tokens, chosen with `seed`."""
    available = stream.numel() // seq_len
    if available < num:
        raise QuantmillError(
            f"calibration: the text has {stream.numel()} tokens, fewer than num_samples × seq_len = "
            f"{num} × {seq_len} = {num * seq_len}; add text or lower num_samples/seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=gen)[:num].sort().values * seq_len
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
