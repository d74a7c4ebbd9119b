"""`moe-distill`: the command line. `moe-distill run` is `make distill` with the pipeline's exit code intact
(0 done, 2 cannot start, 3 fix the input, 75 time limit: run again, 130 interrupted), for scripts that act on it.

    moe-distill run --teacher smollm2-moe --student derived --preset ci --set "eval.limit=20"
    moe-distill run --plan ...      which stages would run and why, without running them
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="moe-distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="<command>")
    sub.add_parser("run", add_help=False, help="run the pipeline (the options of `make distill`; run --help)")
    if args and args[0] not in sub.choices and args[0] not in ("-h", "--help"):
        print(f"error (usage): unknown command {args[0]!r}; commands: {', '.join(sub.choices)} "
              "(moe-distill --help)", file=sys.stderr)
        return 2
    if not args or args[0] in ("-h", "--help"):
        ap.print_help()
        return 0 if args else 2
    from pipelines import run

    return run.main(args[1:], prog="moe-distill run")


def entry() -> None:
    """Console-script entry: Ctrl-C during imports is still one line and exit 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command to resume", file=sys.stderr)
        sys.exit(130)
