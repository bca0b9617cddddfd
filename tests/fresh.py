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

A child is a process of its own session with its own pid, signals, children and memory: the crash-safety runs
(SIGKILL, SIGTERM, two at once) and the GPTQ peak-memory probes (growth above what the child held after its imports)
use it as they used `subprocess.Popen`. What a forked child cannot show stays a real interpreter: what a process
imports, output at import time (the demo's console, read by the console tests), an environment torch, transformers
or MLflow read at import other than the test session's (a consumer's bare environment, the compiled step-release
check), a whole run's memory (test_variant_memory), mounts (read-only storage)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The template: imports, then forks one child per request line on stdin and answers {"pid"} on its own copy of
# stdout; when a child ends, its exit status goes to the request's status file (written by the SIGCHLD handler, so
# that several children may run at once). The child takes the request's working folder, environment, argv and output
# files, then runs the script as `python -c` would, or the module as `python -m` would (`__main__`; exit status 1 and
# a traceback on an exception), and ends as the interpreter does.
TEMPLATE = r"""
import atexit, json, os, runpy, signal, sys, tempfile, threading, traceback
import torch, transformers, mlflow
from transformers import AutoModelForCausalLM, AutoTokenizer, modeling_utils
assert not [m for m in sys.modules if m.split(".")[0] in ("quantmill", "prefect")], "the template imported quantmill"
reply = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
status_files = {}

def reap(*_):
    while True:
        try:
            pid, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = status_files.pop(pid)
        with open(path + ".tmp", "w") as fh:
            fh.write(str(os.waitstatus_to_exitcode(code)))
        os.rename(path + ".tmp", path)

signal.signal(signal.SIGCHLD, reap)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # reap() must find the pid's status file
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
            os.close(reply.fileno())
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), 1)
            os.dup2(1 if req["stderr"] == req["stdout"] else
                    os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), 2)
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
    status_files[pid] = req["status"]
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    reply.write(json.dumps({"pid": pid}) + "\n")
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


class Forked:
    """A child of the template, used as a `subprocess.Popen` is (pid, poll, wait, send_signal, kill, communicate;
    returncode negative for a signal). Its output goes to files: `stdout` (a path, else one it reads back in
    `communicate`) and `stderr` (a path, `subprocess.STDOUT`, else one of its own)."""

    def __init__(self, request: dict, argv: list[str], *, cwd: Path | str | None = None,
                 env: dict[str, str] | None = None, stdout: Path | None = None, stderr: Path | int | None = None):
        self.args = argv
        self.returncode: int | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="quantmill-forked-"))
        self._out = Path(stdout) if stdout is not None else self._tmp / "stdout"
        self._err = self._out if stderr == subprocess.STDOUT else Path(stderr) if stderr else self._tmp / "stderr"
        self._status = self._tmp / "status"
        with _lock:
            proc = _started()
            proc.stdin.write(json.dumps({**request, "env": dict(os.environ if env is None else env),
                                         "cwd": str(cwd or os.getcwd()), "stdout": str(self._out),
                                         "stderr": str(self._err), "status": str(self._status)}) + "\n")
            proc.stdin.flush()
            self.pid = _answer(proc, 60)["pid"]

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait (on timeout: kill its process group, then raise TimeoutExpired); its output, as text."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, 9)
            self.wait(60)
            raise
        out = self._out.read_text(errors="replace") if self._out.parent == self._tmp else None
        err = self._err.read_text(errors="replace") if self._err.parent == self._tmp else None
        shutil.rmtree(self._tmp, ignore_errors=True)
        return out, err


def start_script(code: str, *args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
                 **output) -> Forked:
    """`code` (a `python_script` body) with `args` in a new process forked from the template, in this process's working
    folder and environment (or `cwd`, `env`: the child's own; what torch, transformers and MLflow read at import came
    from this process's)."""
    from tests.conftest import python_script

    body = python_script(code)[2]  # the same script, quick exit included
    return Forked({"code": body, "args": list(args)}, ["template", "-c", code, *args], cwd=cwd, env=env, **output)


def start_cli(*args: str, cwd: Path | str, env: dict[str, str], **output) -> Forked:
    """`python -m quantmill.flows.cli ARGS` in a new process forked from the template (see the module's docstring)."""
    return Forked({"module": "quantmill.flows.cli", "args": list(args)}, ["template", "-m", "quantmill.flows.cli", *args],
                  cwd=cwd, env=env, **output)


def finished(proc: Forked, timeout: float) -> subprocess.CompletedProcess:
    """What `subprocess.run(..., capture_output=True, text=True, timeout=timeout)` returns for `proc`."""
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_script(code: str, *args: str, timeout: float, cwd: Path | str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`start_script`, run to its end as `subprocess.run(..., capture_output=True, text=True)` runs a command."""
    return finished(start_script(code, *args, cwd=cwd, env=env), timeout)


def run_cli(*args: str, timeout: float, cwd: Path | str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`start_cli`, run to its end as `subprocess.run(..., capture_output=True, text=True)` runs a command."""
    return finished(start_cli(*args, cwd=cwd, env=env), timeout)
