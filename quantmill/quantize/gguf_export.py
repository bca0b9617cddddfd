"""GGUF export for llama.cpp / Ollama / LM Studio, written with llama.cpp's own `gguf` package (0.19).

On disk: one `model.gguf` (plus quantmill's sidecar). Every 2-D weight (linears, token embedding, output) is stored
as the recipe's `quant_type` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 along the input dimension; BF16), as
`llama-quantize --pure` would; 1-D tensors (norms, biases) stay F32. Tensor names follow gguf's TensorNameMap
(`blk.N.attn_q.weight`, `token_embd.weight`, ...); Llama's q/k rows are permuted to llama.cpp's rotary layout
(what convert_hf_to_gguf.py does; transformers' GGUF loader undoes it), Qwen2's are not (NEOX rope).
Metadata: the architecture's hyper-parameters, and the tokenizer (`tokenizer.ggml.model = gpt2`, pre-tokenizer
name, tokens padded to the embedding rows, token types, merges, bos/eos/unk/pad ids, add_bos) with the chat
template when the tokenizer has one. Reload: `AutoModelForCausalLM.from_pretrained(dir, gguf_file="model.gguf")`
(weights dequantized to float) or llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from quantmill.methods.gguf import ARCHITECTURES, GGUFConfig
from quantmill.methods.registry import QuantizeJob, QuantizeResult
from quantmill.quantize.common import relative_error

GGUF_FILE = "model.gguf"


# Byte-level BPE pre-tokenizer split regexes llama.cpp knows by name (tokenizer.ggml.pre).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def qtype(name: str):  # noqa: ANN201 - gguf.GGMLQuantizationType
    """gguf's enum member for a quant type name."""
    import gguf

    return gguf.GGMLQuantizationType[name]


def quantize_dequantize(w: torch.Tensor, quant_type: str) -> torch.Tensor:
    """What a reader gets back from `quant_type` storage of `w` (through gguf.quants; fp32)."""
    from gguf import quants

    q = quants.quantize(w.detach().float().numpy(), qtype(quant_type))
    return torch.from_numpy(quants.dequantize(q, qtype(quant_type)).astype(np.float32)).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF half-split rotary rows -> llama.cpp interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(model_dir: Path, tied: bool):  # noqa: ANN201 - iterator of (name, tensor)
    """The checkpoint's tensors one at a time (an lm_head tied to the embeddings is skipped: stored once)."""
    from safetensors import safe_open

    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if tied and key == "lm_head.weight":
                    continue
                yield key, f.get_tensor(key)


def pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for the byte-level split of the tokenizer as transformers builds it (GPT-2, Llama-3, Qwen2).

    Read from the loaded tokenizer, not tokenizer.json: e.g. Qwen2Tokenizer replaces the file's split by its own.
    """
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    regex = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    if regex in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[regex]
    raise ValueError("gguf: tokenizer.json's pre-tokenizer is not a byte-level split llama.cpp knows "
                     "(GPT-2, Llama-3 or Qwen2); this model's tokenizer cannot be exported")


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:  # noqa: ANN001 - a fast tokenizer
    """Token strings by id, padded to the embedding rows with [PADn] (UNUSED), and their gguf token types."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"gguf: the tokenizer has id {max(by_id)} beyond the {vocab_size} embedding rows")
    added = {t.content: t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(TokenType.CONTROL if added[tok].special else TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:  # noqa: ANN001 - gguf.GGUFWriter
    """Tokenizer metadata (byte-level BPE as tokenizer.ggml.model=gpt2) and the chat template, if any."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or (tok_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("gguf: only byte-level BPE tokenizers (model BPE + ByteLevel decoder) are exported; "
                         f"{type(tokenizer).__name__} of this model is not one")
    pre = pre_tokenizer_name(tok_json)
    tokens, types = vocab_entries(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(int(getattr(tokenizer, attr)))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def add_hparams(writer, cfg, name: str, file_type: int) -> None:  # noqa: ANN001 - GGUFWriter, PretrainedConfig
    """The hyper-parameters llama.cpp (and transformers' GGUF loader) read for Llama/Qwen2."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"gguf: rope_type={rope['rope_type']!r} (rope scaling) is not exported; only default rope")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)


def gguf_tensor(
    name: str, w: torch.Tensor, quant_type: str, cfg  # noqa: ANN001 - PretrainedConfig
) -> tuple[np.ndarray, object, float | None]:
    """(array to write, its gguf type, relative error) of one HF tensor; 2-D weights get `quant_type`."""
    from gguf import GGMLQuantizationType, quants

    w = w.detach().float()
    if w.dim() < 2:
        return w.numpy(), GGMLQuantizationType.F32, None
    arch = ARCHITECTURES[cfg.architectures[0]]
    if arch.permute_qk and name.endswith("self_attn.q_proj.weight"):
        w = permute_rows(w, cfg.num_attention_heads)
    elif arch.permute_qk and name.endswith("self_attn.k_proj.weight"):
        w = permute_rows(w, cfg.num_key_value_heads)
    data = quants.quantize(w.numpy(), qtype(quant_type))
    err = relative_error(w, torch.from_numpy(quants.dequantize(data, qtype(quant_type)).astype(np.float32)))
    return data, qtype(quant_type), err


def write_gguf(model_dir: Path, out_file: Path, quant_type: str, progress=print) -> dict[str, float]:  # noqa: ANN001
    """Write `out_file`; return the relative error of every quantized 2-D tensor by module name."""
    import gguf
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    arch = ARCHITECTURES.get((cfg.architectures or ["?"])[0])
    if arch is None:
        raise ValueError(f"gguf export supports {', '.join(ARCHITECTURES)}; {cfg.architectures} is not mapped")
    model_arch = gguf.MODEL_ARCH[arch.gguf_arch]
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[model_arch])
    add_hparams(writer, cfg, Path(model_dir).name, int(gguf.LlamaFileType[f"MOSTLY_{quant_type}"]))
    add_tokenizer(writer, model_dir, cfg.vocab_size)
    errors: dict[str, float] = {}
    for key, tensor in hf_tensors(model_dir, bool(getattr(cfg, "tie_word_embeddings", False))):
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ValueError(f"gguf: tensor {key} has no llama.cpp name for {arch.gguf_arch}")
        data, dtype, err = gguf_tensor(key, tensor, quant_type, cfg)
        writer.add_tensor(target, data, raw_dtype=dtype)
        if err is not None:
            errors[key.removesuffix(".weight")] = err
    progress(f"gguf: writing {len(writer.tensors[0])} tensors ({quant_type}) to {out_file.name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return errors


def export_gguf(config: GGUFConfig, job: QuantizeJob) -> QuantizeResult:
    """GGUF file (llama.cpp, Ollama, LM Studio): Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/BF16 weights, tokenizer + chat template."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    errors = write_gguf(job.model_dir, job.out_dir / GGUF_FILE, config.quant_type, job.progress)
    extra = {"format": "gguf", "gguf_file": GGUF_FILE, "quant_type": config.quant_type, "bits": config.weight_bits}
    return QuantizeResult(quantized_modules=sorted(errors), kept_modules=[], layer_errors=errors, extra=extra)
