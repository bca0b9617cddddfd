"""Accuracy: multiple-choice log-likelihood scoring of a labelled CSV, and lm-evaluation-harness tasks (core)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from quantmill.errors import QuantmillError
from quantmill.profile import Evaluation

log = logging.getLogger("quantmill.evaluate")


def read_examples(spec: Evaluation.Accuracy) -> list[tuple[str, list[str], int]]:
    """(question, choices, answer index) rows of the accuracy CSV."""
    path, f = Path(spec.path), "evaluation.accuracy"
    if not path.is_file():
        raise QuantmillError(f"{f}.path: {path} does not exist; fix the path")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = [spec.question_field, spec.answer_field] + ([] if spec.labels else [spec.choices_field])
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise QuantmillError(f"{f}: {path} has no column {missing[0]!r}; rename it or set the *_field option")
        rows = list(reader)[: spec.max_examples]
    examples = []
    for n, row in enumerate(rows, 2):
        choices = spec.labels or [c.strip() for c in row[spec.choices_field].split("|")]
        raw = row[spec.answer_field].strip()
        answer = int(raw) if raw.lstrip("-").isdigit() else (choices.index(raw) if raw in choices else -1)
        if not 0 <= answer < len(choices) or len(choices) < 2:
            raise QuantmillError(f"{f}.answer_field: {path} line {n}: answer {raw!r} is not a choice index or label")
        examples.append((row[spec.question_field], choices, answer))
    if not examples:
        raise QuantmillError(f"{f}.path: {path} has no examples; add labelled rows")
    return examples


def continuation(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
    """Token ids of the context and of ' choice' following it."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(f"{context} {choice}", add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx:
        cont = whole[len(ctx) :]
    else:
        cont = tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return ([start] if start is not None else []) + ctx, cont


@torch.no_grad()
def choice_accuracy(
    model, tokenizer, spec: Evaluation.Accuracy, device: str, batch_size: int = 16,  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
) -> dict[str, float]:
    """Accuracy of picking the choice with the highest log-likelihood given the question."""
    examples = read_examples(spec)
    pairs = [(e, continuation(tokenizer, q, c)) for e, (q, choices, _) in enumerate(examples) for c in choices]
    scores: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = [ctx + cont for _, (ctx, cont) in pairs[i : i + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (_, (ctx, cont)) in enumerate(pairs[i : i + batch_size]):
            lp = logits[row, len(ctx) - 1 : len(ctx) + len(cont) - 1].float().log_softmax(-1)
            scores.append(float(lp.gather(1, torch.tensor(cont, device=device)[:, None]).sum()))
    correct, j = 0, 0
    for _, choices, answer in examples:
        best = max(range(len(choices)), key=lambda c: scores[j + c])
        correct, j = correct + int(best == answer), j + len(choices)
    return {"accuracy": correct / len(examples), "accuracy_examples": float(len(examples))}


def lm_eval_scores(model, tokenizer, spec: Evaluation.LmEval, batch_size: int) -> dict[str, float]:  # noqa: ANN001 - a transformers model/tokenizer (imported lazily)
    """lm-evaluation-harness metrics, or {} with a logged reason when the package or task data is unavailable."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        log.warning("lm_eval tasks %s skipped: the lm_eval package is not installed (pip install lm-eval)", spec.tasks)
        return {}
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=spec.tasks, num_fewshot=spec.num_fewshot, limit=spec.limit)
    except Exception as exc:  # noqa: BLE001 - offline runs must not fail on optional benchmarks
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("lm_eval tasks %s skipped: %s", spec.tasks, why)
        return {}
    out = {}
    for name, metrics in (res or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                out[f"lm_eval.{name}.{key.replace(',none', '').replace(',', '_')}"] = float(value)
    return out
