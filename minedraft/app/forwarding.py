"""The services' own options, read from the parsers where each service declares them, so that `minedraft serve`
and ClusterConfig can offer and pass them on without declaring any of them a second time.

The router's options keep their names; the draft's and the target's take a `--draft-…`/`--target-…` prefix on
`serve`'s command line (`--draft-top-m`, `--target-max-drafts`, …). A child gets an option on its command line
only when it differs from the service's own default, so each default lives in one place.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

# What the launcher decides for its children itself; every other option of theirs passes through.
ROUTER_OWNED = frozenset({
    "host", "port", "mode", "target_addr", "draft_addr", "tokenizer", "draft_tokenizer", "max_context",
    "metrics_port", "share_cores", "tls_cert", "tls_key", "tls_client_ca", "backend_ca", "backend_cert", "backend_key",
    "internal_token_file", "api_key_file", "admin_key_file"})
MODEL_OWNED = frozenset({
    "model", "host", "port", "device", "dtype", "quant", "metrics_port", "cpu_cores", "kv", "max_seqs", "max_context",
    "kv_memory_fraction", "cuda_graphs", "lease_s", "tls_cert", "tls_key", "tls_client_ca", "internal_token_file"})
PREFIXES = {"router": "", "draft": "draft-", "target": "target-"}


@dataclass(frozen=True)
class Option:
    flag: str  # on the service's own command line
    dest: str
    default: object
    kind: str  # value | flag | boolean
    help: str | None
    type: object
    choices: object


@functools.cache
def options_of(service: str) -> tuple[Option, ...]:
    """The options of `service` (router, draft or target) that pass through, as the service declares them."""
    from services.draft import main as draft_main
    from services.router import main as router_main
    from services.target import main as target_main

    parser = argparse.ArgumentParser(add_help=False)
    {"router": router_main, "draft": draft_main, "target": target_main}[service].add_args(parser)
    skip = ROUTER_OWNED if service == "router" else MODEL_OWNED
    options = []
    for action in parser._actions:  # argparse keeps the declarations here
        if not action.option_strings or action.dest in skip:
            continue
        kind = ("boolean" if isinstance(action, argparse.BooleanOptionalAction) else
                "flag" if isinstance(action, argparse._StoreTrueAction) else "value")
        flag = next(f for f in action.option_strings if f.startswith("--") and not f.startswith("--no-"))
        options.append(Option(flag, action.dest, action.default, kind, action.help, action.type, action.choices))
    return tuple(options)


def offer(parser: argparse.ArgumentParser, service: str) -> None:
    """Declares `service`'s pass-through options on `parser`, under the service's prefix."""
    prefix = PREFIXES[service]
    group = parser.add_argument_group(f"{service} options (passed through)")
    for option in options_of(service):
        name, dest = f"--{prefix}{option.flag[2:]}", f"{prefix.replace('-', '_')}{option.dest}"
        if option.kind == "value":
            group.add_argument(name, dest=dest, default=option.default, help=option.help, type=option.type,
                               choices=option.choices)
        else:
            group.add_argument(name, dest=dest, default=option.default, help=option.help,
                               action=argparse.BooleanOptionalAction if option.kind == "boolean" else "store_true")


def collect(args: argparse.Namespace, service: str) -> dict[str, object]:
    """The values of `service`'s options that the user set, by the service's own dest."""
    prefix = PREFIXES[service].replace("-", "_")
    return {o.dest: getattr(args, prefix + o.dest) for o in options_of(service)
            if getattr(args, prefix + o.dest) != o.default}


def forward(values: dict[str, object], service: str) -> list[str]:
    """The service's command-line options for these values (those at their defaults are left out)."""
    argv: list[str] = []
    for option in options_of(service):
        value = values.get(option.dest, option.default)
        if value == option.default:
            continue
        if option.kind == "boolean":
            argv.append(option.flag if value else f"--no-{option.flag[2:]}")
        elif option.kind == "flag":
            argv.append(option.flag)
        else:
            argv += [option.flag, str(value)]
    return argv


def default_of(service: str, dest: str) -> object:
    return next(o.default for o in options_of(service) if o.dest == dest)
