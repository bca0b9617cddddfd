"""User-facing errors: one line that names the field or file and says what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class QuantmillError(ValueError):
    """A bad input or environment problem; printed as one line, exit code 2, never retried."""

    exit_code = 2


class ProfileError(QuantmillError):
    """The run profile is invalid (file, field path, reason)."""


class PreflightError(QuantmillError):
    """The machine cannot run a step (disk, memory, device); says what is needed."""


def first_error(exc: ValidationError) -> tuple[str, str, str]:
    """(dotted field location, message without pydantic's "Value error, " prefix, error type) of the first problem;
    callers word their own hints (unknown key, missing field) on top."""
    err = exc.errors()[0]
    return ".".join(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, "), err["type"]


class NetworkError(ConnectionError):
    """A transient network failure that a retry may cure."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying (network, server 5xx/429), False for deterministic ones."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, QuantmillError):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if type(exc).__name__ in {"ConnectTimeout", "ReadTimeout", "ConnectionError", "Timeout"}:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_on_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's signature
    """Prefect `retry_condition_fn`: retry only transient (network) failures."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify it
        return is_transient(exc)
    return False
