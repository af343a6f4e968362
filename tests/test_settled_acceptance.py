"""auto's acceptance is measured past a completion's first tokens (stage_model.settled): they are accepted less
often than the rest, and early in a run they alone made drafting look far dearer than it was. Real draft and
target services on the tiny pair, real gRPC on loopback."""

import asyncio

from transformers import AutoTokenizer

from minedraft.engine.sampling import Sampling
from minedraft.protos import draft_pb2_grpc, target_pb2_grpc
from services.router import stage_model
from services.router.backends import Backend
from services.router.request import Request
from services.router.scheduler import Scheduler
from services.router.stage_model import settled
from services.router.text_stream import TextStream
from tests.conftest import internal_channel

MAX_TOKENS = 24  # settled from token 6 (a quarter of it)


def test_a_completion_settles_after_its_first_tokens() -> None:
    assert not settled(15, 64) and settled(16, 64) and settled(16, 1000)
    assert not settled(1, 8) and settled(2, 8), "a short completion settles after a quarter of it"


async def measured_rounds(cluster, tokenizer) -> tuple[int, int, list[int]]:
    """(sequence rounds the stage model measured, rounds that drafted, the tokens) for one sd request."""
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        scheduler = Scheduler(Backend("target", target_channel, target_pb2_grpc.TargetStub),
                              Backend("draft", draft_channel, draft_pb2_grpc.DraftStub), mode="sd", k=2)
        scheduler.start()
        request = Request(seq_id=f"settle-{stage_model.SETTLE_TOKENS}", sampling=Sampling(), max_tokens=MAX_TOKENS,
                          prompt_ids=tokenizer.encode("def add(a, b):", add_special_tokens=False),
                          text=TextStream(tokenizer, []), eos_ids=frozenset())
        scheduler.submit(request)
        while not request.done:
            await asyncio.sleep(0.02)
        await scheduler.stop()
        return scheduler.stages.rounds, request.rounds, request.generated


def test_only_rounds_past_the_first_tokens_measure_acceptance(tiny_clusters, tiny_pair, monkeypatch) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    measured, rounds, tokens = asyncio.run(measured_rounds(tiny_clusters["sd"], tokenizer))
    monkeypatch.setattr(stage_model, "SETTLE_TOKENS", 0)
    every, same_rounds, same_tokens = asyncio.run(measured_rounds(tiny_clusters["sd"], tokenizer))
    assert (same_rounds, same_tokens) == (rounds, tokens), "premise: the same rounds, the same output"
    assert every >= MAX_TOKENS // 4, "premise: with nothing held back, the rounds measured are those that drafted"
    assert 0 < measured < every, "the rounds among the first tokens are not measured"
    assert measured <= every - MAX_TOKENS // 4 // (2 + 1), "at most k + 1 = 3 tokens a round: 2 rounds held back"
