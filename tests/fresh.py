"""New processes for the tests' helper scripts and `quantmill` runs, forked from a template interpreter that has
imported torch, transformers' model classes and MLflow, and nothing of quantmill or Prefect.

A helper script proves that a checkpoint loads without anything of the process that wrote it: each ran in a new
`python -c` and paid ≈ 7 s of CPU importing torch and transformers' modeling code before its first line (measured
2026-12-03: 11 such scripts in a suite run). A `quantmill run` whose steps come from the cache spends ≈ 5 of its ≈ 9 s
of CPU importing torch and MLflow (≈ 25 CLI runs a suite run). A child forked from the template starts with those
modules in memory, and with nothing else: the template never imports quantmill or Prefect (whose settings and
logging read the run's environment at import), never runs a torch operation (so no OpenMP thread pool exists when it
forks) and starts no thread of its own. A CLI child runs `python -m quantmill.flows.cli` as the interpreter would
(`runpy`, `sys.path[0]` the working folder) and ends as the interpreter does (non-daemon threads joined, `atexit`
handlers run). Each test process starts its template on first use and stops it at exit.

What a forked child cannot show stays a real interpreter: what a process imports or its memory (probes), output at
import time (the demo's console, read by the console tests), an environment torch or transformers read at import
other than the test session's (a consumer's bare environment, the compiled step-release check), signals and process
trees (crash safety), mounts (read-only storage)."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# The template: imports, then forks one child per request line on stdin, answering on its own copy of stdout
# ({"pid"} when the child started, {"status"} when it ended). The child takes the request's working folder,
# environment, argv and output files, then runs the script as `python -c` would, or the module as `python -m` would
# (`__main__`; exit status 1 and a traceback on an exception), and ends as the interpreter does.
TEMPLATE = r"""
import atexit, json, os, runpy, sys, tempfile, threading, traceback
import torch, transformers, mlflow
from transformers import AutoModelForCausalLM, AutoTokenizer, modeling_utils
assert not [m for m in sys.modules if m.split(".")[0] in ("quantmill", "prefect")], "the template imported quantmill"
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(reply.fileno())
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            tempfile.tempdir = None  # read from TMPDIR again, as a new interpreter would
            try:
                if "module" in req:
                    sys.argv = ["-m", *req["args"]]  # run_module puts the module's path in argv[0]
                    sys.path[0] = req["cwd"]
                    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = ["-c", *req["args"]]
                    exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
                status = 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (exc.code is not None)
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            threading._shutdown()  # the interpreter's exit: non-daemon threads, then atexit handlers
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    reply.write(json.dumps({"pid": pid}) + "\n")
    reply.flush()
    _, code = os.waitpid(pid, 0)
    reply.write(json.dumps({"status": os.waitstatus_to_exitcode(code)}) + "\n")
    reply.flush()
"""

_lock = threading.Lock()
_template: dict[str, subprocess.Popen] = {}


def _started() -> subprocess.Popen:
    """This process's template (started on first use, in this process's environment)."""
    proc = _template.get("proc")
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen([sys.executable, "-c", TEMPLATE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        _template["proc"] = proc
        atexit.register(_stop, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _answer(proc: subprocess.Popen, timeout: float) -> dict:
    """The template's next reply line, or TimeoutExpired."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got:
        raise subprocess.TimeoutExpired("template", timeout)
    if not got[0]:
        raise RuntimeError(f"the script template exited with {proc.wait()}")
    return json.loads(got[0])


def run_script(code: str, *args: str, timeout: float, cwd: Path | str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` (a `python_script` body) with `args` in a new process forked from the template, in this process's
    working folder and environment (or `cwd`, `env`: the child's own; what torch and transformers read at import came
    from this process's); its exit status and output as `subprocess.run(..., capture_output=True, text=True)` returns
    them. On timeout the child is killed and TimeoutExpired raised."""
    from tests.conftest import python_script

    body = python_script(code)[2]  # the same script, quick exit included
    return _run({"code": body, "args": list(args)}, ["template", "-c", code, *args], timeout, cwd, env)


def run_cli(*args: str, timeout: float, cwd: Path | str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m quantmill.flows.cli ARGS` in a new process forked from the template (see the module's docstring), as
    `subprocess.run(..., cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)` would run it."""
    return _run({"module": "quantmill.flows.cli", "args": list(args)},
                ["template", "-m", "quantmill.flows.cli", *args], timeout, cwd, env)


def _run(request: dict, argv: list[str], timeout: float, cwd: Path | str | None,
         env: dict[str, str] | None) -> subprocess.CompletedProcess:
    with _lock, tempfile.TemporaryDirectory(prefix="quantmill-script-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = _started()
        proc.stdin.write(json.dumps({**request, "env": dict(os.environ if env is None else env),
                                     "cwd": str(cwd or os.getcwd()), "stdout": str(out), "stderr": str(err)}) + "\n")
        proc.stdin.flush()
        pid = _answer(proc, 60)["pid"]
        try:
            status = _answer(proc, timeout)["status"]
        except subprocess.TimeoutExpired:
            os.killpg(pid, 9)
            _answer(proc, 60)
            raise
        return subprocess.CompletedProcess(argv, status, out.read_text(errors="replace"), err.read_text(errors="replace"))
