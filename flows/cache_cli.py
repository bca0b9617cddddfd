"""CLI pieces for operators: `quantmill presets`, `quantmill cache ls|du|prune`, and the run options
`--preset/--model/--adapter/--calibration`, `--refresh`, `--no-cache`, `-v` (wired into flows/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from quantmill import refresh


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options of `quantmill run` (and `sweep`) besides the profile and --set."""
    p.add_argument("--preset", help="run a preset from profiles/presets (see `quantmill presets`) instead of a profile file")
    p.add_argument("--model", help="with --preset: a model folder or OWNER/NAME@REVISION")
    p.add_argument("--adapter", help="with --preset: a LoRA adapter folder (merged before quantizing)")
    p.add_argument("--calibration", help="with --preset: a .txt/.jsonl/.csv file or DATASET[:CONFIG[:SPLIT]]")
    p.add_argument("--refresh", metavar="STEP[,STEP]", help=f"recompute these steps and what depends on them ({', '.join(refresh.STEPS)})")
    p.add_argument("--no-cache", action="store_true", help="recompute every step (results are still stored)")
    p.add_argument("-v", "--verbose", action="store_true", help="show third-party output live (it always goes to the debug log)")


def load_run_profile(args: argparse.Namespace) -> Any:
    """The profile a run command works on: a file, or a preset filled from the command line."""
    from quantmill.errors import ProfileError
    from quantmill.profile_io import load_profile

    preset_only = [f for f in ("model", "adapter", "calibration") if getattr(args, f, None)]
    if getattr(args, "preset", None):
        if args.profile:
            raise ProfileError(f"{args.profile}: give a profile file or --preset, not both")
        if not args.model:
            raise ProfileError(f"--preset {args.preset}: needs --model PATH|OWNER/NAME@REVISION")
        from quantmill.presets import resolve

        return resolve(args.preset, model=args.model, adapter=args.adapter, calibration=args.calibration,
                       overrides=args.set or [])
    if preset_only:
        raise ProfileError(f"--{preset_only[0]}: only with --preset (in a profile file, set it there or with --set)")
    if not args.profile:
        raise ProfileError("run: give a profile file, or --preset NAME --model PATH")
    return load_profile(args.profile, args.set or [])


@contextlib.contextmanager
def refreshing(args: argparse.Namespace) -> Iterator[None]:
    """$QUANTMILL_REFRESH for the run's duration (--refresh STEP,... or --no-cache = every step)."""
    steps = [refresh.ALL] if getattr(args, "no_cache", False) else (
        refresh.parse_steps(args.refresh) if getattr(args, "refresh", None) else []
    )
    old = {var: os.environ.get(var) for var in (refresh.ENV, refresh.RUN_ENV)}
    if steps:
        os.environ[refresh.ENV] = ",".join(steps)
        os.environ[refresh.RUN_ENV] = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run = os.environ.get(refresh.RUN_ENV, "")
    try:
        yield
    finally:
        for var, value in old.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if steps:
            from quantmill import state

            (state.home() / "refresh" / f"{run}.keys").unlink(missing_ok=True)


def after_run(profile: Any, summary: Any) -> None:
    """`storage.keep: registered`: drop this run's unregistered checkpoints, saying what was freed."""
    from quantmill.console import say

    if getattr(profile.storage, "keep", "all") != "registered":
        return
    from quantmill.cachectl import drop_unregistered_checkpoints, human_size

    result = drop_unregistered_checkpoints(profile.storage.root, summary.run_id)
    names = ", ".join(e.key for e in result.removed) or "nothing"
    say(f"storage.keep=registered: removed {len(result.removed)} unregistered checkpoint(s) ({names}), "
        f"freed {human_size(result.freed_bytes)}"
        + (f"; {len(result.in_use)} in use by a running run, left" if result.in_use else ""))


def cmd_presets(args: argparse.Namespace) -> int:
    """One line per preset."""
    from quantmill.presets import available, summary

    for name, path in available().items():
        print(f"{name:<12} {summary(path)}")
    print("run one: quantmill run --preset NAME --model PATH|OWNER/NAME@REVISION [--adapter PATH] [--calibration FILE|DATASET]")
    return 0


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_cache_ls(args: argparse.Namespace) -> int:
    """Each artifact: step, key, size, age, needed by."""
    from quantmill.cachectl import human_age, human_size, listing, store_for

    store = store_for(args.store)
    items = listing(store)
    now = time.time()
    rows = [[i.entry.step, i.entry.key, human_size(i.entry.size_bytes), human_age(now - i.entry.created),
             i.needed_by or "-"] for i in items]
    _table(rows, ["step", "key", "size", "age", "needed by"])
    total = sum(i.entry.size_bytes for i in items)
    print(f"{len(items)} artifact(s), {human_size(total)} in {store.root}")
    return 0


def cmd_cache_du(args: argparse.Namespace) -> int:
    """Size per step and in total."""
    from quantmill.cachectl import human_size, listing, store_for

    store = store_for(args.store)
    items = listing(store)
    per: dict[str, list[int]] = {}
    for i in items:
        per.setdefault(i.entry.step, []).append(i.entry.size_bytes)
    rows = [[step, str(len(s)), human_size(sum(s))] for step, s in sorted(per.items())]
    kept = sum(i.entry.size_bytes for i in items if i.needed_by)
    _table(rows, ["step", "artifacts", "size"])
    print(f"total {human_size(sum(i.entry.size_bytes for i in items))} in {len(items)} artifact(s); "
          f"{human_size(kept)} needed by registered versions or runs; {store.root}")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    """Remove what nobody keeps; print each removal and the space freed."""
    from quantmill.cachectl import human_size, parse_age, prune, store_for

    older = parse_age(args.older_than) if args.older_than else None
    store = store_for(args.store)
    result = prune(store, keep=args.keep, older_than_s=older, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in result.removed:
        print(f"{verb} {e.step:<10} {e.key}  {human_size(e.size_bytes)}")
    for key in result.in_use:
        print(f"in use by a running run, left: {key}")
    print(f"{verb} {len(result.removed)} artifact(s), {'would free' if args.dry_run else 'freed'} "
          f"{human_size(result.freed_bytes)}; kept {result.kept} (--keep {args.keep}"
          + (f", --older-than {args.older_than}" if args.older_than else "") + ")")
    return 0


def add_commands(sub: Any) -> None:
    """`presets` and `cache ls|du|prune`."""
    p = sub.add_parser("presets", help="list the deployment presets (quantmill run --preset NAME --model PATH)")
    p.set_defaults(fn=cmd_presets)
    cache = sub.add_parser("cache", help="list, size and prune the artifact store")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    for name, fn, text in (("ls", cmd_cache_ls, "each artifact: step, key, size, age, who needs it"),
                           ("du", cmd_cache_du, "size per step and in total"),
                           ("prune", cmd_cache_prune, "remove artifacts no registered version (or run) needs")):
        p = csub.add_parser(name, help=text)
        p.add_argument("--store", help="store root (default: storage.root's default, $QUANTMILL_HOME/artifacts)")
        p.set_defaults(fn=fn)
        if name == "prune":
            p.add_argument("--older-than", metavar="AGE", help="only artifacts older than AGE (30m, 12h, 7d, 2w)")
            p.add_argument("--keep", choices=("registered", "runs", "none"), default="registered",
                           help="keep what registered versions need (default), also what active MLflow runs need, or nothing")
            p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")


def run_command(args: argparse.Namespace, run: Any, flow_name: str = "quantize") -> int:
    """`quantmill run|sweep`: resolve the profile, run it with our console, apply storage.keep."""
    from quantmill.console import say
    from quantmill.flows.console import run_console

    profile = load_run_profile(args)
    with refreshing(args), run_console(args.verbose) as log:
        try:
            if args.preset:
                from quantmill.presets import device_note

                note = device_note(profile)
                if note:
                    say(note)
            summary = run(profile, flow_name)
            after_run(profile, summary)
        finally:
            say(f"debug log (third-party output): {log}")
    return 0
