"""Text from local .txt/.jsonl/.csv files or Hugging Face datasets, prepared the way the field does it.

* A .txt file is one document, read as it is.
* Rows (.jsonl/.csv lines, dataset rows) are joined with "\\n\\n" and the result is tokenized once (the GPTQ/AWQ
  papers' wikitext-2 protocol: `tokenizer("\\n\\n".join(rows))`), or with `join: eos` each non-empty row is tokenized
  on its own and followed by the end-of-sequence token.
* Chat rows (`messages_field`) are rendered with the tokenizer's chat template first.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from quantmill.errors import NetworkError, QuantmillError
from quantmill.profile import TextSource

SHUFFLE_BUFFER = 10_000  # rows a streamed dataset is shuffled within


def _jsonl_rows(path: Path, field: str, key: str, which: str) -> Iterator[Any]:
    """The `key` value of every non-blank line of a .jsonl file."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantmillError(f"{field}.path: {path} line {n}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or key not in row:
                raise QuantmillError(f"{field}.{which}: {path} line {n} has no key {key!r}")
            yield row[key]


def _csv_rows(path: Path, field: str, key: str, which: str) -> Iterator[str]:
    """The `key` column of every row of a .csv file."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if key not in (reader.fieldnames or []):
            raise QuantmillError(
                f"{field}.{which}: {path} has no column {key!r} (columns: {', '.join(reader.fieldnames or [])})"
            )
        for row in reader:
            yield row[key]


def _hub_rows(source: TextSource, field: str, key: str, which: str, seed: int | None) -> Iterable[Any]:
    """Rows of a hub dataset (streamed when asked), shuffled with `seed` when given; never all held in memory."""
    try:
        import datasets
    except ImportError:
        raise QuantmillError(f"{field}.dataset: install the 'datasets' package to read hub datasets") from None
    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split, data_files=source.data_files,
                                   revision=source.revision, streaming=source.streaming)
    except (ConnectionError, OSError) as exc:
        raise NetworkError(f"{field}.dataset: cannot load {source.label} ({exc}); check network or use a local path") from None
    except ValueError as exc:
        raise QuantmillError(f"{field}.dataset: {source.label}: {str(exc).splitlines()[0]}") from None
    columns = ds.column_names or list(ds.features or [])
    if columns and key not in columns:
        raise QuantmillError(f"{field}.{which}: {source.label} has no column {key!r} (columns: {', '.join(columns)})")
    if seed is not None:
        ds = ds.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER) if source.streaming else ds.shuffle(seed=seed)
    return (row[key] for row in ds)


def iter_rows(source: TextSource, field: str, seed: int | None = None) -> Iterable[Any]:
    """The raw rows of a source in order (or shuffled with `seed`): strings, or message lists for chat data."""
    key = source.messages_field or source.text_field
    which = "messages_field" if source.messages_field else "text_field"
    if source.path is None:
        return _hub_rows(source, field, key, which, seed)
    path = Path(source.path)
    if not path.is_file():
        raise QuantmillError(f"{field}.path: {path} does not exist; fix the path")
    if source.is_one_document:
        return [path.read_text(encoding="utf-8")]
    read = _jsonl_rows if path.suffix.lower() == ".jsonl" else _csv_rows
    rows = list(read(path, field, key, which))
    if seed is not None:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = [rows[i] for i in order]
    return rows


def renderer(source: TextSource, tokenizer, field: str):  # noqa: ANN001, ANN201 - HF tokenizer; row -> text
    """Row -> text: as is, or a message list through the tokenizer's chat template."""
    if source.messages_field is None:
        return lambda row: "" if row is None else str(row)
    if not getattr(tokenizer, "chat_template", None):
        raise QuantmillError(
            f"{field}.messages_field: the model's tokenizer has no chat template to render {source.messages_field!r}; "
            "use text_field with plain text, or a model whose tokenizer_config.json has a chat_template"
        )

    def render(row: Any) -> str:
        if not isinstance(row, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in row):
            raise QuantmillError(f"{field}.messages_field: {source.label}: a row's {source.messages_field!r} is not a "
                                 "list of {role, content} messages")
        return tokenizer.apply_chat_template(row, tokenize=False)

    return render


def encode(tokenizer, text: str, special: bool) -> list[int]:  # noqa: ANN001 - a transformers tokenizer (imported lazily)
    """Token ids of `text` (`special`: with the tokenizer's own BOS/EOS additions, as `tokenizer(text)` does)."""
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def token_stream(source: TextSource, field: str, tokenizer, max_tokens: int | None = None,  # noqa: ANN001 - a transformers tokenizer (imported lazily)
                 seed: int | None = None) -> torch.Tensor:
    """One 1-D token stream prepared as the source says (joined + tokenized once, or EOS-packed), cut to max_tokens.

    Hub datasets are read only until the stream is long enough (rows counted one by one, then joined and tokenized
    once); local files are read whole.
    """
    render = renderer(source, tokenizer, field)
    rows = (render(row) for row in iter_rows(source, field, seed))
    if source.path is None and max_tokens is not None:
        rows = _enough(rows, tokenizer, max_tokens)
    if source.join == "eos":
        eos, ids = tokenizer.eos_token_id, []
        for doc in rows:
            if doc.strip():
                ids.extend(encode(tokenizer, doc.strip(), special=False) + ([eos] if eos is not None else []))
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    else:
        text = "\n\n".join(rows)
        ids = encode(tokenizer, text, special=source.messages_field is None) if text.strip() else []
    if not ids:
        raise QuantmillError(f"{field}: {source.label} contains no text; point at a non-empty source")
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def _enough(rows: Iterator[str], tokenizer, max_tokens: int) -> list[str]:  # noqa: ANN001 - a transformers tokenizer (imported lazily)
    """Rows from the start of `rows` until they hold more than `max_tokens` tokens (plus one row of margin)."""
    out, count = [], 0
    for row in rows:
        out.append(row)
        if count > max_tokens:
            break
        count += len(encode(tokenizer, row, special=False)) + 1
    return out


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


def draw_samples(source: TextSource, field: str, tokenizer, num: int, seq_len: int,  # noqa: ANN001 - a transformers tokenizer (imported lazily)
                 seed: int) -> dict[str, torch.Tensor]:
    """`num` rows (shuffled with `seed`), each tokenized and truncated to `seq_len`: right-padded ids + attention mask."""
    render = renderer(source, tokenizer, field)
    special = source.messages_field is None  # a chat template writes its own special tokens
    texts = (render(row) for row in iter_rows(source, field, seed))
    rows = list(itertools.islice((encode(tokenizer, t, special)[:seq_len] for t in texts if t.strip()), num))
    if len(rows) < num:
        raise QuantmillError(f"{field.rsplit('.', 1)[0]}.num_samples: {source.label} has {len(rows)} non-empty rows, "
                             f"fewer than num_samples = {num}; lower num_samples or add rows")
    width = max(len(r) for r in rows)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    ids = torch.full((num, width), pad, dtype=torch.long)
    mask = torch.zeros((num, width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
    return {"input_ids": ids, "attention_mask": mask}
