"""CUDA-graph capture and replay of fixed-shape steps (decode and verify), with eager fallback.

Eager decoding of a small model is launch-bound on a GPU (18.7 ms for a step whose weights
take 0.9 ms to read). A graph replays the whole forward's kernels in one launch. Steps are captured lazily,
one graph per input shape (batch bucket, tokens per row, width bucket, logits kept), on scratch inputs that
only touch the static cache's scratch slot; later steps of that shape copy their inputs into the graph's
own tensors and replay. Shapes past the limit, long feeds (prefill) and failed captures run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from minedraft import metrics

log = logging.getLogger(__name__)

Step = Callable[..., torch.Tensor]  # step(**tensors) -> logits


class CapturedStep:
    def __init__(self, step: Step, example: dict[str, torch.Tensor], pool) -> None:
        self.inputs = {name: tensor.clone() for name, tensor in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs allocate what capture must not
            for _ in range(2):
                step(**self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = step(**self.inputs)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, tensor in inputs.items():
            self.inputs[name].copy_(tensor)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the graph's output


class StepGraphs:
    def __init__(self, step: Step, scratch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                 max_graphs: int = 96, max_tokens: int = 16) -> None:
        self.step, self.scratch = step, scratch
        self.max_graphs, self.max_tokens = max_graphs, max_tokens
        self.graphs: dict[tuple, CapturedStep] = {}
        self.failed: set[tuple] = set()
        self.replays = 0
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, inputs: dict[str, torch.Tensor], logits_to_keep: int) -> torch.Tensor:
        key = (*(tuple(t.shape) for t in inputs.values()), logits_to_keep)
        graph = self.graphs.get(key)
        if graph is None and self._may_capture(key, inputs):
            try:
                graph = CapturedStep(lambda **t: self.step(logits_to_keep=logits_to_keep, **t),
                                     self.scratch(inputs), self.pool)
                self.graphs[key] = graph
            except Exception:  # a model op that cannot be captured: this shape stays eager
                log.exception("CUDA graph capture failed for shape %s; running it eagerly", key)
                self.failed.add(key)
                torch.cuda.synchronize()
        if graph is None:
            metrics.GRAPH_STEPS.labels("eager").inc()  # a shape past the graph limits, or one that failed capture
            return self.step(logits_to_keep=logits_to_keep, **inputs)
        self.replays += 1
        metrics.GRAPH_STEPS.labels("replay").inc()
        return graph(inputs)

    def _may_capture(self, key: tuple, inputs: dict[str, torch.Tensor]) -> bool:
        tokens = inputs["input_ids"].shape[1]
        return key not in self.failed and len(self.graphs) < self.max_graphs and tokens <= self.max_tokens
