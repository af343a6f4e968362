"""`minedraft serve` takes every option of the services it starts, declared once, where the service declares it.

The router's options are offered under their own names, the draft's and the target's under `--draft-…` and
`--target-…` (`--draft-top-m`, `--target-max-drafts`, …); only what the launcher decides itself (addresses,
ports, certificates, cores, the models and shared cache settings) is declared by the launcher. A child gets an
option on its command line only when the user set it, so each service's own default stays the one default.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Forwarded:
    flag: str  # the option on the child's command line
    dest: str  # where `serve` keeps its value
    default: object
    kind: str  # value | flag | boolean


def offer(source: argparse.ArgumentParser, target: argparse.ArgumentParser, skip: set[str],
          prefix: str = "") -> list[Forwarded]:
    """Declares on `target` every option of `source` but `skip` (by dest), under `--{prefix}{name}`."""
    group = target.add_argument_group(f"{prefix.rstrip('-') or 'router'} options (passed through)")
    forwarded = []
    for action in source._actions:  # argparse keeps declarations here; reading them avoids declaring twice
        if not action.option_strings or action.dest in skip or isinstance(action, argparse._HelpAction):
            continue
        flag = max(action.option_strings, key=len)
        name = f"--{prefix}{flag[2:]}"
        dest = f"{prefix.replace('-', '_')}{action.dest}"
        if isinstance(action, argparse.BooleanOptionalAction):
            group.add_argument(name, dest=dest, default=action.default, help=action.help,
                               action=argparse.BooleanOptionalAction)
            kind = "boolean"
        elif isinstance(action, argparse._StoreTrueAction):
            group.add_argument(name, dest=dest, default=action.default, help=action.help, action="store_true")
            kind = "flag"
        else:
            group.add_argument(name, dest=dest, default=action.default, help=action.help, type=action.type,
                               choices=action.choices)
            kind = "value"
        forwarded.append(Forwarded(flag, dest, action.default, kind))
    return forwarded


def forward(args: argparse.Namespace, forwarded: list[Forwarded]) -> list[str]:
    """The child's options for the values the user set (left out at their defaults)."""
    argv: list[str] = []
    for option in forwarded:
        value = getattr(args, option.dest)
        if value == option.default:
            continue
        if option.kind == "boolean":
            argv.append(option.flag if value else f"--no-{option.flag[2:]}")
        elif option.kind == "flag":
            argv.append(option.flag)
        else:
            argv += [option.flag, str(value)]
    return argv
