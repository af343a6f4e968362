"""The draft's prefill as auto's stage model sees it: new prompts are a per-round cost of speculating, sequences
re-sent after the draft lost them are not (they are paid once, when speculation resumes). Real draft service."""

import asyncio

from transformers import AutoTokenizer

from minedraft.engine.sampling import Sampling
from minedraft.protos import draft_pb2_grpc
from services.router import messages
from services.router.backends import Backend
from services.router.drafting import Drafter
from services.router.lanes import Lane
from services.router.recorder import Recorder
from services.router.request import Request
from services.router.stage_model import StageModel
from services.router.text_stream import TextStream
from tests.conftest import internal_channel

Charged = tuple[float, float, float]  # the stage model's prefill ms and prompts, and the lane's draft ms


async def prefill_twice(cluster, tokenizer, catching_up: bool) -> tuple[Charged, Charged, list[Request]]:
    async with internal_channel(cluster, cluster.draft_address) as channel:
        stages, lane = StageModel(), Lane(0)
        drafter = Drafter(Backend("draft", channel, draft_pb2_grpc.DraftStub), stages, Recorder(), 30.0, 512)
        requests = [Request(seq_id=f"drafting-{catching_up}-{i}", sampling=Sampling(), max_tokens=8,
                            prompt_ids=tokenizer.encode(p, add_special_tokens=False),
                            text=TextStream(tokenizer, []), eos_ids=frozenset())
                    for i, p in enumerate(["def add(a, b):", "Hello there, how are you today?"])]
        await drafter.prefill(requests, lane, threads=0, catching_up=catching_up)
        after_new = stages.prompt_prefill_ms, stages.prompts_prefilled, lane.draft_ms
        await drafter.prefill(requests, lane, threads=0, catching_up=True)  # the draft lost them: re-sent
        after_resend = stages.prompt_prefill_ms, stages.prompts_prefilled, lane.draft_ms
        await drafter.draft.stub.Release(messages.release(r.seq_id for r in requests))
        return after_new, after_resend, requests


def test_only_new_prompts_count_as_the_drafts_prefill_cost(tiny_clusters, tiny_pair) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    after_new, after_resend, requests = asyncio.run(prefill_twice(tiny_clusters["psd"], tokenizer, True))
    assert after_new[0] > 0 and after_new[1] == 2 and after_new[2] == after_new[0], "new prompts are charged"
    assert after_resend[:2] == after_new[:2], "a re-send is not"
    assert all(r.draft_sent and r.draft_len == len(r.tokens) for r in requests)


def test_prompts_cached_beside_the_targets_prefill_count_at_no_cost(tiny_clusters, tiny_pair) -> None:
    """On separate devices the draft caches a prompt while the target runs it: a prompt, but no round's time."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    after_new, after_resend, _ = asyncio.run(prefill_twice(tiny_clusters["psd"], tokenizer, False))
    assert after_new == (0.0, 2, 0.0)
    assert after_resend[:2] == after_new[:2]


async def propose_with(cluster, tokenizer, stop_below: float, extra: int) -> tuple[dict[str, list], StageModel]:
    async with internal_channel(cluster, cluster.draft_address) as channel:
        stages = StageModel()
        drafter = Drafter(Backend("draft", channel, draft_pb2_grpc.DraftStub), stages, Recorder(), 30.0, 512,
                          stop_below=stop_below)
        requests = [Request(seq_id=f"stop-{stop_below}-{extra}-{i}", sampling=Sampling(), max_tokens=16,
                            prompt_ids=tokenizer.encode(p, add_special_tokens=False),
                            text=TextStream(tokenizer, []), eos_ids=frozenset())
                    for i, p in enumerate(["def add(a, b):", "Hello there"])]
        try:
            drafts = await drafter.propose(Lane(0), requests, k=4, shared=False, threads=0, extra=extra)
        finally:
            await drafter.draft.stub.Release(messages.release(r.seq_id for r in requests))
        return drafts, stages


def test_the_router_stops_drafting_early_but_not_under_tetris(tiny_clusters, tiny_pair) -> None:
    """A tiny random draft gives every token about 1/vocab: with a threshold of 0.5 each proposal stops after
    one draft, and the stage model learns one step ran; TETRIS (extra > 0) drafts k + extra regardless."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    stopped, stages = asyncio.run(propose_with(tiny_clusters["psd"], tokenizer, 0.5, extra=0))
    assert [len(d) for d in stopped.values()] == [1, 1]
    full, _ = asyncio.run(propose_with(tiny_clusters["psd"], tokenizer, 0.0, extra=0))
    assert [len(d) for d in full.values()] == [4, 4]
    assert [d[0].token_id for d in stopped.values()] == [d[0].token_id for d in full.values()]
    tetris, _ = asyncio.run(propose_with(tiny_clusters["psd"], tokenizer, 0.5, extra=2))
    assert sum(map(len, tetris.values())) == 8, "TETRIS keeps k x size of the k + extra positions it drafted"
    assert stages.alone.draft_step.known


class CountingStages(StageModel):
    """Counts the draft steps the stage model is shown."""

    proposes_seen: int = 0

    def observe_propose(self, *args, **kwargs) -> None:
        self.proposes_seen += 1
        super().observe_propose(*args, **kwargs)


async def propose_around_a_spell(cluster, tokenizer) -> list[int]:
    """Proposes once, then after twelve target-only tokens (the draft missed them), then after a normal round."""
    async with internal_channel(cluster, cluster.draft_address) as channel:
        stages = CountingStages()
        drafter = Drafter(Backend("draft", channel, draft_pb2_grpc.DraftStub), stages, Recorder(), 30.0, 512)
        requests = [Request(seq_id=f"spell-{i}", sampling=Sampling(), max_tokens=32, text=TextStream(tokenizer, []),
                            prompt_ids=tokenizer.encode(p, add_special_tokens=False), eos_ids=frozenset())
                    for i, p in enumerate(["def add(a, b):", "Hello there"])]
        seen = []
        try:
            for new_tokens in ([], list(range(11, 23)), [23]):
                for request in requests:
                    request.add_tokens(new_tokens)
                await drafter.propose(Lane(0), requests, k=4, shared=False, threads=0)
                seen.append(stages.proposes_seen)
                for request in requests:  # a verify that accepted none of the drafts
                    request.draft_len = len(request.tokens)
        finally:
            await drafter.draft.stub.Release(messages.release(r.seq_id for r in requests))
        assert stages.draft_ms_per_token is not None, "the prompts' prefill prices a re-send"
        return seen


def test_a_propose_that_catches_the_draft_up_is_not_a_draft_steps_cost(tiny_clusters, tiny_pair) -> None:
    """After target-only rounds the first propose also caches the tokens the draft missed: timed as draft steps
    it would make speculating look dearer than it is, just when a probe is measuring whether it pays."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    assert asyncio.run(propose_around_a_spell(tiny_clusters["psd"], tokenizer)) == [1, 1, 2]
