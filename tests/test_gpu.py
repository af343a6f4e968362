"""GPU path (marked `gpu`; skipped without CUDA): CUDA graphs must replay exactly what eager runs compute."""

import pytest
import torch

from minedraft.app.client import collect, make_request, stream
from minedraft.engine.model_runner import ModelRunner, SequenceState
from services.draft.engine import DraftEngine
from services.target.engine import TargetEngine
from tests.conftest import channel_to
from tests.test_engines import PROMPTS as ENGINE_PROMPTS
from tests.test_engines import speculate
from tests.test_model_runner import PROMPTS

NO_GPU = "needs a CUDA GPU (scripts/gpu-check runs these)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]


def cuda_runner(path, layout: str) -> ModelRunner:
    kv = {"dynamic": {"kv": "dynamic"}, "static": {"kv": "static", "cuda_graphs": False},
          "graphs": {"kv": "static", "cuda_graphs": True}}[layout]
    return ModelRunner.load(str(path), device="cuda", dtype="float64", max_seqs=8, max_context=128, **kv)


def test_graph_replay_gives_the_eager_greedy_tokens(tiny_pair) -> None:
    runs = {}
    for layout in ("dynamic", "static", "graphs"):
        runner = cuda_runner(tiny_pair[0], layout)
        states = [SequenceState(list(p)) for p in PROMPTS]
        for step in range(40):
            if step == 20:
                states.append(SequenceState([70, 71, 72]))  # a join changes the batch bucket
            logits = runner.forward(states, logits_to_keep=1)
            for i, state in enumerate(states):
                state.tokens.append(int(logits[i, -1].argmax()))
        runs[layout] = [s.tokens for s in states]
        if layout == "graphs":
            assert runner.graphs.replays > 30, "the decode steps must have run as graphs"
    assert runs["static"] == runs["dynamic"]
    assert runs["graphs"] == runs["dynamic"]


def test_graph_engines_speculate_exactly_like_eager(tiny_pair) -> None:
    """Draft decode and k+1 verify replayed as graphs: same greedy and sampled tokens as the dynamic cache."""
    results = {}
    for layout in ("dynamic", "graphs"):
        target = TargetEngine(cuda_runner(tiny_pair[0], layout))
        draft = DraftEngine(cuda_runner(tiny_pair[1], layout), top_m=8)
        results[layout] = speculate(target, draft, list(ENGINE_PROMPTS), rounds=8, batched=True)
    assert results["graphs"] == results["dynamic"]


def test_cuda_cluster_psd_equals_target_only(clusters, tiny_pair) -> None:
    prompts = ["def add(a, b):", "Hello", "for i in range(10):\n"]
    outputs = {}
    for mode in ("ar", "psd"):
        cluster = clusters.get(mode, tiny_pair, device="cuda", max_seqs=16, max_context=256)
        with channel_to(cluster) as channel:
            outputs[mode] = [collect(stream(channel, make_request(prompt=p, max_tokens=24), timeout=120)).token_ids
                             for p in prompts]
    assert outputs["psd"] == outputs["ar"]


def test_sampling_and_verification_sync_only_to_copy_their_results(monkeypatch) -> None:
    """The batched sampler and verifier under sync debug mode "error": the one copy of results is the only
    host sync (a per-row int()/tolist()/multinomial would raise)."""
    from minedraft.engine import sampling, verification
    from minedraft.engine.logits_processing import adjust
    from minedraft.engine.sampling import DRAFT_STREAM, TARGET_STREAM, Sampling, draft_rows, make_generator

    def copy_allowed(tensor: torch.Tensor) -> list:
        torch.cuda.set_sync_debug_mode(0)
        try:
            return tensor.cpu().tolist()
        finally:
            torch.cuda.set_sync_debug_mode("error")
    monkeypatch.setattr(verification, "to_host", copy_allowed)
    monkeypatch.setattr(sampling, "to_host", copy_allowed)
    settings = [Sampling(), Sampling(temperature=0.8, top_k=20, seed=1), Sampling(temperature=1.0, top_p=0.9,
                                                                                  seed=2)] * 11  # 33 rows
    penalised = Sampling(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2,
                         min_tokens=4, held_tokens=(1, 2), prompt_len=3, seed=5)
    logits = torch.randn(len(settings), 5, 1000, device="cuda")
    drafts = [[(int(t), [int(t)], [1.0]) for t in row] for row in logits[:, :-1].argmax(-1).cpu()]
    draft_gens = [make_generator(s.seed, DRAFT_STREAM, "cuda") for s in settings]
    target_gens = [make_generator(s.seed, TARGET_STREAM, "cuda") for s in settings]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        adjust(logits[0], penalised, [5, 6, 7, 8, 9, 10, 11, 12], 4)  # penalties and min_tokens, on the device
        draft_rows(logits[:, 0], settings, 32, draft_gens)
        verdict = verification.judge(logits, drafts, settings, target_gens)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert verdict.accepted[0] == 4 and all(verdict.ok)


def test_bf16_graphs_replay_the_eager_static_tokens(tiny_pair) -> None:
    """bf16 (the kernels the product runs, not float64's math path) over 40 steps crossing batch buckets and
    rollbacks: the start-up grid replays every step, and graphs and the dynamic cache agree with eager static on
    nearly every greedy token (padded shapes and other kernels round differently; float64 is checked exactly)."""
    runs = {}
    for layout in ("dynamic", "static", "graphs"):
        runner = ModelRunner.load(str(tiny_pair[0]), device="cuda", dtype="bfloat16", max_seqs=8, max_context=128,
                                  kv="dynamic" if layout == "dynamic" else "static", cuda_graphs=layout == "graphs")
        states = [SequenceState(list(p)) for p in PROMPTS]
        for step in range(40):
            if step == 15:
                states.append(SequenceState([70, 71, 72]))  # a join changes the batch bucket
            if step % 10 == 9:
                for state in states:
                    state.truncate(len(state.tokens) - 2)  # a rollback, as after rejected drafts
            logits = runner.forward(states, logits_to_keep=1)
            for i, state in enumerate(states):
                state.tokens.append(int(logits[i, -1].argmax()))
        runs[layout] = [s.tokens for s in states]
        if layout == "graphs":  # the start-up grid: every decode and verify step replays, none fails to capture
            assert runner.graphs.graphs and not runner.graphs.failed and runner.graphs.replays >= 40
    for layout, least in (("graphs", 0.95), ("dynamic", 0.9)):  # bf16 rounds differently per kernel and shape
        same = sum(a == b for x, y in zip(runs[layout], runs["static"], strict=True) for a, b in zip(x, y, strict=True))
        total = sum(len(x) for x in runs["static"])
        assert same / total >= least, f"{layout} vs eager static: {same}/{total} tokens agree"
