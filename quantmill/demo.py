"""Small causal LMs trained locally on pydoc text, so quantizers can be compared on them."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported where it is used (importing this module stays light)
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

CODE_VERSION = "1"
ARCHS = ("llama", "qwen2")
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
_EVAL_FRACTION = 0.15
_CALIB_FRACTION = 0.10
_ADAPTER_FRACTION = 0.10


@dataclass(frozen=True)
class DemoSpec:
    """Architecture, tokenizer and training hyper-parameters of a demo model."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    head_dim: int = 32
    qwen2_kv_heads: int = 2
    max_position_embeddings: int = 512
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 560
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    seed: int = 0
    num_threads: int = 2
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 40
    lora_lr: float = 3e-3


@dataclass(frozen=True)
class DemoAssets:
    """Paths of one complete demo build."""

    root: Path
    model_dir: Path
    adapter_dir: Path | None
    train_path: Path
    calib_path: Path
    eval_path: Path


def demo_topic_keys() -> dict[str, list[str]]:
    """Topic keys of the train/calib/eval/adapter splits, quotas filled in sha256-of-key order."""
    from pydoc_data.topics import topics

    total = sum(len(v) for v in topics.values())
    remaining = sorted(topics, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    groups: dict[str, list[str]] = {}
    for name, frac in (("eval", _EVAL_FRACTION), ("calib", _CALIB_FRACTION), ("adapter", _ADAPTER_FRACTION)):
        budget, groups[name] = frac * total, []
        for key in list(remaining):
            if len(topics[key]) <= budget:
                groups[name].append(key)
                remaining.remove(key)
                budget -= len(topics[key])
    groups["train"] = remaining + groups["calib"] + groups["adapter"]
    return {name: sorted(keys) for name, keys in groups.items()}


def _join_topics(keys: list[str]) -> str:
    """Concatenate topic texts separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in keys) + "\n"


def demo_text_splits() -> dict[str, str]:
    """Return the train, calib and eval texts (eval shares no topic with train or calib)."""
    keys = demo_topic_keys()
    return {name: _join_topics(keys[name]) for name in ("train", "calib", "eval")}


def _corpus_digest() -> str:
    """Digest of the corpus, so a changed Python stdlib invalidates the cache."""
    from pydoc_data.topics import topics

    return hashlib.sha256(json.dumps(topics, sort_keys=True).encode("utf-8")).hexdigest()


def spec_hash(spec: DemoSpec) -> str:
    """Short hash identifying a spec, the code version and the corpus."""
    payload = json.dumps([dataclasses.asdict(spec), CODE_VERSION, _corpus_digest()], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def _validate(arch: str, spec: DemoSpec) -> None:
    """Raise ValueError for an unknown arch or inconsistent dimensions."""
    if arch not in ARCHS:
        raise ValueError(f"unknown demo arch {arch!r}; expected one of {ARCHS}")
    if spec.hidden_size % spec.head_dim:
        raise ValueError(f"hidden_size {spec.hidden_size} is not a multiple of head_dim {spec.head_dim}")
    heads = spec.hidden_size // spec.head_dim
    if arch == "qwen2" and heads % spec.qwen2_kv_heads:
        raise ValueError(f"{heads} attention heads are not divisible by qwen2_kv_heads {spec.qwen2_kv_heads}")
    if spec.seq_len > spec.max_position_embeddings:
        raise ValueError(f"seq_len {spec.seq_len} exceeds max_position_embeddings {spec.max_position_embeddings}")
    if spec.steps < 1 or spec.batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")


def train_tokenizer(text: str, vocab_size: int, max_length: int = 512) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer and wrap it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **SPECIAL_TOKENS)


def make_config(arch: str, spec: DemoSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """Build the transformers config for `arch` from `spec` and the tokenizer's special ids."""
    from transformers import LlamaConfig, Qwen2Config

    _validate(arch, spec)
    heads = spec.hidden_size // spec.head_dim
    common = dict(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        use_cache=True,
    )
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=heads, tie_word_embeddings=False, **common)
    return Qwen2Config(num_key_value_heads=spec.qwen2_kv_heads, tie_word_embeddings=True, **common)


@contextlib.contextmanager
def _deterministic_torch(num_threads: int) -> Iterator[None]:
    """Fix threads, deterministic algorithms and a forked RNG; restore the previous settings afterwards."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn_only)
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def _hf_progress(quiet: bool) -> Iterator[None]:
    """Silence transformers' own progress bars while `quiet`, restoring the previous state afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup then cosine decay to 10% of the peak learning rate."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def _train_loop(  # noqa: PLR0913 - keyword-only: one training run's settings
    model: PreTrainedModel, ids: torch.Tensor, spec: DemoSpec, *, steps: int, lr: float, seed: int, desc: str, quiet: bool,
) -> float:
    """Train `model` on random windows of `ids` with AdamW + warmup/cosine; return the final loss."""
    from tqdm.auto import tqdm

    if ids.numel() <= spec.seq_len + 1:
        raise ValueError(f"text too short for seq_len {spec.seq_len}: only {ids.numel()} tokens")
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(spec.warmup_steps, steps // 5 + 1), steps))
    offsets = torch.arange(spec.seq_len)
    model.train()
    loss_value = float("nan")
    with tqdm(range(steps), desc=desc, disable=quiet, leave=False) as bar:
        for _ in bar:
            starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.batch_size,), generator=gen)
            batch = ids[starts[:, None] + offsets]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


def _token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Tokenize `text` into a flat LongTensor without special tokens."""
    return torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)


@torch.no_grad()
def eval_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str, seq_len: int = 128, max_windows: int | None = None) -> float:
    """Perplexity of `model` on `text`, over non-overlapping windows of `seq_len` tokens."""
    ids = _token_ids(tokenizer, text)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text too short for a single window of {seq_len} tokens")
    windows = ids[: n * seq_len].view(n, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(16):
        chunk = chunk.to(device)
        total += model(input_ids=chunk, labels=chunk).loss.float().item() * chunk.shape[0]
        count += chunk.shape[0]
    model.train(was_training)
    return math.exp(total / count)


def _train_model(arch: str, spec: DemoSpec, tokenizer: PreTrainedTokenizerFast, train_text: str, out_dir: Path, quiet: bool) -> None:
    """Train the base model on `train_text` and save it (float32 safetensors) to `out_dir`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = make_config(arch, spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _train_loop(model, _token_ids(tokenizer, train_text), spec, steps=spec.steps, lr=spec.lr, seed=spec.seed + 1,
                desc=f"train {arch}", quiet=quiet)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _train_adapter(model_dir: Path, final_model_dir: Path, spec: DemoSpec, out_dir: Path, quiet: bool) -> None:
    """Train a LoRA adapter on the adapter slice and save it, pointing at `final_model_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    torch.manual_seed(spec.seed + 2)
    peft_model = get_peft_model(model, lora)
    ids = _token_ids(tokenizer, _join_topics(demo_topic_keys()["adapter"]))
    _train_loop(peft_model, ids, spec, steps=spec.lora_steps, lr=spec.lora_lr, seed=spec.seed + 3, desc="train LoRA",
                quiet=quiet)
    peft_model.peft_config["default"].base_model_name_or_path = str(final_model_dir)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)


def _assets(final: Path, has_adapter: bool) -> DemoAssets:
    """DemoAssets describing the build directory `final`."""
    data = final / "data"
    return DemoAssets(
        root=final, model_dir=final / "model", adapter_dir=final / "adapter" if has_adapter else None,
        train_path=data / "train.txt", calib_path=data / "calib.txt", eval_path=data / "eval.txt",
    )


def _tmp_sibling(path: Path) -> Path:
    """Unique temporary directory next to `path` (same filesystem, so renames are atomic)."""
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move `tmp` to `final`; if another builder won the race, discard `tmp`."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _build_base(arch: str, spec: DemoSpec, final: Path, with_adapter: bool, quiet: bool) -> None:
    """Build data, tokenizer, model (and adapter) in a temp dir and publish it as `final`."""
    tmp = _tmp_sibling(final)
    try:
        splits = demo_text_splits()
        (tmp / "data").mkdir()
        for name, text in splits.items():
            (tmp / "data" / f"{name}.txt").write_text(text, encoding="utf-8")
        with _deterministic_torch(spec.num_threads), _hf_progress(quiet):
            tokenizer = train_tokenizer(splits["train"], spec.vocab_size, spec.max_position_embeddings)
            _train_model(arch, spec, tokenizer, splits["train"], tmp / "model", quiet)
            if with_adapter:
                _train_adapter(tmp / "model", final / "model", spec, tmp / "adapter", quiet)
        (tmp / "DONE").write_text(json.dumps({"arch": arch, "spec": dataclasses.asdict(spec)}, indent=1))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _add_adapter(spec: DemoSpec, final: Path, quiet: bool) -> None:
    """Train a missing adapter for an existing complete build and publish it atomically."""
    tmp = _tmp_sibling(final)
    try:
        with _deterministic_torch(spec.num_threads), _hf_progress(quiet):
            _train_adapter(final / "model", final / "model", spec, tmp / "adapter", quiet)
        _publish(tmp / "adapter", final / "adapter")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Undo root-logger handlers/level that training libraries install (else every log line prints twice)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def build_demo_assets(
    root: Path, arch: str = "llama", with_adapter: bool = True, spec: DemoSpec | None = None, quiet: bool = False
) -> DemoAssets:
    """Return the cached demo build for (arch, spec) under `root`, training it first if needed."""
    spec = spec or DemoSpec()
    _validate(arch, spec)
    final = Path(root).resolve() / f"{arch}-{spec_hash(spec)}"
    if final.exists() and not (final / "DONE").exists():
        raise ValueError(f"incomplete demo build at {final} (no DONE marker); delete it and retry")
    with _root_logging_kept():
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            _build_base(arch, spec, final, with_adapter, quiet)
        if with_adapter and not (final / "adapter").exists():
            _add_adapter(spec, final, quiet)
    return _assets(final, with_adapter)
