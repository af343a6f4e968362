"""A target larger than one device: tensor parallel across the ranks of one node (torch.distributed, under
torchrun; gloo on CPUs, NCCL on GPUs).

Every rank holds its shard of the weights (transformers' `tp_plan="auto"`) and of the KV heads, and runs the
same engine. Rank 0 serves gRPC and sends each engine call to the other ranks before running it, so all ranks run
the same forwards in the same order; the all-reduces inside them leave every rank the same logits, hence the
same sampled tokens (the generators are seeded alike). Only rank 0 decides lease expiry: it sends the releases.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from minedraft.engine.model_runner import DTYPES, ModelRunner
from minedraft.engine.precision import resolve_dtype

log = logging.getLogger(__name__)
MIRRORED = frozenset({"prefill", "verify", "release", "warm_up"})  # every call that changes a rank's state


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def load_sharded(path: str, device: str, dtype: str, kv: str, quant: str = "none", vocab: int = 0) -> ModelRunner:
    """This rank's shard of the model, with per-sequence KV (each rank's cache holds its own heads)."""
    if kv == "static":
        raise SystemExit("a tensor-parallel target runs with --kv dynamic (the static cache is sized for all heads)")
    # A shard is transformers' own dense model: refuse what it would silently not do.
    ignored = [f"--quant {quant}"] if quant not in ("none", "auto") else []
    ignored += [f"--vocab {vocab}"] if vocab else []
    if ignored:
        raise SystemExit(f"a tensor-parallel model runs its weights as loaded: drop {' and '.join(ignored)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[resolve_dtype(dtype, device)],
                                                 tp_plan="auto").eval()
    log.info("rank %d of %d: %s sharded (%s)", dist.get_rank(), dist.get_world_size(), path, dist.get_backend())
    local = os.environ.get("LOCAL_RANK", "0")
    return ModelRunner(model, torch.device("cpu" if device == "cpu" else f"cuda:{local}"))  # each rank its own GPU


class Mirror:
    """Rank 0's view of the engine: each state-changing call goes to the other ranks first."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._engine, name)
        if name not in MIRRORED:
            return attr

        def mirrored(*args: Any, **kwargs: Any) -> Any:
            dist.broadcast_object_list([(name, args, kwargs)], src=0)
            return attr(*args, **kwargs)
        return mirrored


def follow(engine: Any) -> None:
    """Ranks other than 0: run rank 0's engine calls, in its order, until rank 0 goes away."""
    while True:
        box: list = [None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as error:  # rank 0 stopped (or died): this rank has nothing left to serve
            log.info("rank %d stops: %s", dist.get_rank(), error)
            return
        name, args, kwargs = box[0]
        try:
            getattr(engine, name)(*args, **kwargs)
        except Exception:  # the same call failed on rank 0 too, which reports it to its caller
            log.debug("mirrored %s failed", name, exc_info=True)
