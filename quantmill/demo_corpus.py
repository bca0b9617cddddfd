"""The demo's texts: Python's own documentation (`pydoc_data.topics`) split into train, calibration, evaluation and
adapter topics, deterministically (no topic of the evaluation text is in the others)."""

from __future__ import annotations

import hashlib
import json

_EVAL_FRACTION = 0.15
_CALIB_FRACTION = 0.10
_ADAPTER_FRACTION = 0.10


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


def join_topics(keys: list[str]) -> str:
    """Concatenate topic texts separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in keys) + "\n"


def demo_text_splits() -> dict[str, str]:
    """Return the train, calib and eval texts (eval shares no topic with train or calib)."""
    keys = demo_topic_keys()
    return {name: join_topics(keys[name]) for name in ("train", "calib", "eval")}


def corpus_digest() -> str:
    """Digest of the corpus, so a changed Python stdlib invalidates the cache."""
    from pydoc_data.topics import topics

    return hashlib.sha256(json.dumps(topics, sort_keys=True).encode("utf-8")).hexdigest()
