"""CUDA-graph capture and replay of fixed-shape steps (decode and verify), with eager fallback.

Eager decoding of a small model is launch-bound on a GPU (18.7 ms for a step whose weights take 0.9 ms to
read). A graph replays the whole forward's kernels in one launch. With attention reading slots in place
(`slot_attention`, varlen) a step's shapes depend only on its batch and tokens per row, so the whole grid —
batch buckets x token buckets (1 for decode up to k_max + 1 for verify) — is captured at start-up, before the
service reports SERVING: no request (and no calibration) ever pays for a capture. Each graph keeps logits for
all its positions; the caller slices what it asked for. On the gather path (float32/64) shapes also carry a
width, so graphs are captured lazily there, up to `max_graphs`. Shapes outside the grid, long feeds (prefill)
and failed captures run eagerly: counted in `minedraft_graph_steps{how="eager"}` and logged once per shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from minedraft import metrics

log = logging.getLogger(__name__)

Step = Callable[..., torch.Tensor]  # step(logits_to_keep=..., **tensors) -> logits


class CapturedStep:
    def __init__(self, step: Step, example: dict[str, torch.Tensor], logits_to_keep: int, pool) -> None:
        self.inputs = {name: tensor.clone() for name, tensor in example.items()}
        run = lambda: step(logits_to_keep=logits_to_keep, **self.inputs)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs allocate what capture must not
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = run()

    def __call__(self, inputs: dict[str, torch.Tensor], returned: int) -> torch.Tensor:
        for name, tensor in inputs.items():
            self.inputs[name].copy_(tensor)
        self.graph.replay()
        return self.output[:, -returned:].clone()  # the next replay overwrites the graph's output


def shape_key(inputs: dict[str, torch.Tensor], logits_to_keep: int) -> tuple:
    return (*(tuple(t.shape) for t in inputs.values()), logits_to_keep)


class StepGraphs:
    def __init__(self, step: Step, scratch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 lazy: bool = False, max_graphs: int = 96, max_tokens: int = 16) -> None:
        self.step, self.scratch, self.lazy = step, scratch, lazy
        self.max_graphs, self.max_tokens = max_graphs, max_tokens
        self.graphs: dict[tuple, CapturedStep] = {}
        self.failed: set[tuple] = set()
        self.warned: set[tuple] = set()
        self.replays = self.eager = 0
        self.capture_s = 0.0
        self.pool = torch.cuda.graph_pool_handle()

    def capture_all(self, examples: Iterable[tuple[dict[str, torch.Tensor], int]]) -> int:
        """Captures a graph for each (example inputs, logits kept); returns how many were captured."""
        started = time.perf_counter()
        for inputs, logits_to_keep in examples:
            self._capture(shape_key(inputs, logits_to_keep), inputs, logits_to_keep)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - started
        log.info("captured %d CUDA graphs in %.1fs (%d failed)", len(self.graphs), self.capture_s, len(self.failed))
        return len(self.graphs)

    def _capture(self, key: tuple, inputs: dict[str, torch.Tensor], logits_to_keep: int) -> CapturedStep | None:
        try:
            self.graphs[key] = CapturedStep(self.step, self.scratch(inputs), logits_to_keep, self.pool)
            return self.graphs[key]
        except Exception:  # a model op that cannot be captured: this shape stays eager
            log.exception("CUDA graph capture failed for shape %s; running it eagerly", key)
            self.failed.add(key)
            torch.cuda.synchronize()
            return None

    def __call__(self, inputs: dict[str, torch.Tensor], logits_to_keep: int, returned: int | None = None
                 ) -> torch.Tensor:
        """Logits of the last `returned` (default: all kept) positions of a step keeping `logits_to_keep`."""
        returned = returned or logits_to_keep
        key = shape_key(inputs, logits_to_keep)
        graph = self.graphs.get(key)
        if graph is None and self.lazy and self._may_capture(key, inputs):
            graph = self._capture(key, inputs, logits_to_keep)
        if graph is None:
            self.eager += 1
            metrics.GRAPH_STEPS.labels("eager").inc()
            if key not in self.warned and inputs["input_ids"].shape[1] <= self.max_tokens:  # prefills are expected
                self.warned.add(key)
                log.warning("no CUDA graph for step shape %s: running it eagerly", key)
            return self.step(logits_to_keep=returned, **inputs)
        self.replays += 1
        metrics.GRAPH_STEPS.labels("replay").inc()
        return graph(inputs, returned)

    def _may_capture(self, key: tuple, inputs: dict[str, torch.Tensor]) -> bool:
        tokens = inputs["input_ids"].shape[1]
        return key not in self.failed and len(self.graphs) < self.max_graphs and tokens <= self.max_tokens
