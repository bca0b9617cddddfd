"""At real model sizes: the pipeline against the same work done by calling the libraries directly.

    python benchmarks/scale.py [--small] [--cache DIR] [--keep]

Builds (once, cached under --cache) a random-init bf16 Llama of 254 M parameters (hidden 1024, 16 layers,
intermediate 2816, vocab 32000, 3 safetensors shards) and a rank-16 LoRA adapter (`--small`: hidden 512, 8 layers,
intermediate 1408, vocab 8000, ≈ 34 M). Tokenizer and texts come from the trained demo build. Then, in one run:

* the pipeline (`quantmill run`, fresh state folder): merge, calibrate, rtn-w4g128, bnb-nf4, bnb-int8,
  gptq-w4g128, evaluation (speed off: the reference has none), registration; then the same profile again (cached);
* the direct reference, one fresh process per step: peft merge_and_unload + save, bitsandbytes nf4 and int8
  load + save, GPTQModel quantize + save, and a plain perplexity loop over the merged model and each variant.

Prints the ratios and their goals: wall (pipeline cold / sum of the direct steps) ≤ 1.3, peak RSS (pipeline /
largest direct step, each the peak of its whole process tree: the command's RSS plus its descendants' private pages,
the Prefect server included) ≤ 1.25, disk (state folder / (merged model + one copy of each checkpoint)) ≤ 1.1, plan error
per step (|`quantmill plan` peak - measured step peak| / measured) ≤ 25 %, and cached rerun / cold (no goal).
Exits 1 when a ratio misses its goal; the last line is the one-line summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MiB = 2**20
SIZES = {"full": {"hidden": 1024, "layers": 16, "intermediate": 2816, "vocab": 32000, "calib": (32, 256),
                  "eval": (8192, 512)},
         "small": {"hidden": 512, "layers": 8, "intermediate": 1408, "vocab": 8000, "calib": (32, 128),
                   "eval": (4096, 256)}}
GOALS = {"wall": 1.3, "rss": 1.25, "disk": 1.1, "plan": 0.25}
RECIPES = [{"method": "rtn", "bits": 4, "group_size": 128}, {"method": "bnb-nf4"}, {"method": "bnb-int8"},
           {"method": "gptq", "bits": 4, "group_size": 128}]

# One direct-library step per process; prints {"peak": VmHWM bytes} as its last line.
DIRECT = r"""
import json, math, os, re, sys
from pathlib import Path
import torch
args = json.loads(sys.argv[1])
step, merged = args["step"], args["merged"]
def hwm():
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
def ids(path, n):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args["base"])  # merge_and_unload saves no tokenizer
    return torch.tensor(tok(Path(path).read_text(), add_special_tokens=False)["input_ids"][:n])
if step == "merge":
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, args["adapter"]).merge_and_unload().save_pretrained(merged)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(args["base"]).save_pretrained(merged)  # GPTQModel.load reads it
elif step in ("bnb-nf4", "bnb-int8"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    qc = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]) if step == "bnb-int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             llm_int8_skip_modules=["lm_head"]))
    AutoModelForCausalLM.from_pretrained(merged, quantization_config=qc, dtype=torch.bfloat16,
                                         device_map={"": "cpu"}).save_pretrained(args["out"])
elif step == "gptq":
    from gptqmodel import GPTQModel, QuantizeConfig
    n, seq = args["calib"]
    rows = ids(args["calib_text"], n * seq).view(n, seq)
    model = GPTQModel.load(merged, QuantizeConfig(bits=4, group_size=128, device="cpu"), dtype=torch.bfloat16)
    model.quantize([{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows], batch_size=1,
                   backend="gptq_torch")
    model.save(args["out"])
elif step == "perplexity":
    import gc
    from transformers import AutoModelForCausalLM
    tokens, window = args["eval"]
    x = ids(args["eval_text"], tokens)
    windows = x[: x.numel() // window * window].view(-1, window)
    for path in args["models"]:
        model = AutoModelForCausalLM.from_pretrained(path, device_map={"": "cpu"}).eval()  # dtype: the saved one
        nll = 0.0
        with torch.no_grad():
            for w in windows.split(1):
                nll += model(input_ids=w, labels=w).loss.item()
        print(path, math.exp(nll / windows.shape[0]), file=sys.stderr)
        del model
        gc.collect()
print(json.dumps({"peak": hwm()}))
"""


def build_model(folder: Path, size: dict, tokenizer_from: Path, shards: int = 3) -> Path:
    """Random bf16 Llama of `size` in `shards` safetensors files, with the demo tokenizer (cached: DONE marker)."""
    import torch
    from safetensors.torch import save_file

    from quantmill.weights import config_weights

    if (folder / "DONE").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    h, n = size["hidden"], size["layers"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": size["intermediate"], "num_hidden_layers": n, "num_attention_heads": h // 64,
           "num_key_value_heads": h // 64, "head_dim": 64, "vocab_size": size["vocab"], "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 3}
    shapes = {k: s for k, (_, s) in config_weights(cfg).tensors.items()}
    shapes.update({f"model.layers.{i}.{k}.weight": (h,) for i in range(n)
                   for k in ("input_layernorm", "post_attention_layernorm")} | {"model.norm.weight": (h,)})
    gen = torch.Generator().manual_seed(0)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    folder.mkdir(parents=True)
    groups, current, used = [], {}, 0
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * 0.02 if len(shape) == 2 else torch.ones(shape)
        current[name], used = t.to(torch.bfloat16), used + t.numel() * 2
        if used >= total / shards * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = {}
    groups.append(current)
    weight_map = {}
    for i, tensors in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy2(f, folder / f.name)
    (folder / "DONE").write_text("")
    return folder


def env_for(home: Path) -> dict[str, str]:
    """A clean environment: the state folder `home`, no MLflow/Prefect servers, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    return {**env, "QUANTMILL_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def tree_memory(pid: int) -> dict[int, int]:
    """{pid: bytes} of process `pid` (its RSS) and of each descendant (its USS: the pages only it holds), now.

    A descendant's shared pages are the command's own or libraries' files: counted once, in the command's RSS. Its
    private pages, all the work it does, are counted. A child not yet exec'd (its parent's command line: the
    instant between `subprocess`'s vfork and exec, e.g. `git rev-parse` for the MLflow run) is the parent's
    address space itself, whose pages its USS would count a second time: skipped."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            if p.pid == pid:
                out[p.pid] = p.memory_info().rss
            elif p.cmdline() != p.parent().cmdline():
                out[p.pid] = p.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):  # gone, or its parent gone (None)
            pass
    return out


def parts(main: int, rss: dict[int, int]) -> dict[str, int]:
    """Memory by role: the command itself, the Prefect server (and its watchdog), other processes."""
    import psutil

    out: dict[str, int] = {}
    for pid, n in rss.items():
        try:
            line = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            line = ""
        role = ("main" if pid == main else "prefect server" if "uvicorn" in line or "parent, server" in line
                else "other processes")
        out[role] = out.get(role, 0) + n
    return out


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, dict[str, int], str]:
    """(wall seconds, peaks, output) of one command; exits on failure. Peaks: `tree`, the largest memory of the
    command's whole process tree (its RSS + every descendant's USS: the Prefect server, forks, workers), sampled every
    50 ms; `main`, the command's own peak RSS (ru_maxrss via wait4 covers only the largest single process)."""
    import threading

    start, peaks, done = time.perf_counter(), {"tree": 0, "main": 0, "parts": {}}, threading.Event()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.wait(0.05):
                now = tree_memory(proc.pid)
                if sum(now.values()) > peaks["tree"]:
                    peaks["tree"], peaks["parts"] = sum(now.values()), parts(proc.pid, now)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    proc.returncode, wall, out = os.waitstatus_to_exitcode(status), time.perf_counter() - start, log.read_text()
    peaks["main"] = usage.ru_maxrss * 1024
    peaks["tree"] = max(peaks["tree"], peaks["main"])  # a spike between samples
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, peaks, out


def tree_bytes(root: Path, pattern: str = "*") -> int:
    """Bytes of the files under `root` (matching top-level `pattern`), each inode counted once (hardlinks)."""
    seen, total = set(), 0
    for top in root.glob(pattern):
        for p in [top] if top.is_file() else top.rglob("*"):
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def run_pipeline(work: Path, model: Path, adapter: Path, demo, size: dict) -> dict:
    """Cold and cached `quantmill run` of the benchmark profile in a fresh state folder; wall, peak, step peaks."""
    import yaml

    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    (n, seq), (tokens, window) = size["calib"], size["eval"]
    profile = {"name": "scale", "model": {"path": str(model)}, "adapter": {"path": str(adapter)},
               "calibration": {"source": {"path": str(demo.calib_path)}, "num_samples": n, "seq_len": seq},
               "recipes": RECIPES,
               "evaluation": {"source": {"path": str(demo.eval_path)}, "max_tokens": tokens, "window": window,
                              "speed": {"enabled": False}, "batch_size": 1,  # as the reference loop
                              "gates": {"max_ppl_increase_pct": 1000}},
               "registry": {"model_name": "scale-bench"}, "storage": {"root": str(home / "artifacts")}}
    path = work / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    cmd = [sys.executable, "-m", "quantmill.flows.cli", "run", str(path)]
    wall, peak, out = timed(cmd, env_for(home), work / "pipeline.log")
    cached, _, _ = timed(cmd, env_for(home), work / "pipeline-cached.log")
    debug = Path(re.search(r"debug log \(third-party output\): (\S+)", out).group(1)).read_text()  # step lines
    steps = {s: int(m) * MiB for s, m in re.findall(r"memory: step (\S+) peak RSS (\d+) MiB", debug)}
    objects = home / "artifacts" / "objects"
    ideal = tree_bytes(objects, "merge-*") + tree_bytes(objects, "quantize-*")
    return {"wall": wall, "cached": cached, "peak": peak, "steps": steps, "disk": tree_bytes(home), "ideal": ideal,
            "profile": path, "objects": objects}


def run_direct(work: Path, model: Path, adapter: Path, demo, size: dict, rtn_ckpt: Path | None) -> dict:
    """Each direct-library step in its own process: {step: (wall, peak)}."""
    merged = work / "direct" / "merged"
    shutil.rmtree(work / "direct", ignore_errors=True)
    common = {"merged": str(merged), "base": str(model), "adapter": str(adapter), "calib": size["calib"],
              "eval": size["eval"], "calib_text": str(demo.calib_path), "eval_text": str(demo.eval_path)}
    out: dict[str, tuple[float, int]] = {}
    plan = [("merge", {}), ("bnb-nf4", {"out": str(work / "direct" / "nf4")}),
            ("bnb-int8", {"out": str(work / "direct" / "int8")}), ("gptq", {"out": str(work / "direct" / "gptq")})]
    models = [str(merged), str(work / "direct" / "nf4"), str(work / "direct" / "int8"), str(work / "direct" / "gptq")]
    plan.append(("perplexity", {"models": models + ([str(rtn_ckpt)] if rtn_ckpt else [])}))
    for step, extra in plan:
        cmd = [sys.executable, "-c", DIRECT, json.dumps({**common, **extra, "step": step})]
        wall, peaks, _ = timed(cmd, env_for(work / "direct-home"), work / f"direct-{step}.log")
        out[step] = (wall, peaks["tree"])
        print(f"  direct {step:10s} {wall:7.1f} s  peak {out[step][1] / MiB:7.0f} MiB", flush=True)
    return out


def plan_peaks(profile_path: Path) -> dict[str, int]:
    """`quantmill plan`'s peak per step (process baseline included), for this machine."""
    from quantmill.machine import this_machine
    from quantmill.plan import plan_profile, step_peaks
    from quantmill.profile_io import load_profile

    profile = load_profile(str(profile_path), [])
    return step_peaks(plan_profile(profile, this_machine(profile.storage.root)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a ≈ 34 M-parameter model (a few minutes)")
    parser.add_argument("--cache", type=Path, default=REPO / ".quantmill" / "bench-scale", help="model cache")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (state folder, logs)")
    args = parser.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from benchmarks.merge import synthetic_adapter
    from quantmill.demo import build_demo_assets
    from tests.conftest import model_cache

    label = "small" if args.small else "full"
    size = SIZES[label]
    demo = build_demo_assets(model_cache(), arch="llama", with_adapter=False)
    model = build_model(args.cache / label / "model", size, demo.model_dir)
    adapter = args.cache / label / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        synthetic_adapter(adapter, model, r=16)
    from quantmill.weights import folder_weights

    print(f"model: {folder_weights(model).params / 1e6:.0f} M parameters, bf16, "
          f"{len(list(model.glob('*.safetensors')))} shards; adapter rank 16", flush=True)
    work = Path(tempfile.mkdtemp(prefix=f"quantmill-scale-{label}-"))
    pipe = run_pipeline(work, model, adapter, demo, size)
    print(f"  pipeline cold {pipe['wall']:7.1f} s  peak {pipe['peak']['tree'] / MiB:7.0f} MiB (process tree: "
          + ", ".join(f"{k} {v / MiB:.0f}" for k, v in pipe['peak']['parts'].items())
          + f"; main process alone {pipe['peak']['main'] / MiB:.0f} MiB); cached {pipe['cached']:.1f} s", flush=True)
    planned = plan_peaks(pipe["profile"])
    errors = {s: abs(planned[s] - got) / got for s, got in pipe["steps"].items() if s in planned}
    for s, got in pipe["steps"].items():
        print(f"  step {s:22s} measured {got / MiB:7.0f} MiB  plan {planned.get(s, 0) / MiB:7.0f} MiB  "
              f"error {100 * errors.get(s, float('nan')):5.1f} %")
    sys.stdout.flush()
    rtn = next((d for d in sorted(pipe["objects"].glob("quantize-*")) if (d / "quantmill.json").is_file()
                and json.loads((d / "quantmill.json").read_text())["method"] == "rtn"), None)  # scored directly too
    direct = run_direct(work, model, adapter, demo, size, rtn)
    ratios = {"wall": pipe["wall"] / sum(w for w, _ in direct.values()),
              "rss": pipe["peak"]["tree"] / max(p for _, p in direct.values()),
              "disk": pipe["disk"] / max(pipe["ideal"], 1),
              "plan": max(errors.values(), default=float("inf"))}
    worst = max(errors, key=errors.get) if errors else "-"
    print(f"  disk: state folder {pipe['disk'] / MiB:.0f} MiB, merged + one copy of each checkpoint "
          f"{pipe['ideal'] / MiB:.0f} MiB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"  kept {work}")
    missed = [k for k, v in ratios.items() if not v <= GOALS[k]]
    print(f"{label}: wall {ratios['wall']:.2f} (≤{GOALS['wall']}), peak RSS {ratios['rss']:.2f} (≤{GOALS['rss']}), "
          f"disk {ratios['disk']:.2f} (≤{GOALS['disk']}), plan error max {100 * ratios['plan']:.0f} % at {worst} "
          f"(≤{100 * GOALS['plan']:.0f} %), cached/cold {pipe['cached'] / pipe['wall']:.3f}"
          f"{'; MISSED: ' + ', '.join(missed) if missed else '; all goals met'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
