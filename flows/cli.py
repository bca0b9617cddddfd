"""The `quantmill` command line: run, validate, demo (and report/pull/generate/plan)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantmill import state
from quantmill.errors import NetworkError, QuantmillError

if TYPE_CHECKING:
    from rich.table import Table

    from quantmill.machine import Machine
    from quantmill.plan import StepPlan

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


class _OneLineErrors(logging.Filter):
    """Keep Prefect's console free of tracebacks for user errors (the CLI prints one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, QuantmillError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_user_errors() -> None:
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_OneLineErrors())


def console():  # noqa: ANN201 - rich.console.Console
    """A rich console (160 columns when not a terminal)."""
    from rich.console import Console

    from quantmill.console import stream

    out = stream()  # the terminal, also while a run sends third-party output to its debug log
    return Console(file=out, width=None if out.isatty() else 160)


def print_summary(summary: Any, states: list[tuple[str, str]], seconds: float) -> None:
    """The final table of variants, step states, and where to look next."""
    from quantmill.report import build_report, rich_table

    out = console()
    report = build_report(summary.rows, baseline=summary.baseline, model_name=summary.model_name,
                          run_id=summary.run_id, notes=summary.notes, evaluation=summary.evaluation)
    out.print(rich_table(report))
    if states:
        cached = sum(1 for _, s in states if s == "Cached")
        out.print(f"steps: {len(states)} task runs, {cached} cached: " + ", ".join(f"{n}={s}" for n, s in states))
    out.print(f"aliases: {summary.aliases}   MLflow run: {summary.run_id}   time: {seconds:.1f} s")
    out.print(f"state folder: {state.home()}")
    for cmd in state.viewer_commands():
        out.print(f"  view: {cmd}")


def task_states(flow_run_id: Any) -> list[tuple[str, str]]:
    """(task name, final state name) of every task run in a flow run and its subflows, in start order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(f.id for f in subflows)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    runs = sorted(runs, key=lambda r: r.expected_start_time or r.created)
    return [(r.name.rsplit("-", 1)[0], r.state.name if r.state else "?") for r in runs]


def run_profile(path: str, overrides: Sequence[str], flow_name: str = "quantize") -> Any:
    """Validate the profile, run the quantize (or sweep) flow, print the summary; returns the RunSummary."""
    from quantmill.profile_io import load_profile

    return run_loaded(load_profile(path, list(overrides)), flow_name)


def run_loaded(profile: Any, flow_name: str = "quantize") -> Any:
    """Run the quantize (or sweep) flow on a validated profile, print the summary; returns the RunSummary."""
    from quantmill.tracking import check_reachable

    check_reachable()
    state.private_scratch()  # library temp folders (GPTQModel offload) under the state folder, swept when dead
    from quantmill.inputs import check_run_inputs

    check_run_inputs(profile)  # bad inputs fail here, before Prefect, its server and MLflow's run start (seconds)
    from quantmill.flows.server import guard_prefect_server

    guard_prefect_server()  # the temporary Prefect server dies with this process, even on kill -9
    _quiet_user_errors()
    from quantmill.flows.pipeline import quantize_pipeline
    from quantmill.flows.sweep import sweep
    from quantmill.memory import freeze_imports

    # torch: what the steps load anyway; collections between steps skip it. Not transformers: a run whose inputs did
    # not change answers its checks from quantmill.memo and never needs transformers' tokenizer or modeling code.
    freeze_imports("torch")
    start = time.time()
    state_ = (sweep if flow_name == "sweep" else quantize_pipeline)(profile, return_state=True)
    summary = state_.result()
    print_summary(summary, task_states(state_.state_details.flow_run_id), time.time() - start)
    return summary


def cmd_run(args: argparse.Namespace) -> int:
    from quantmill.flows.cache_cli import run_command

    return run_command(args, run_loaded)


def cmd_sweep(args: argparse.Namespace) -> int:
    from quantmill.flows.cache_cli import run_command

    return run_command(args, run_loaded, flow_name="sweep")


def cmd_validate(args: argparse.Namespace) -> int:
    from quantmill.profile_io import load_profile

    profile = load_profile(args.profile, args.set or [])
    recipes, skipped = profile.all_recipes()
    from quantmill.inputs import local_input_problems

    problems = local_input_problems(profile)  # paths, config.json, tokenizer, headers, text files: nothing loaded
    if problems:
        for line in problems[1:]:
            print(f"error: {line}", file=sys.stderr)
        raise QuantmillError(problems[0])
    print(f"{args.profile}: ok ({len(recipes)} recipes: {', '.join(r.name for r in recipes)})")
    for line in skipped:
        print(f"  skipped (sweep.grid): {line}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from quantmill.demo import build_demo_assets

    root = os.environ.get("QUANTMILL_DEMO_ROOT") or state.home() / "demo"
    from quantmill.console import say
    from quantmill.flows.console import run_console

    with run_console(args.verbose) as log:
        try:
            assets = build_demo_assets(Path(root), arch="llama", with_adapter=True)
            os.environ["QUANTMILL_DEMO"] = str(assets.root)
            run_profile(str(PROFILES / "demo.yaml"), args.set or [])
        finally:
            say(f"debug log (third-party output): {log}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import json

    from quantmill.report import load_report, markdown, rich_table

    report = load_report(args.run_id)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif args.format == "markdown":
        print(markdown(report), end="")
    else:
        console().print(rich_table(report))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from quantmill.serving import pull

    got = pull(args.ref, Path(args.dest))
    print(f"pulled {got.name} version {got.version} into {got.path} (sha256 {got.sha256[:16]}… verified)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from quantmill.serving import generate

    out = generate(args.model, args.text, args.max_new_tokens)
    print(args.text + out["completion"])
    print(
        f"[{out['new_tokens']} tokens, {out['tokens_per_s']:.1f} tokens/s, first token {1000 * out['ttft_s']:.0f} ms, "
        f"load {out['load_s']:.1f} s, from {out['path']}]",
        file=sys.stderr,
    )
    return 0


def plan_table(rows: list[StepPlan], machine: Machine) -> Table:
    """The plan as a rich table."""
    from rich.table import Table

    from quantmill.estimates import RUNTIME_BYTES
    from quantmill.plan import DISK_ROW, run_peak
    from quantmill.units import human_bytes as size

    vram = f"{size(machine.vram)} VRAM free" if machine.cuda else "no GPU"
    table = Table(title=f"memory plan (this machine: {size(machine.ram)} RAM free, {vram}, {size(machine.disk)} disk "
                        f"free; process itself ≈ {size(RUNTIME_BYTES)})")
    for col in ("step", "device", "strategy", "step RAM", "peak RSS", "peak VRAM", "disk", "output", "fits"):
        table.add_column(col, justify="right" if col in {"step RAM", "peak RSS", "peak VRAM", "disk", "output"} else "left")
    for r in rows:
        table.add_row(r.step, r.device, r.how, size(r.ram), size(r.peak) if r.step != DISK_ROW else "-",
                      size(r.vram) if r.vram else "-", size(r.disk) if r.disk else "-",
                      size(r.output) if r.output else "-", "yes" if r.fits else f"[red]NO[/red]: {r.advice}")
    top = run_peak(rows)
    table.caption = f"run peak RSS ≈ {size(top.peak)} ({top.step}; the largest step, not the sum)"
    return table


def cmd_plan(args: argparse.Namespace) -> int:
    from quantmill.machine import this_machine
    from quantmill.plan import plan_profile
    from quantmill.profile_io import load_profile

    profile = load_profile(args.profile, args.set or [])
    machine = this_machine(profile.storage.root)
    rows = plan_profile(profile, machine)
    console().print(plan_table(rows, machine))
    bad = [r.step for r in rows if not r.fits]
    print(f"{len(bad)} step(s) will not fit: {', '.join(bad)}" if bad else "every step fits on this machine")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (built on demand, never at import)."""
    parser = argparse.ArgumentParser(prog="quantmill", description="Quantize, evaluate and register LLM variants.")
    sub = parser.add_subparsers(dest="command", required=True)
    from quantmill.flows.cache_cli import add_commands, add_run_options

    p = sub.add_parser("run", help="run a profile (or --preset NAME --model PATH) through the pipeline")
    p.add_argument("profile", nargs="?")
    p.add_argument("--set", action="append", metavar="dotted.key=value", help="override a profile field")
    add_run_options(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("sweep", help="run a profile's recipes and sweep.grid in parallel (threads or Dask)")
    p.add_argument("profile", nargs="?")
    p.add_argument("--set", action="append", metavar="dotted.key=value", help="override a profile field")
    add_run_options(p)
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("validate", help="check a profile without running anything")
    p.add_argument("profile")
    p.add_argument("--set", action="append", metavar="dotted.key=value")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("plan", help="estimate each step's memory, disk and device from config and headers (exit 1: will not fit)")
    p.add_argument("profile")
    p.add_argument("--set", action="append", metavar="dotted.key=value")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("demo", help="build the demo model (once) and run profiles/demo.yaml")
    p.add_argument("--set", action="append", metavar="dotted.key=value")
    p.add_argument("-v", "--verbose", action="store_true", help="show third-party output live (it always goes to the debug log)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("pull", help="download a registered version for serving (NAME@ALIAS or NAME/VERSION)")
    p.add_argument("ref")
    p.add_argument("dest")
    p.set_defaults(fn=cmd_pull)
    p = sub.add_parser("generate", help="load a registered version or local checkpoint and complete a text")
    p.add_argument("--model", required=True, help="NAME@ALIAS, NAME/VERSION or a checkpoint folder")
    p.add_argument("--text", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("report", help="print the comparison table of a finished run (from MLflow)")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    p.set_defaults(fn=cmd_report)
    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `quantmill` console script."""
    args = build_parser().parse_args(argv)
    state.configure_environment()
    # SIGTERM (pre-emption, `kill`): exit through Python so Prefect marks the run and stops its temporary
    # server (the default handler would leave that server process behind).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return args.fn(args)
    except QuantmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except NetworkError as exc:
        print(f"error: {exc} (gave up after retries)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
