"""`timerome` command line. Each subcommand lives in `timerome_jax/commands/<name>.py` and
registers itself with `register(subparsers, common)`.

Errors a user can cause (`ports.errors.UserError`) print one line on stderr and exit 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ports.errors import UserError
from ports.fileio import check_output

COMMANDS = ("info", "convert", "generate", "trace", "edit", "eval", "unlearn", "demo", "lmeval")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser = argparse.ArgumentParser(
        prog="timerome", parents=[common],
        description="Diffusion-time causal tracing and inference-time editing of masked diffusion LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"timerome_jax.commands.{name}").register(sub, common)
    for command in sub.choices.values():
        command.formatter_class = ShowDefaults
    return parser


class ShowDefaults(argparse.HelpFormatter):
    """--help shows each option's default, unless it is empty or the help already says it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_text or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)"


def check_outputs(args: argparse.Namespace) -> None:
    """Every output a command declares (`outputs`: (flag dest, "dir" | "file" | "update") pairs; an
    "update" is an existing directory rewritten in place) is checked before any work: one error and
    exit 2, nothing left behind."""
    for dest, kind in getattr(args, "outputs", ()):
        path = getattr(args, dest, None)
        if not path:
            continue
        if kind == "update" and not Path(path).is_dir():
            raise UserError(f"{path} is not a directory (--{dest.replace('_', '-')} names an existing memory)")
        check_output(path, overwrite=kind == "update" or getattr(args, "overwrite", False), directory=kind != "file")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_outputs(args)
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
