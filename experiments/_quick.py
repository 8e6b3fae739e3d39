"""`--quick` overrides that leave the options a user typed alone.

Comparing a value with its default cannot tell `--mc-samples 8` (typed) from the default 8, so
the options actually given are read back from the command line by the parser itself (which also
resolves abbreviations such as `--mc 8`).
"""

from __future__ import annotations

import argparse
import copy


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> set[str]:
    """Destinations of the options present on the command line (`argv`, default sys.argv[1:])."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe._defaults = {}
    return set(vars(probe.parse_args(argv)))


def apply_quick(parser: argparse.ArgumentParser, args: argparse.Namespace, values: dict,
                argv: list[str] | None = None) -> None:
    """Set the smoke-run `values` on `args`, except for options given on the command line."""
    typed = given_options(parser, argv)
    for name, value in values.items():
        if name not in typed:
            setattr(args, name, value)
