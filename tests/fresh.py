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
handlers run). The session has one template (≈ 8 s of CPU to start): pytest-xdist's controller starts it at
session start, beside its workers, and each worker's requests go to a handler forked for its connection (a unix
socket); a process without a controller starts its own on first use.

A child is a process of its own session with its own pid, signals, children and memory: the crash-safety runs
(SIGKILL, SIGTERM, two at once), the GPTQ peak-memory probes (growth above what the child held after its imports)
and the run whose memory per variant is measured (what the template holds, a run imports anyway) use it as they used
`subprocess.Popen`. What a forked child cannot show stays a real interpreter: what a process
imports, output at import time (the demo's console, read by the console tests), an environment torch, transformers
or MLflow read at import other than the test session's (a consumer's bare environment, the compiled step-release
check), mounts (read-only storage)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The template: imports, then serves connections on a unix socket (its path: argv[1]), each in a forked handler
# that forks one child per request line and answers {"pid"}; when a child ends, its exit status goes to the request's
# status file (written by the handler's SIGCHLD handler, so that several children may run at once). The child takes
# the request's working folder, environment, argv and output files, then runs the script as `python -c` would, or
# the module as `python -m` would (`__main__`; exit status 1 and a traceback on an exception), and ends as the
# interpreter does.
TEMPLATE = r"""
import atexit, json, os, runpy, signal, socket, sys, tempfile, threading, traceback
import torch, transformers, mlflow
from transformers import AutoModelForCausalLM, AutoTokenizer, modeling_utils
ours = sorted({m.split(".")[0] for m in sys.modules} & {"quantmill", "prefect"})
assert not ours, f"the template imported {ours}"

def run(req):
    status = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        os.setsid()
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
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

def serve(conn):
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
    requests, reply = conn.makefile("r"), conn.makefile("w")
    for line in requests:
        req = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # reap() must find the pid's status file
        pid = os.fork()
        if pid == 0:
            conn.close()
            os.close(requests.fileno())
            run(req)
        status_files[pid] = req["status"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()

server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen(16)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers: reaped by the kernel
sys.stdout.flush()
sys.stderr.flush()
while True:
    conn, _ = server.accept()
    if os.fork() == 0:
        server.close()
        serve(conn)
        os._exit(0)
    conn.close()
"""

SOCKET_VAR = "QUANTMILL_TEST_TEMPLATE"  # the session's template: its socket, chosen by the first pytest process
_lock = threading.Lock()
_owned: dict[str, object] = {}


def reserve_socket() -> str:
    """The path of the session's template socket: chosen by the first pytest process (the pytest-xdist controller, or
    the only process), inherited by its workers (pytest_configure)."""
    if SOCKET_VAR not in os.environ:
        os.environ[SOCKET_VAR] = str(Path(tempfile.mkdtemp(prefix="quantmill-template-")) / "socket")
    return os.environ[SOCKET_VAR]


def start_template() -> None:
    """Start the session's template (its owner: the controller at session start, beside its workers; or the only
    process, on first use); its own output goes to a log beside the socket."""
    path = Path(reserve_socket())
    with open(path.parent / "template.log", "ab") as log:
        _owned["proc"] = subprocess.Popen([sys.executable, "-c", TEMPLATE, str(path)], stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, start_new_session=True)


def stop_template() -> None:
    """Stop the template this process started (its handlers end with their connections) and remove its folder."""
    proc = _owned.pop("proc", None)
    if isinstance(proc, subprocess.Popen):
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(Path(reserve_socket()).parent, ignore_errors=True)


def _connection() -> tuple[object, object]:
    """This process's connection to the session's template: (requests, replies) files; waits while it starts."""
    if "conn" not in _owned:
        if os.environ.get("PYTEST_XDIST_WORKER") is None and "proc" not in _owned:  # no controller: this process owns it
            start_template()
            atexit.register(stop_template)
        deadline = time.monotonic() + 600
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(reserve_socket())
                break
            except OSError:
                sock.close()
                proc = _owned.get("proc")
                if time.monotonic() > deadline or (isinstance(proc, subprocess.Popen) and proc.poll() is not None):
                    log = Path(reserve_socket()).parent / "template.log"
                    raise RuntimeError("the test template did not start: " + (
                        log.read_text(errors="replace")[-3000:] if log.exists() else "no log")) from None
                time.sleep(0.2)
        sock.settimeout(600)
        _owned["conn"] = (sock, sock.makefile("w"), sock.makefile("r"))
    return _owned["conn"][1:]


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
            requests, replies = _connection()
            requests.write(json.dumps({**request, "env": dict(os.environ if env is None else env),
                                       "cwd": str(cwd or os.getcwd()), "stdout": str(self._out),
                                       "stderr": str(self._err), "status": str(self._status)}) + "\n")
            requests.flush()
            reply = replies.readline()
            if not reply:
                raise RuntimeError("the test template closed its connection")
            self.pid = json.loads(reply)["pid"]

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
            if self._tmp not in (self._out.parent, self._err.parent):  # no output of its own to read back
                shutil.rmtree(self._tmp, ignore_errors=True)
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
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait (on timeout: kill its process group, then raise TimeoutExpired); its output, as text."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
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
    from the session's)."""
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
