"""One cluster configuration, declared once: what `minedraft serve` decides itself, as dataclass fields whose
metadata becomes the command line, plus the services' own options by name (forwarding.py).

`serve` builds it from its command line; the demo, the benchmark and the tests build it directly
(`ClusterConfig.of(mode="psd", max_batch=4, lease_s=2)`), and Cluster starts the processes from it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from minedraft.app import forwarding
from minedraft.engine.precision import (
    CPU_DEFAULT_QUANT,
    CPU_DEFAULT_QUANT_NO_AMX,
    CPU_DEFAULT_QUANT_NO_VNNI,
    DRAFT_ONLY_QUANTS,
    QUANTS,
)
from minedraft.engine.sequence_table import DEFAULT_LEASE_S
from minedraft.serving.model_service import add_kv_args
from services.router.modes import MODES

CPU_LAYOUTS = ("auto", "split", "shared", "none")
KV_FIELDS = ("kv", "max_seqs", "max_context", "kv_memory_fraction", "cuda_graphs")  # declared by add_kv_args
TARGET_QUANTS = tuple(q for q in QUANTS if q not in DRAFT_ONLY_QUANTS)


def option(default: object, help: str, **argparse_kwargs) -> object:
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class ClusterConfig:
    mode: str = option("auto", "the router's mode", choices=MODES)
    port: int = option(50051, "the router's public port")
    host: str = option("127.0.0.1", "the router's public address")
    draft_model: str = option("default-draft", "preset, .gguf file or model folder")
    target_model: str = option("default-target", "preset, .gguf file or model folder")
    draft_port: int = option(0, "0: pick a free port")
    target_port: int = option(0, "0: pick a free port")
    device: str = option("cpu", "device of both models (see --draft-device)")
    draft_device: str | None = option(None, "the draft's device, if not --device", type=str)
    dtype: str = option("auto", "both models (auto: bfloat16 where the device multiplies it natively, else float32)")
    draft_quant: str = option("auto", "CPU weight format of the draft (its precision moves acceptance, never "
                              f"output); auto on the CPU: {CPU_DEFAULT_QUANT['draft']} with VNNI, else "
                              f"{CPU_DEFAULT_QUANT_NO_VNNI['draft']} (int4 without fbgemm)", choices=("auto", *QUANTS))
    target_quant: str = option("auto", "CPU weight format of the target; auto on the CPU: "
                               f"{CPU_DEFAULT_QUANT['target']} with AMX, {CPU_DEFAULT_QUANT_NO_AMX['target']} with "
                               f"VNNI only, {CPU_DEFAULT_QUANT_NO_VNNI['target']} without VNNI (without fbgemm: "
                               f"{CPU_DEFAULT_QUANT['target']} with VNNI, int4 without)",
                               choices=("auto", *TARGET_QUANTS))
    tokenizer: str | None = option(None, "the router's tokenizer (default: the target model's)", type=str)
    lease_s: float = option(DEFAULT_LEASE_S, "the services drop sequences the router has not used or renewed for "
                            "this long")
    metrics_port: int = option(0, "Prometheus ports: router on this one, draft +1, target +2 (0: off)")
    cpu_layout: str = option("auto", "how draft and target use the CPU's cores: split (disjoint halves), shared (all "
                             "cores each; the router asks for half while both run), none (no pinning); auto: the "
                             "target alone gets every core in ar, split in psd, shared in sd and auto",
                             choices=CPU_LAYOUTS)
    http_port: int = option(0, "serve the OpenAI HTTP API on this port too (0: off)")
    tls_dir: str | None = option(None, "certificates from `minedraft certs DIR`: every service serves TLS, and "
                                 "draft and target take only clients with a certificate from its CA", type=str)
    public_mtls: bool = option(False, "with --tls-dir: clients of the public API must present a certificate too")
    api_key_file: str | None = option(None, "the router's API key (see `minedraft router`)", type=str)
    admin_key_file: str | None = option(None, "the router's admin key (see `minedraft router`)", type=str)
    kv: str = "auto"
    max_seqs: int = 0  # 0: what two full lanes hold
    max_context: int = 0  # 0: up to 4096 tokens, what fits in memory (`static_kv.fit_context`)
    kv_memory_fraction: float | None = None
    cuda_graphs: bool = True
    router: dict[str, object] = field(default_factory=dict)  # the router's own options, by name
    draft: dict[str, object] = field(default_factory=dict)
    target: dict[str, object] = field(default_factory=dict)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            if "help" not in f.metadata:
                continue
            flag = f"--{f.name.replace('_', '-')}"
            extra = {k: v for k, v in f.metadata.items() if k != "help"}
            if isinstance(f.default, bool):
                parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            else:
                parser.add_argument(flag, default=f.default, help=f.metadata["help"],
                                    **{"type": type(f.default), **extra})
        add_kv_args(parser)
        parser.set_defaults(max_seqs=0)
        for service in forwarding.PREFIXES:
            forwarding.offer(parser, service)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClusterConfig:
        own = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in forwarding.PREFIXES}
        return cls(**own, **{service: forwarding.collect(args, service) for service in forwarding.PREFIXES})

    @classmethod
    def of(cls, **options: object) -> ClusterConfig:
        """A configuration from keyword options: the cluster's own fields by name, the router's options by name,
        the draft's and target's as draft_<name> / target_<name>."""
        own = {f.name for f in fields(cls)} - set(forwarding.PREFIXES)
        config, unknown = cls(**{k: v for k, v in options.items() if k in own}), []
        for name, value in options.items():
            if name in own:
                continue
            service, _, dest = name.partition("_")
            if service in ("draft", "target") and any(o.dest == dest for o in forwarding.options_of(service)):
                getattr(config, service)[dest] = value
            elif any(o.dest == name for o in forwarding.options_of("router")):
                config.router[name] = value
            else:
                unknown.append(name)
        if unknown:
            raise ValueError(f"unknown cluster options: {unknown}")
        return config

    def router_option(self, name: str) -> object:
        return self.router.get(name, forwarding.default_of("router", name))
