"""Evaluate step: perplexity, agreement with the baseline, speed, memory and accuracy of every model; gates.

The tasks and their cache policies; the measurements are the core's (quantmill.windows, quantmill.scoring,
quantmill.speed, quantmill.memory, quantmill.accuracy, quantmill.gates).
"""

from __future__ import annotations

from prefect import task

from quantmill.context import StepContext
from quantmill.errors import retry_on_transient
from quantmill.gates import judge
from quantmill.profile import Evaluation
from quantmill.refs import CheckpointRef, EvalDataRef, EvalRef, ModelRef, Verdict
from quantmill.scoring import baseline_reference, score, settings
from quantmill.store import ArtifactStore
from quantmill.tasks._cache import StepCache
from quantmill.tasks._gpu import holding_gpu
from quantmill.windows import TOKENS_FILE, make_windows

CODE_VERSION = "3"  # 3: .txt read as one document, rows joined with "\n\n" by default


def _data_inputs(inputs: dict) -> dict:
    """Only what shapes the windows keys them (gates and measurement settings do not)."""
    spec = inputs["spec"]
    inputs["spec"] = {k: getattr(spec, k) for k in ("source", "max_tokens", "window", "stride")}
    return inputs


EVAL_DATA_CACHE = StepCache(step="eval-data", code_version=CODE_VERSION, ignore=("device",), normalize=_data_inputs)


@task(name="eval-data", retries=2, retry_condition_fn=retry_on_transient, cache_policy=EVAL_DATA_CACHE,
      persist_result=True)
def eval_data(model: ModelRef, spec: Evaluation, *, ctx: StepContext) -> EvalDataRef:
    """Tokenize held-out text into the windows every model is scored on."""
    key = EVAL_DATA_CACHE.key_for(locals())  # the bound arguments, as Prefect's cache key sees them
    art = ArtifactStore(ctx.store_root).get_or_build(key, lambda out: make_windows(model, spec, out))
    r = art.record
    return EvalDataRef(
        path=str(art.path / TOKENS_FILE), digest=art.digest, window=r["window"], tokens=r["tokens"],
        source=spec.source.label, store_key=key, stride=r["stride"], windows=r["windows"],
        preparation=r.get("preparation", spec.source.preparation),
    )


def _evaluate_inputs(inputs: dict) -> dict:
    """The cache key sees the measurement settings of the spec, not its gates."""
    inputs["spec"] = settings(inputs.get("spec"))
    return inputs


EVALUATE_CACHE = StepCache(step="evaluate", code_version=CODE_VERSION, normalize=_evaluate_inputs)


@task(name="evaluate", retries=1, retry_condition_fn=retry_on_transient, cache_policy=EVALUATE_CACHE,
      persist_result=True)
def evaluate(
    target: ModelRef | CheckpointRef, data: EvalDataRef, *, ctx: StepContext,
    baseline: EvalRef | None = None, spec: Evaluation | None = None,
) -> EvalRef:
    """Score one model on the shared windows; with `baseline`, also KL/agreement against its saved log-probs."""
    key = EVALUATE_CACHE.key_for(locals())  # the bound arguments, as Prefect's cache key sees them
    cfg, device = settings(spec), ctx.device
    reference = baseline_reference(baseline, data, ctx.store_root) if baseline is not None else None
    art = ArtifactStore(ctx.store_root).get_or_build(key, holding_gpu(device, lambda out: score(
        target.path, data, device=device, cfg=cfg, baseline=baseline, reference=reference, out=out)))
    is_variant = isinstance(target, CheckpointRef)
    return EvalRef(
        name=target.name if is_variant else "baseline",
        method=target.method if is_variant else "none",
        path=target.path, metrics=art.record["metrics"], eval_digest=data.digest, store_key=key,
        data=data.description(),
    )


@task(name="gate", cache_policy=StepCache(step="gate", code_version=CODE_VERSION, verifier=None), persist_result=True)
def gate(ckpt: CheckpointRef, result: EvalRef, *, baseline: EvalRef, spec: Evaluation) -> Verdict:
    """Apply the quality gates to one variant."""
    return judge(ckpt, result, baseline=baseline, spec=spec)
