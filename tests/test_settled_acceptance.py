"""auto's acceptance is measured past a completion's first tokens until a jump's worth of rounds is (stage_model
.settled): they are accepted less often than the rest, and early in a run they alone made drafting look far
dearer than it was. Real draft and target services on the tiny pair, real gRPC on loopback."""

import asyncio

from transformers import AutoTokenizer

from minedraft.engine.sampling import Sampling
from minedraft.protos import draft_pb2_grpc, target_pb2_grpc
from services.router import stage_model
from services.router.backends import Backend
from services.router.request import Request
from services.router.scheduler import Scheduler
from services.router.stage_model import MIN_ROUNDS_TO_JUMP, SHORT_COMPLETIONS, StageModel, settled
from services.router.text_stream import TextStream
from tests.conftest import internal_channel

MAX_TOKENS, K = 64, 2  # settled from token 16


def test_a_completion_settles_after_its_first_tokens() -> None:
    assert not settled(15, 64) and settled(16, 64) and settled(16, 1000)
    assert not settled(1, 8) and settled(2, 8), "a short completion settles after a quarter of it"
    measured = StageModel(rounds=MIN_ROUNDS_TO_JUMP)
    assert measured.measures(1, 64) and not StageModel().measures(1, 64), "once a jump's worth is measured, all"
    short = StageModel()
    for _ in range(SHORT_COMPLETIONS - 1):
        short.completed(10, 64, natural=True, drafted=True)
    short.completed(40, 64, natural=True, drafted=True)
    short.completed(10, 64, natural=True, drafted=True)
    assert not short.measures(1, 64), "one that settled offsets one that did not"
    short.completed(10, 64, natural=True, drafted=True)
    assert short.measures(1, 64), "where completions end before settling, every round counts"
    for _ in range(SHORT_COMPLETIONS):
        short.completed(10, 64, natural=True, drafted=False)
    assert short.measures(1, 64), "a completion that did not speculate says nothing of settling"


async def two_requests(cluster, tokenizer) -> tuple[list[int], list[list[int]], StageModel]:
    """Two sd requests one after the other: (the rounds the stage model measured during each, their tokens,
    the stage model)."""
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        scheduler = Scheduler(Backend("target", target_channel, target_pb2_grpc.TargetStub),
                              Backend("draft", draft_channel, draft_pb2_grpc.DraftStub), mode="sd", k=K)
        scheduler.start()
        measured, outputs = [], []
        for i, prompt in enumerate(["def add(a, b):", "Hello there"]):
            before = scheduler.stages.rounds
            request = Request(seq_id=f"settle-{stage_model.SETTLE_TOKENS}-{i}", sampling=Sampling(),
                              max_tokens=MAX_TOKENS, prompt_ids=tokenizer.encode(prompt, add_special_tokens=False),
                              text=TextStream(tokenizer, []), eos_ids=frozenset())
            scheduler.submit(request)
            while not request.done:
                await asyncio.sleep(0.02)
            measured.append(scheduler.stages.rounds - before)
            outputs.append(request.generated)
        await scheduler.stop()
        return measured, outputs, scheduler.stages


def test_rounds_among_the_first_tokens_are_measured_only_once_enough_others_are(
        tiny_clusters, tiny_pair, monkeypatch) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    (first, second), outputs, stages = asyncio.run(two_requests(tiny_clusters["sd"], tokenizer))
    monkeypatch.setattr(stage_model, "SETTLE_TOKENS", 0)
    (every_first, every_second), same_outputs, every = asyncio.run(two_requests(tiny_clusters["sd"], tokenizer))
    assert same_outputs == outputs, "premise: the same rounds, the same output"
    assert first >= MIN_ROUNDS_TO_JUMP, "premise: the first request's later rounds make a jump's worth"
    # Its rounds start after the prefill's token and make at most k + 1 tokens each: 15 tokens, 5 rounds or more.
    assert first <= every_first - -(-(MAX_TOKENS // 4 - 1) // (K + 1)), "the first tokens' rounds are held back"
    assert second == every_second, "once a jump's worth is measured, every round counts"
    assert stages.drafted < every.drafted, "α leaves them out too"


async def short_answers(cluster, tokenizer) -> tuple[StageModel, list[int]]:
    """SHORT_COMPLETIONS + 2 sd requests, one after the other on a fresh scheduler, that end on EOS as their sixth token
    (a first scheduler found the token that ends the greedy answer there): (the stage model, the rounds it had
    measured after each)."""
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        prompt = tokenizer.encode("def add(a, b):", add_special_tokens=False)

        async def answers(count: int, eos: frozenset[int]) -> tuple[Scheduler, list[Request], list[int]]:
            scheduler = Scheduler(Backend("target", target_channel, target_pb2_grpc.TargetStub),
                                  Backend("draft", draft_channel, draft_pb2_grpc.DraftStub), mode="sd", k=K)
            scheduler.start()
            requests, rounds = [], []
            for i in range(count):
                request = Request(seq_id=f"short-{len(eos)}-{i}", sampling=Sampling(), max_tokens=MAX_TOKENS,
                                  prompt_ids=prompt, text=TextStream(tokenizer, []), eos_ids=eos)
                scheduler.submit(request)
                while not request.done:
                    await asyncio.sleep(0.02)
                requests.append(request)
                rounds.append(scheduler.stages.rounds)
            await scheduler.stop()
            return scheduler, requests, rounds

        _, (long,), _ = await answers(1, frozenset())
        eos = frozenset({long.generated[5]} - set(long.generated[:5]))
        assert eos, "premise: the greedy answer's sixth token is new to it"
        scheduler, requests, rounds = await answers(SHORT_COMPLETIONS + 2, eos)
        assert all(len(r.generated) == 5 for r in requests), "premise: every answer ends on EOS, its sixth token"
        return scheduler.stages, rounds


def test_where_completions_end_before_settling_every_round_counts(tiny_clusters, tiny_pair) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    stages, rounds = asyncio.run(short_answers(tiny_clusters["sd"], tokenizer))
    assert stages.short_endings == SHORT_COMPLETIONS, "premise: every answer ended unsettled (capped)"
    assert rounds[:SHORT_COMPLETIONS] == [0] * SHORT_COMPLETIONS, "the first answers' rounds are held back"
    assert rounds[SHORT_COMPLETIONS] > 0, "once enough answers ended so, their rounds measure acceptance"
    assert stages.completion_length < 20, "answers of 5 tokens, not the 64 they asked: prefill costs them more"
