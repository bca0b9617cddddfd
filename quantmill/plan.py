"""Memory plan: each step's peak RAM/VRAM, disk and output size, from config.json and safetensors headers alone.

Each row has the *working memory the step adds* (`ram`) and the process baseline when it runs (`base`: the
pipeline process itself, `RUNTIME_BYTES`, plus the quantization libraries earlier steps imported, which stay
loaded); the step's peak RSS is `base + ram`, and the run's peak is the largest step's, not their sum (memory is
given back between steps: quantmill.memory). Nothing here reads weights: local folders give their safetensors
headers, hub repos their headers via HTTP range requests (`huggingface_hub.get_safetensors_metadata`).
This is the only estimator: `quantmill plan` prints it and the preflight refuses a run with it (`refuse_unfit`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.errors import QuantmillError
from quantmill.methods import fact_table
from quantmill.metrics import LOGITS_BUDGET

MiB = 1 << 20
RUNTIME_BYTES = 540 * MiB  # the pipeline process at its first step (python, torch, transformers, prefect, mlflow)
STEP_OVERHEAD = 8 * MiB  # a step that loads a transformers model: its Python objects, buffers, allocator slack
QUANT_OVERHEAD = 6 * MiB  # from_pretrained's own objects and buffers, measured with rtn on the demo model
MERGE_SLACK = MiB // 2  # the merge's headers, file buffers and Python objects
HEADROOM = 1.15  # a step "fits" when estimate × HEADROOM ≤ free memory
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
DISK_ROW = "disk (all steps)"
KEEP = re.compile(r"(embed|lm_head|wte|wpe|norm|ln_|bias)")


@dataclass(frozen=True)
class Weights:
    """What the plan knows of a model's weights: tensor shapes and dtypes per shard, no values."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    shard_bytes: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)

    def nbytes(self, name: str) -> int:
        """Bytes of one tensor."""
        dtype, shape = self.tensors[name]
        return DTYPE_BYTES.get(dtype, 4) * math.prod(shape)

    @property
    def total(self) -> int:
        """Bytes of all tensors."""
        return sum(self.nbytes(n) for n in self.tensors)

    @property
    def params(self) -> int:
        """Number of parameters."""
        return sum(math.prod(s) for _, s in self.tensors.values())

    @property
    def largest_shard(self) -> int:
        """Bytes of the largest shard file."""
        return max(self.shard_bytes.values(), default=0)

    @property
    def itemsize(self) -> int:
        """Bytes per element of the dominant floating dtype."""
        by: dict[int, int] = {}
        for d, s in self.tensors.values():
            by[DTYPE_BYTES.get(d, 4)] = by.get(DTYPE_BYTES.get(d, 4), 0) + math.prod(s)
        return max(by, key=by.get) if by else 2

    def linear_params(self) -> tuple[int, int]:
        """(params of 2-D weights a quantizer targets, params it keeps: embeddings, lm_head, norms, biases)."""
        quant = sum(math.prod(s) for n, (_, s) in self.tensors.items() if len(s) == 2 and not KEEP.search(n))
        return quant, self.params - quant


def read_header(path: Path) -> tuple[bytes, dict[str, Any], int]:
    """(raw header bytes, parsed header, offset of the data section) of one safetensors file."""
    with open(path, "rb") as fh:
        raw = fh.read(struct.unpack("<Q", fh.read(8))[0])
    return raw, json.loads(raw), 8 + len(raw)


def folder_weights(path: Path) -> Weights:
    """Weights of a local model folder from its config.json and safetensors headers."""
    tensors, shards = {}, {}
    for f in sorted(Path(path).glob("*.safetensors")):
        shards[f.name] = f.stat().st_size
        for name, info in read_header(f)[1].items():
            if name != "__metadata__":
                tensors[name] = (info["dtype"], tuple(info["shape"]))
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").is_file() else {}
    if not tensors:
        return config_weights(config)
    return Weights(tensors, shards, config)


def hub_weights(repo_id: str, revision: str | None) -> Weights:
    """Weights of a hub repo from its config.json and safetensors headers (HTTP range requests, no weights)."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one line for the user
        raise QuantmillError(f"model.repo_id {repo_id!r}: cannot read config/headers ({type(exc).__name__}); "
                             "go online, set HF_TOKEN, or plan a local copy (model.path)") from None
    tensors, shards = {}, {}
    for fname, fm in meta.files_metadata.items():
        shards[fname] = 0
        for name, info in fm.tensors.items():
            tensors[name] = (info.dtype, tuple(info.shape))
            shards[fname] += DTYPE_BYTES.get(info.dtype, 4) * math.prod(info.shape)
    return Weights(tensors, shards, config)


def config_weights(config: dict[str, Any]) -> Weights:
    """Approximate weights of a decoder-only transformer from config.json alone (no headers available)."""
    h, layers = int(config.get("hidden_size") or 0), int(config.get("num_hidden_layers") or 0)
    inter, vocab = int(config.get("intermediate_size") or 4 * h), int(config.get("vocab_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    hd = int(config.get("head_dim") or h // heads)
    kv = int(config.get("num_key_value_heads") or heads) * hd
    dtype = {"float32": "F32", "float16": "F16"}.get(str(config.get("dtype") or config.get("torch_dtype")), "BF16")
    tensors = {"model.embed_tokens.weight": (dtype, (vocab, h))}
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = (dtype, (vocab, h))
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, heads * hd), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}
        tensors.update({f"{p}{k}.weight": (dtype, s) for k, s in shapes.items()})
    w = Weights(tensors, {})
    return Weights(tensors, {"model.safetensors (estimated)": w.total}, config)


@dataclass(frozen=True)
class Machine:
    """Free resources of this machine."""

    ram: int
    vram: int
    disk: int
    cuda: bool


def this_machine(store_root: str | Path = ".") -> Machine:
    """Available RAM, free VRAM (0 without CUDA) and free disk under the store root."""
    import psutil
    import torch

    from quantmill import state

    path = Path(store_root) if "://" not in str(store_root) else state.home()  # URL stores build in a local cache
    while not path.exists():
        path = path.parent
    cuda = torch.cuda.is_available()
    vram = torch.cuda.mem_get_info()[0] if cuda else 0
    return Machine(psutil.virtual_memory().available, vram, shutil.disk_usage(path).free, cuda)


def targeted(weights: Weights, adapter_cfg: dict[str, Any]) -> list[str]:
    """Base tensors a LoRA adapter changes: weights of its target modules and modules_to_save."""
    targets = adapter_cfg.get("target_modules") or []
    extra = adapter_cfg.get("modules_to_save") or []
    out = []
    for name in weights.tensors:
        module = name.rsplit(".", 1)[0]
        leaf = module.rsplit(".", 1)[-1]
        if isinstance(targets, str):
            hit = targets == "all-linear" and len(weights.tensors[name][1]) == 2 or bool(re.fullmatch(targets, module))
        else:
            hit = leaf in targets or "all-linear" in targets and len(weights.tensors[name][1]) == 2
        if (hit and name.endswith(".weight")) or leaf in extra:
            out.append(name)
    return out


def _merge_temp(weights: Weights, name: str) -> int:
    """fp32 temporaries of merging one tensor: a ≤ 1 Mi-element block of B@A rows (+ W's block promoted if half)."""
    dtype, shape = weights.tensors[name]
    block = min(math.prod(shape), max(shape[-1], (1 << 20) // shape[-1] * shape[-1]))
    return block * (4 + (4 if DTYPE_BYTES.get(dtype, 4) != 4 else 0))


def merge_memory(weights: Weights, adapter_bytes: int, strategy: str, targets: list[str] | None = None) -> tuple[int, int]:
    """(RAM, VRAM) a merge adds: streaming holds one tensor, cpu/gpu hold the whole model, plus the adapter."""
    names = targets if targets is not None else [n for n in weights.tensors if len(weights.tensors[n][1]) == 2]
    temp = max((_merge_temp(weights, n) + weights.nbytes(n) * (strategy == "streaming") for n in names), default=0)
    base = adapter_bytes + MERGE_SLACK  # untouched tensors are copied in the kernel (copy_file_range): no buffer
    if strategy == "streaming":
        return base + temp, 0
    if strategy == "gpu":
        return base + max(weights.nbytes(n) for n in weights.tensors), weights.total + adapter_bytes + temp
    return base + weights.total + temp, 0


def choose_merge_strategy(weights: Weights, adapter_bytes: int, requested: str = "auto",
                          machine: Machine | None = None) -> tuple[str, str]:
    """(strategy, why): gpu when free VRAM covers the model, cpu when RAM does, else streaming; or as requested."""
    m = machine or this_machine()
    if requested == "gpu" and not m.cuda:
        raise QuantmillError("merge.strategy: gpu needs a CUDA device and none is visible; use auto, cpu or streaming")
    if requested != "auto":
        return requested, f"merge.strategy={requested} in the profile"
    gpu_vram = merge_memory(weights, adapter_bytes, "gpu")[1]
    cpu_ram = merge_memory(weights, adapter_bytes, "cpu")[0]
    if m.cuda and gpu_vram * HEADROOM <= m.vram:
        return "gpu", f"free VRAM {gib(m.vram)} covers {gib(gpu_vram)}"
    if cpu_ram * HEADROOM <= m.ram:
        return "cpu", f"available RAM {gib(m.ram)} covers {gib(cpu_ram)}"
    return "streaming", f"the model ({gib(cpu_ram)}) does not fit in {gib(m.ram)} RAM; one shard at a time"


def gib(n: float) -> str:
    """Human size: 1.2 GiB, 35.0 MiB, 12 KiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ---------- the other steps ----------

# Per-method facts (memory factors, libraries, CPU load dtype, evaluation dequantization) are registered with each
# method (quantmill/methods/<method>.py, MethodFacts); these tables are read from the registry.
METHODS: dict[str, tuple[float, int, int | None]] = fact_table("memory")
LIBRARY: dict[str, str] = fact_table("library")
LOADER: dict[str, str] = fact_table("loader_library")
# Steps' own first use (stays resident): the tokenizer stack the calibration step imports.
STEP_LIBRARY_BYTES = {"tokenizers": 160 * MiB}
EVAL_DEQUANT: dict[str, float] = fact_table("eval_dequant")
CPU_LOAD_BYTES: dict[str, int] = fact_table("cpu_load_bytes")


def library_of(method: str, loading: bool = False) -> str:
    """The library a method's quantize step (or, `loading`, its checkpoint's evaluation) imports; unknown: its name."""
    return (LOADER.get(method) if loading else None) or LIBRARY.get(method, method)


def library_bytes(lib: str) -> int:
    """First-use bytes of a library (METHODS' column, the largest among the methods using it)."""
    if lib in STEP_LIBRARY_BYTES:
        return STEP_LIBRARY_BYTES[lib]
    return max((row[1] for m, row in METHODS.items() if library_of(m) == lib), default=0)


def checkpoint_bytes(weights: Weights, method: str, bits: int, group_size: int | None, device: str) -> int:
    """Expected size of a quantized checkpoint: packed linears, their scales, kept tensors (base or half dtype)."""
    quant, keep = weights.linear_params()
    kept = METHODS.get(method, (1.0, 0, 0))[2]
    half = weights.itemsize if weights.itemsize == 2 else 2
    kept = half if kept is None or (device == "cuda" and kept == 0) else kept or weights.itemsize
    scales = quant / group_size * (2 + bits / 8) if group_size else 0
    return int(quant * bits / 8 + scales + keep * kept)


def load_bytes(weights: Weights, method: str, device: str) -> int:
    """Bytes of the full-precision model as a quantizer loads it (CPU: CPU_LOAD_BYTES or the base dtype; CUDA fp16)."""
    if method == "fp8" or device != "cuda":
        return weights.params * (CPU_LOAD_BYTES.get(method, weights.itemsize) if device != "cuda" else weights.itemsize)
    return weights.params * 2


def activation_bytes(weights: Weights, num_samples: int, seq_len: int) -> int:
    """Calibration activations cached per layer (inputs and outputs, fp32) plus one layer's Hessians."""
    h = int(weights.config.get("hidden_size") or 0)
    inter = int(weights.config.get("intermediate_size") or 4 * h)
    return 2 * num_samples * seq_len * h * 4 + (6 * h * h + inter * inter) * 4


def quantize_memory(weights: Weights, method: str, bits: int, group_size: int | None, device: str,
                    calib: tuple[int, int] | None) -> tuple[int, int, int]:
    """(RAM, VRAM, checkpoint bytes) of one recipe on `device` (its library's import is in the row's baseline)."""
    factor = METHODS.get(method, (1.0, 0, None))[0]
    ckpt = checkpoint_bytes(weights, method, bits, group_size, device)
    act = activation_bytes(weights, *calib) if calib else 0
    model = load_bytes(weights, method, device)
    if device == "cuda":
        return QUANT_OVERHEAD + weights.largest_shard + int(factor * ckpt), model + ckpt + act, ckpt
    return QUANT_OVERHEAD + model + int(factor * ckpt) + act, 0, ckpt


def evaluate_memory(model_bytes: int, vocab: int, window: int, batch: int, topk: int) -> int:
    """Scoring one model: its weights plus fp32 logits, their log-softmax and the saved top-k (baseline)."""
    batch = max(1, min(batch, LOGITS_BUDGET // max(1, window * vocab)))
    return STEP_OVERHEAD + model_bytes + 3 * batch * window * vocab * 4 + batch * window * topk * 8


@dataclass
class StepPlan:
    """One row of the plan: what a step needs, where it runs and whether it fits."""

    step: str
    device: str
    how: str
    ram: int
    vram: int = 0
    disk: int = 0
    output: int = 0
    fits: bool = True
    advice: str = ""
    libs: tuple[str, ...] = ()  # libraries the step imports (they stay loaded)
    base: int = 0  # process RSS when the step starts (set by `settle`)

    @property
    def peak(self) -> int:
        """The process's peak RSS during the step (baseline included)."""
        return self.base + self.ram


def _fit(row: StepPlan, m: Machine, advice: str) -> StepPlan:
    """Mark a row that needs more RAM/VRAM than is free for the step, with what to change (`m.ram` is what is
    free for the step itself; `settle` checks the row again with its baseline)."""
    row.advice = advice
    row.fits = not (row.ram * HEADROOM > m.ram or row.vram and row.vram * HEADROOM > m.vram)
    return row


def settle(rows: list[StepPlan], available: int, runtime: int = RUNTIME_BYTES, resident: int = 0) -> list[StepPlan]:
    """Give each row its baseline (runtime + libraries imported by it or earlier rows) and decide whether it fits:
    what the process adds beyond `resident` (its RSS now; 0 before it starts) must fit in `available`."""
    loaded: set[str] = set()
    for row in rows:
        loaded.update(lib for lib in row.libs if lib)
        row.base = runtime + sum(library_bytes(lib) for lib in loaded)
        if row.step == DISK_ROW:
            continue
        if row.base - resident + row.ram * HEADROOM > available and row.fits:
            row.fits = False
        if row.fits:
            row.advice = ""
    return rows


def run_peak(rows: list[StepPlan]) -> StepPlan:
    """The row whose peak is the run's peak: the largest step, not the sum (memory is given back between steps)."""
    return max((r for r in rows if r.step != DISK_ROW), key=lambda r: r.peak)


def adapter_facts(source: Any) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """(adapter_config, adapter bytes, training finding) of a local adapter folder, or of a hub adapter's config."""
    if source.path is not None:
        d = Path(source.path)
        cfg_file = d / "adapter_config.json"
        if not cfg_file.is_file():
            raise QuantmillError(f"adapter.path: {d} has no adapter_config.json; point at a peft adapter folder")
        from quantmill.adapters import detect_training

        cfg = json.loads(cfg_file.read_text())
        size = sum(f.stat().st_size for f in d.glob("adapter_model.*"))
        return cfg, size, detect_training(d, cfg, None)
    from huggingface_hub import HfApi, hf_hub_download

    try:
        cfg = json.loads(Path(hf_hub_download(source.repo_id, "adapter_config.json", revision=source.revision)).read_text())
        info = HfApi().get_paths_info(source.repo_id, ["adapter_model.safetensors"], revision=source.revision)
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one line for the user
        raise QuantmillError(f"adapter.repo_id {source.repo_id!r}: cannot read its config ({type(exc).__name__}); "
                             "go online, set HF_TOKEN, or plan a local copy (adapter.path)") from None
    return cfg, sum(getattr(i, "size", 0) or 0 for i in info), None


def merge_row(w: Weights, adapter: Any, spec: Any, m: Machine) -> StepPlan:
    """The merge step: strategy chosen for this machine, the adapter's training, memory and output."""
    cfg, abytes, training = adapter_facts(adapter)
    names = targeted(w, cfg)
    stream, no_gpu = merge_memory(w, abytes, "streaming", names)[0], ""
    try:
        strategy, _ = choose_merge_strategy(w, abytes, spec.strategy, m)
    except QuantmillError as exc:
        strategy, no_gpu = "gpu", str(exc)  # requested without a GPU: the row will not fit
    ram, vram = merge_memory(w, abytes, strategy, names)
    kind = (training or {}).get("method", "lora")
    how = f"{strategy} ({kind}{', dequantized base' if kind == 'qlora' and spec.qlora_merge == 'dequantized' else ''})"
    advice = no_gpu or (f"set merge.strategy: streaming (needs {gib(stream)})" if strategy != "streaming"
                        else "free RAM, or merge.on_failure: skip_merge to carry on unmerged")
    return _fit(StepPlan("merge", "cuda" if strategy == "gpu" else "cpu", how, ram, vram, w.total, w.total), m, advice)


def quantize_row(w: Weights, recipe: Any, cal: Any, device: str, m: Machine) -> StepPlan:
    """One recipe's quantize step: memory on `device`, checkpoint size, and what to change if it does not fit."""
    from quantmill.methods.checks import uses_calibration

    c = recipe.config()
    calib = (cal.num_samples, cal.seq_len) if uses_calibration(recipe) else None
    ram, vram, ckpt = quantize_memory(w, recipe.method, c.weight_bits, c.weight_group_size, device, calib)
    act = activation_bytes(w, *calib) if calib else 0
    cpu_ram = quantize_memory(w, recipe.method, c.weight_bits, c.weight_group_size, "cpu", calib)[0]
    advice = (f"lower calibration.num_samples (activations take {gib(act)})" if act > (ram + vram) / 3
              else "use device: cpu" if device == "cuda" and cpu_ram * HEADROOM <= m.ram
              else "use a machine with more memory or a GPU")
    how = f"{c.weight_bits}-bit, loads {gib(load_bytes(w, recipe.method, device))}"
    row = StepPlan(f"quantize/{recipe.name}", device, how, ram, vram, ckpt, ckpt, libs=(library_of(recipe.method),))
    return _fit(row, m, advice)


def plan_profile(profile: Any, machine: Machine | None = None, runtime: int = RUNTIME_BYTES) -> list[StepPlan]:
    """Every step of a profile on this machine: peak RAM/VRAM, disk, output size, device, strategy, fit."""
    found = machine or this_machine(profile.storage.root)
    m = Machine(max(0, found.ram - runtime), found.vram, found.disk, found.cuda)  # the pipeline process runs first
    device = ("cuda" if m.cuda else "cpu") if profile.device == "auto" else profile.device
    src = profile.model
    w = folder_weights(Path(src.path)) if src.path else hub_weights(src.repo_id, src.revision)
    rows = [StepPlan("download", "network" if src.repo_id else "disk", "hub snapshot" if src.repo_id else "hash local folder",
                     64 * MiB if src.repo_id else STEP_OVERHEAD, disk=w.total if src.repo_id else 0, output=w.total)]
    if profile.adapter is not None:
        rows.append(merge_row(w, profile.adapter, profile.merge, m))
    rows += later_rows(w, profile.all_recipes()[0], profile.calibration, profile.evaluation, device, m)
    settle(rows, found.ram, runtime)
    total = sum(r.disk for r in rows)
    if total * HEADROOM > m.disk:
        rows.append(StepPlan(DISK_ROW, "disk", str(profile.storage.root), 0, 0, total, 0, False,
                             f"point storage.root at a disk with {gib(total * HEADROOM)} free"))
    return rows


def later_rows(w: Weights, recipes: list[Any], cal: Any, ev: Any, device: str, m: Machine) -> list[StepPlan]:
    """The steps after the merge: calibration, baseline evaluation, each recipe's quantize and evaluate."""
    text = Path(cal.source.path).stat().st_size if cal.source.path and Path(cal.source.path).is_file() else 64 * MiB
    tokens = cal.num_samples * cal.seq_len * 8
    rows = [_fit(StepPlan("calibrate", "cpu", f"{cal.num_samples} × {cal.seq_len} tokens",
                          STEP_OVERHEAD + 6 * text + tokens, 0, tokens, tokens, libs=("tokenizers",)), m,
                 "use a smaller calibration text")]
    vocab, window = int(w.config.get("vocab_size") or 32000), ev.window or int(w.config.get("max_position_embeddings") or 2048)
    base_eval = evaluate_memory(w.params * w.itemsize, vocab, window, ev.batch_size, ev.kl_topk)
    rows.append(_eval_row("evaluate/baseline", device, base_eval, ev.max_tokens * ev.kl_topk * 8, m))
    for recipe in recipes:
        rows.append(quantize_row(w, recipe, cal, device, m))
        dequant = EVAL_DEQUANT.get(recipe.method, 2.0) * w.linear_params()[0] if device != "cuda" else 0
        need = evaluate_memory(int(rows[-1].output * 1.2 + dequant), vocab, window, ev.batch_size, 0)
        rows.append(_eval_row(f"evaluate/{recipe.name}", device, need, 0, m))
        rows[-1].libs = (library_of(recipe.method, loading=True),)
    return rows


def preflight_rows(model_dir: Path, recipes: list[Any], cal: Any, ev: Any, device: str) -> list[StepPlan]:
    """The remaining steps of a running pipeline (after the merge), settled against available memory with this
    process's RSS now as their baseline."""
    import psutil

    w, avail = folder_weights(Path(model_dir)), psutil.virtual_memory().available
    rss = psutil.Process().memory_info().rss
    return settle(later_rows(w, recipes, cal, ev, device, Machine(avail, 0, 1 << 62, device == "cuda")), avail,
                  runtime=rss, resident=rss)


def disk_need(rows: list[StepPlan]) -> int:
    """Bytes the steps write to the store, plus scratch for the largest output (built beside its final place)."""
    return sum(r.disk for r in rows) + max((r.output for r in rows), default=0)


def refuse_unfit(rows: list[StepPlan], available: int) -> None:
    """Raise PreflightError naming the first step whose peak will not fit in the `available` memory."""
    from quantmill.errors import PreflightError

    for row in rows:
        if not row.fits:
            raise PreflightError(
                f"{row.step}: needs about {gib(row.peak)} at its peak (process {gib(row.base)} + step {gib(row.ram)}), "
                f"{gib(available)} available beyond this process; {row.advice or 'use a machine with more memory'}")


def _eval_row(name: str, device: str, need: int, disk: int, m: Machine) -> StepPlan:
    """An evaluation row (weights + logits), on the GPU when the device is cuda."""
    ram, vram = (STEP_OVERHEAD, need) if device == "cuda" else (need, 0)
    return _fit(StepPlan(name, device, "perplexity/KL windows", ram, vram, disk, disk), m,
                "lower evaluation.batch_size or evaluation.window")


def render(rows: list[StepPlan], machine: Machine, runtime: int = RUNTIME_BYTES):  # noqa: ANN201 - rich Table
    """The plan as a rich table."""
    from rich.table import Table

    table = Table(title=f"memory plan (this machine: {gib(machine.ram)} RAM free, "
                        f"{gib(machine.vram) + ' VRAM free' if machine.cuda else 'no GPU'}, {gib(machine.disk)} disk free; "
                        f"process itself ≈ {gib(runtime)})")
    for col in ("step", "device", "strategy", "step RAM", "peak RSS", "peak VRAM", "disk", "output", "fits"):
        table.add_column(col, justify="right" if col in {"step RAM", "peak RSS", "peak VRAM", "disk", "output"} else "left")
    for r in rows:
        table.add_row(r.step, r.device, r.how, gib(r.ram), gib(r.peak) if r.step != DISK_ROW else "-",
                      gib(r.vram) if r.vram else "-", gib(r.disk) if r.disk else "-",
                      gib(r.output) if r.output else "-", "yes" if r.fits else f"[red]NO[/red]: {r.advice}")
    top = run_peak(rows)
    table.caption = f"run peak RSS ≈ {gib(top.peak)} ({top.step}; the largest step, not the sum)"
    return table


def step_peaks(rows: list[StepPlan]) -> dict[str, int]:
    """Each step's predicted peak RSS of the process (its baseline included): {step: bytes}."""
    return {r.step: r.peak for r in rows if r.step != DISK_ROW}
