"""Run profiles: the strict sections of a profile (model, calibration, evaluation, registry, storage, merge) and the
whole `Profile`; recipes and the sweep grid are quantmill.recipes, YAML loading and `--set` overrides
quantmill.profile_io."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from quantmill.recipes import Recipe, Sweep
from quantmill.schema_base import Strict, expand, form_fields, recipes_or_grid

HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Source(Strict):
    """A Hugging Face repo id at a pinned revision, or a local directory."""

    model_config = ConfigDict(json_schema_extra=lambda schema: form_fields(schema, plain=("path",)))

    repo_id: str | None = Field(None, description="Hugging Face repo id 'owner/name' (instead of `path`)")
    revision: str | None = Field(None, description="Commit sha or tag of `repo_id`, pinned for reproducible runs")
    path: str | None = Field(None, description="Local model directory (instead of `repo_id`); ${VARS} and ~ expand")
    allow_pickle: bool = Field(False, description="Allow pickle (.bin) weights; by default only safetensors load")
    trust_remote_code: bool = Field(False, description="Run the model repo's own Python code (only for trusted repos)")

    @model_validator(mode="after")
    def _one_of(self) -> Source:
        if (self.repo_id is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo_id' (Hugging Face) or 'path' (local directory)")
        if self.repo_id is not None:
            if not HF_REPO.match(self.repo_id):
                raise ValueError(f"repo_id {self.repo_id!r} is not of the form 'owner/name'")
            if not self.revision:
                raise ValueError("a hub model needs a pinned 'revision' (commit sha or tag) for reproducible runs")
        if self.path is not None:
            self.path = expand(self.path)
        return self

    @property
    def label(self) -> str:
        """Human-readable origin."""
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.path)


class TextSource(Strict):
    """Text from a local .txt/.jsonl/.csv file or a Hugging Face dataset, and how it becomes one token stream.

    A .txt file is one document, read as it is. Rows (.jsonl/.csv lines, dataset rows) are joined with a blank line
    (`join: blank_line`, the "\\n\\n".join(rows) of the GPTQ/AWQ papers' wikitext-2 protocol) and tokenized once;
    `join: eos` tokenizes each non-empty row on its own and ends it with the end-of-sequence token (corpora of separate
    documents). `messages_field` names a list of {role, content} messages per row, rendered with the model's chat
    template (`tokenizer.apply_chat_template`) instead of reading `text_field`.
    """

    model_config = ConfigDict(json_schema_extra=lambda schema: form_fields(schema, plain=("path",)))

    path: str | None = Field(None, description="Local .txt/.jsonl/.csv file (instead of `dataset`); ${VARS}, ~ expand")
    dataset: str | None = Field(None, description="Hugging Face dataset name (instead of `path`)")
    config: str | None = Field(None, description="Dataset configuration name, if the dataset has several")
    split: str = Field("train", description="Dataset split to read")
    text_field: str = Field("text", description="Column holding the text (.jsonl/.csv files and datasets)")
    messages_field: str | None = Field(
        None, description="Column holding a list of {role, content} messages, rendered with the chat template")
    join: Literal["blank_line", "eos"] = Field(
        "blank_line", description='How rows become one text: joined with "\\n\\n" and tokenized once, or each + EOS')
    data_files: str | list[str] | None = Field(None, description="Files of the dataset to read (hub datasets only)")
    revision: str | None = Field(None, description="Commit sha or tag of the dataset, pinned like models")
    streaming: bool = Field(False, description="Stream the dataset instead of downloading all of it")

    @model_validator(mode="after")
    def _one_of(self) -> TextSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (local .txt/.jsonl/.csv) or 'dataset' (hub dataset name)")
        if self.path is not None:
            self.path = expand(self.path)
            suffix = Path(self.path).suffix.lower()
            if suffix not in {".txt", ".jsonl", ".csv"}:
                raise ValueError(f"path {self.path!r}: use a .txt, .jsonl or .csv file")
            hub_only = [k for k in ("data_files", "revision") if getattr(self, k) is not None] + (["streaming"] if self.streaming else [])
            if hub_only:
                raise ValueError(f"{hub_only[0]} applies to hub datasets ('dataset'), not to a local 'path'")
            if self.messages_field is not None and suffix != ".jsonl":
                raise ValueError(f"messages_field needs rows holding message lists: use a .jsonl file or a dataset, not {suffix}")
        return self

    @property
    def label(self) -> str:
        """Human-readable origin."""
        if self.path:
            return self.path
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.dataset}{at}/{self.config or ''}:{self.split}[{self.messages_field or self.text_field}]"

    @property
    def is_one_document(self) -> bool:
        """A .txt file: one document, read as it is."""
        return bool(self.path) and Path(self.path).suffix.lower() == ".txt"

    @property
    def preparation(self) -> str:
        """How the text becomes tokens, in words (recorded with calibration and evaluation data)."""
        text = f"chat template over {self.messages_field!r}" if self.messages_field else "text"
        if self.is_one_document:
            return "one document read as is, tokenized once"
        if self.join == "eos":
            return f"rows ({text}) tokenized one by one, each followed by EOS"
        return f'rows ({text}) joined with "\\n\\n", tokenized once'


class Calibration(Strict):
    """How calibration data is drawn.

    `mode: packed` cuts `num_samples` non-overlapping windows of `seq_len` tokens (seeded) from the prepared stream;
    `mode: samples` takes `num_samples` rows (shuffled with `seed`), each truncated to `seq_len`, shorter ones kept
    as they are (padded, with attention masks). Chat data (`source.messages_field`) defaults to samples.
    """

    source: TextSource = Field(description="Where the calibration text comes from")
    num_samples: int = Field(64, gt=0, le=100_000, description="Calibration windows (or samples) drawn from the text")
    seq_len: int = Field(128, gt=0, description="Tokens per calibration window (at most, per sample)")
    seed: int = Field(0, description="Random seed of the window draw or sample shuffle (same seed, same data)")
    mode: Literal["packed", "samples"] | None = Field(
        None, description="packed: windows of the joined text; samples: one row each, masked (default for chat data)")

    @model_validator(mode="after")
    def _mode(self) -> Calibration:
        if self.mode is None:
            self.mode = "samples" if self.source.messages_field else "packed"
        if self.mode == "samples" and self.source.is_one_document:
            raise ValueError("mode 'samples' needs separate documents (.jsonl, .csv or a dataset); "
                             "a .txt file is one document: use mode 'packed'")
        return self


class Gates(Strict):
    """Quality gates; unset bounds use per-method defaults (perplexity) or are not checked."""

    max_ppl_increase_pct: float | None = Field(None, ge=0, description="Max perplexity increase, % (default by method)")
    max_kl: float | None = Field(None, ge=0, description="Max mean KL divergence from the baseline")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="Min top-1 agreement with the baseline")
    max_size_bytes: int | None = Field(None, gt=0, description="Max checkpoint size in bytes")
    min_compression: float | None = Field(None, gt=0, description="Min size ratio baseline / variant")
    max_latency_ms_p50: float | None = Field(None, gt=0, description="Max median per-token generation latency, ms")
    max_latency_ms_p95: float | None = Field(None, gt=0, description="Max p95 per-token generation latency, ms")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="Max accuracy drop from the baseline (0..1)")


class Evaluation(Strict):
    """Held-out evaluation text, what is measured besides perplexity, and gates."""

    class Speed(Strict):
        """Generation-speed measurement (greedy decoding of prompts cut from the eval windows)."""

        enabled: bool = Field(True, description="Measure generation speed")
        batch_sizes: list[int] = Field([1, 8], min_length=1, description="Batch sizes measured")
        prompt_tokens: int = Field(32, gt=0, description="Prompt length in tokens")
        new_tokens: int = Field(32, gt=1, description="Tokens generated per prompt")
        warmup: int = Field(1, ge=0, description="Untimed warm-up generations")
        repeats: int = Field(3, gt=0, description="Timed repetitions per batch size")

        @field_validator("batch_sizes")
        @classmethod
        def _positive(cls, v: list[int]) -> list[int]:
            if any(b < 1 for b in v):
                raise ValueError("batch sizes must be positive integers, e.g. [1, 8]")
            return sorted(set(v))

    class Accuracy(Strict):
        """Labelled examples in a CSV, scored by the log-likelihood of each choice."""

        path: str = Field(description="CSV file of labelled examples; ${VARS} and ~ expand")
        question_field: str = Field("question", description="Column holding the question")
        choices_field: str = Field("choices", description="Column holding the choices")
        answer_field: str = Field("answer", description="Column holding the correct answer")
        labels: list[str] | None = Field(None, min_length=2, description="Choice labels, e.g. [A, B, C, D]")
        max_examples: int = Field(1000, gt=0, description="Examples scored at most")

        @field_validator("path")
        @classmethod
        def _csv(cls, v: str) -> str:
            v = expand(v)
            if Path(v).suffix.lower() != ".csv":
                raise ValueError(f"path {v!r}: use a .csv file (question, choices, answer columns)")
            return v

    class LmEval(Strict):
        """lm-evaluation-harness tasks (run only when `lm_eval` and the task data are available)."""

        tasks: list[str] = Field(min_length=1, description="lm-evaluation-harness task names")
        num_fewshot: int = Field(0, ge=0, description="Few-shot examples per prompt")
        limit: int | None = Field(None, gt=0, description="Examples per task at most (default: all)")

    source: TextSource = Field(description="Held-out text perplexity and KL are measured on")
    max_tokens: int = Field(16384, gt=0, description="Tokens of held-out text evaluated at most")
    window: int | None = Field(None, gt=1, description="Evaluation window in tokens (default: the model's context)")
    stride: int | None = Field(None, gt=0, description="Step between windows in tokens (default: the window)")
    kl_topk: int = Field(128, gt=0, description="Top-k baseline logits kept for the KL divergence")
    batch_size: int = Field(8, gt=0, description="Windows per forward pass")
    speed: Speed | None = Field(Speed(), description="Generation-speed measurement (null: not measured)")
    accuracy: Accuracy | None = Field(None, description="Multiple-choice accuracy on a labelled CSV")
    lm_eval: LmEval | None = Field(None, description="lm-evaluation-harness tasks")
    gates: Gates = Field(Gates(), description="Quality gates every variant must pass to be registered")
    method_gates: dict[str, Gates] = Field({}, description="Gates per method name, overriding `gates` for it")

    @model_validator(mode="after")
    def _stride(self) -> Evaluation:
        if self.stride is not None and self.window is not None and self.stride > self.window:
            raise ValueError(f"stride {self.stride} exceeds window {self.window}; use stride <= window")
        return self


class Registry(Strict):
    """Where passing variants are registered."""

    model_name: str = Field(min_length=1, description="MLflow registered model name (letters, digits, '.', '_', '-')")
    aliases: list[str] = Field(["candidate", "champion"], description="Aliases: newest passing, then best")
    champion_objective: Literal["smallest_size", "lowest_perplexity"] = Field(
        "smallest_size", description="How the champion is picked among passing variants")

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[\w.-]+$", v):
            raise ValueError("use letters, digits, '.', '_' or '-'")
        return v


class Storage(Strict):
    """Artifact store root: a local folder or an fsspec URL (s3://, gs://, file://...) shared by workers."""

    root: str = Field("${QUANTMILL_HOME}/artifacts", validate_default=True,
                      description="Folder or fsspec URL; ${VARS} expand in the flow run's (worker's) environment")
    keep: Literal["all", "registered"] = Field(
        "all", description="registered: drop unregistered variants' checkpoints when `quantmill run` ends")

    @field_validator("root")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand(v)


class Merge(Strict):
    """How a LoRA adapter is merged: memory strategy, failure policy, and the base a QLoRA adapter merges into."""

    strategy: Literal["auto", "gpu", "cpu", "streaming"] = Field(
        "auto", description="Where the merge runs; streaming merges shard by shard in little memory")
    on_failure: Literal["stop", "skip_merge"] = Field(
        "stop", description="On a merge failure: stop the run, or quantize the base model without the adapter")
    qlora_merge: Literal["full_precision", "dequantized"] = Field(
        "full_precision", description="Base a QLoRA adapter merges into: the fp weights, or their 4-bit round trip")
    adapter_training: Literal["auto", "lora", "qlora"] = Field(
        "auto", description="How the adapter was trained (auto: read from its config)")


class Profile(Strict):
    """A whole run: model (+adapter) -> calibration -> recipes -> evaluation -> registry."""

    model_config = ConfigDict(json_schema_extra=recipes_or_grid)

    name: str = Field("quantmill", description="Run name (the MLflow run's name)")
    model: Source = Field(description="The base model: a local folder or a pinned Hugging Face repo")
    adapter: Source | None = Field(None, description="Optional LoRA/QLoRA adapter merged into the model first")
    merge: Merge = Field(Merge(), description="How the adapter is merged")
    calibration: Calibration = Field(description="Calibration text for the calibrated methods")
    recipes: list[Recipe] = Field([], description="The variants to build: at least one (or a sweep grid)")
    sweep: Sweep | None = Field(None, description="A grid of recipes and the task runner they fan out on")
    evaluation: Evaluation = Field(description="Held-out evaluation and quality gates")
    registry: Registry = Field(description="MLflow registered model the passing variants go to")
    storage: Storage = Field(default_factory=Storage, description="Where artifacts are stored")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device of the run (auto: CUDA if present)")

    @model_validator(mode="after")
    def _unique_names(self) -> Profile:
        if not self.recipes and not (self.sweep and self.sweep.grid):
            raise ValueError("recipes: give at least one recipe (or a sweep.grid)")
        names = [r.name for r in self.recipes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"recipe names must be unique; repeated: {', '.join(sorted(dup))} (set 'name')")
        if self.sweep and self.sweep.grid:
            recipes, skipped = self.all_recipes()
            if not recipes:
                raise ValueError("sweep.grid: no combination is valid: " + "; ".join(skipped))
        return self

    def all_recipes(self) -> tuple[list[Recipe], list[str]]:
        """The explicit recipes plus the sweep grid's (first wins on a name clash), and skipped grid lines."""
        if not (self.sweep and self.sweep.grid):
            return list(self.recipes), []
        grid, skipped = self.sweep.expand()
        names = {r.name for r in self.recipes}
        return list(self.recipes) + [r for r in grid if r.name not in names], skipped
