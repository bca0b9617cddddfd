"""The console is ours: step lines, warnings and the table; third-party output goes to the run's debug log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

# Lines that come from other libraries, never from quantmill (the list, plus Prefect's own log format).
THIRD_PARTY = re.compile(
    r"GPT-?QModel|^INFO  |^WARN  |gptq_log|awq_log|FutureWarning|DeprecationWarning|UserWarning|torchao|"
    r"Failed to load|bitsandbytes|recompil|torch\._dynamo|Loading weights|\| (INFO|WARNING|ERROR) +\||"
    r"temporary server|Token indices|warnings\.warn"
)


def test_run_console_routes_fds_and_keeps_our_lines(tmp_path):
    """C-level writes, print, warnings and foreign loggers reach the log; `say` reaches the terminal."""
    script = textwrap.dedent("""
        import logging, os, sys, warnings
        from quantmill.console import say
        from quantmill.flows.console import run_console
        with run_console() as log:
            os.write(1, b"c-level stdout\\n")
            os.write(2, b"c-level stderr\\n")
            print("python print")
            warnings.warn("a FutureWarning from a library", FutureWarning)
            logging.getLogger("torchao").warning("Failed to load libfoo.so")
            logging.getLogger("torch._dynamo").warning("torch._dynamo hit config.recompile_limit (8)")
            logging.getLogger("quantmill.store").warning("artifact x is damaged; recomputing")
            say("ours: step done")
        print("LOG", log)
    """)
    home = tmp_path / "home"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(home),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["  warning: artifact x is damaged; recomputing", "ours: step done"], out.stdout
    log = Path(lines[-1].removeprefix("LOG "))
    assert log.parent == home / "logs" and out.stderr == ""
    text = log.read_text()
    for piece in ("c-level stdout", "c-level stderr", "python print", "a FutureWarning from a library",
                  "Failed to load libfoo.so", "recompile_limit"):
        assert piece in text, text


@pytest.mark.slow
def test_demo_console_is_short_and_ours(demo_run):
    home, out = demo_run.home, demo_run.out
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) <= 80, "\n".join(lines)
    foreign = [ln for ln in lines if THIRD_PARTY.search(ln)]
    assert not foreign, foreign
    for step in ("calibrate", "quantize", "evaluate", "register"):
        assert re.search(rf"^  \d\d:\d\d:\d\d  {step}\s+done\s+\d+\.\d s", out.stdout, re.M), step
    assert re.search(r"│ gptq-w4g64 ", out.stdout) and "MLflow run:" in out.stdout
    log = Path(re.search(r"debug log \(third-party output\): (\S+)", out.stdout).group(1))
    assert log.parent == home / "logs"
    text = log.read_text()
    for piece in ("GPT-QModel", "torchao", "FutureWarning", "bitsandbytes", "Finished in state", "temporary server"):
        assert piece in text, piece
    assert list((home / "logs" / "gptqmodel").glob("gptq_log_*.log"))  # GPTQModel's own log folder, in the state


@pytest.mark.slow
def test_demo_run_leaves_the_working_directory_empty(demo_run):
    assert demo_run.out.returncode == 0
    assert os.listdir(demo_run.cwd) == []


@pytest.mark.slow
def test_verbose_shows_third_party_lines_live(demo_rerun):
    out = demo_rerun.out
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Finished in state Cached" in out.stdout + out.stderr  # Prefect's own lines, live
    assert re.search(r"quantize\s+cached", out.stdout)
    assert os.listdir(demo_rerun.cwd) == []


def test_progress_bar_redrawn_in_place_and_cleared_by_a_step_line(monkeypatch):
    import io

    from quantmill import console

    buf = io.StringIO()
    monkeypatch.setattr(console, "_stream", buf)
    monkeypatch.setattr(console, "_bar_on", True)
    console.progress("evaluate", 3, 12, "windows")
    assert buf.getvalue() == "\r\x1b[K  evaluate   [" + "█" * 7 + "░" * 23 + "] 3/12 windows"
    console.say("  12:00:00  evaluate   done")
    assert buf.getvalue().endswith("\r\x1b[K  12:00:00  evaluate   done\n")
    monkeypatch.setattr(console, "_bar_on", False)  # not a terminal: no bar at all
    before = buf.getvalue()
    console.progress("evaluate", 4, 12, "windows")
    assert buf.getvalue() == before
