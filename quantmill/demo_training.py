"""Training the demo's small causal LMs: spec, tokenizer, config, a deterministic training loop, LoRA, perplexity."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantmill.demo_corpus import demo_topic_keys, join_topics

if TYPE_CHECKING:  # transformers is imported where it is used (importing this module stays light)
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

ARCHS = ("llama", "qwen2")
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


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
    # One thread: the same weights as two, bit for bit (Llama 560 steps + LoRA, Qwen2 280 steps + LoRA; measured
    # 2026-12-03), for less CPU (the Llama's 560 steps: 98 s instead of 138 s, 96 s wall instead of 109 s on 2 idle
    # cores): this model is too small for a second thread to pay for its synchronisation.
    num_threads: int = 1
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 40
    lora_lr: float = 3e-3


def validate_spec(arch: str, spec: DemoSpec) -> None:
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

    validate_spec(arch, spec)
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
def deterministic_torch(num_threads: int) -> Iterator[None]:
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
def hf_progress(quiet: bool) -> Iterator[None]:
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


def train_loop(  # noqa: PLR0913 - keyword-only: one training run's settings
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


def token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Tokenize `text` into a flat LongTensor without special tokens."""
    return torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)


@torch.no_grad()
def eval_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str, seq_len: int = 128, max_windows: int | None = None) -> float:
    """Perplexity of `model` on `text`, over non-overlapping windows of `seq_len` tokens."""
    ids = token_ids(tokenizer, text)
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


def train_model(arch: str, spec: DemoSpec, tokenizer: PreTrainedTokenizerFast, train_text: str, out_dir: Path, quiet: bool) -> None:
    """Train the base model on `train_text` and save it (float32 safetensors) to `out_dir`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = make_config(arch, spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    train_loop(model, token_ids(tokenizer, train_text), spec, steps=spec.steps, lr=spec.lr, seed=spec.seed + 1,
                desc=f"train {arch}", quiet=quiet)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def train_adapter(model_dir: Path, final_model_dir: Path, spec: DemoSpec, out_dir: Path, quiet: bool) -> None:
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
    ids = token_ids(tokenizer, join_topics(demo_topic_keys()["adapter"]))
    train_loop(peft_model, ids, spec, steps=spec.lora_steps, lr=spec.lora_lr, seed=spec.seed + 3, desc="train LoRA",
                quiet=quiet)
    peft_model.peft_config["default"].base_model_name_or_path = str(final_model_dir)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
