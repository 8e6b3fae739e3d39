"""`timerome` command line. Each subcommand lives in `timerome_jax/commands/<name>.py` and
registers itself with `register(subparsers, common)`.

Errors a user can cause (`ports.errors.UserError`) print one line on stderr and exit 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ports.errors import UserError

COMMANDS = ("info", "convert", "generate", "trace", "edit", "eval", "unlearn", "demo")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser = argparse.ArgumentParser(
        prog="timerome", parents=[common],
        description="Diffusion-time causal tracing and inference-time editing of masked diffusion LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"timerome_jax.commands.{name}").register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"timerome {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("timerome: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
