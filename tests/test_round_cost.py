"""What auto prices each round with (the scheduler's device time for it), whatever a monitor does meanwhile:
a GetStats(clear=True) used to reset the counter a round's draft time was read from, mid-round, and the round
then cost minus all the draft time before it. Real draft and target services on the tiny pair, real gRPC."""

import asyncio

from transformers import AutoTokenizer

from minedraft.engine.sampling import Sampling
from minedraft.protos import draft_pb2_grpc, target_pb2_grpc
from services.router.backends import Backend
from services.router.request import Request
from services.router.scheduler import Scheduler
from services.router.text_stream import TextStream
from tests.conftest import internal_channel


async def costs_while_cleared(cluster, tokenizer) -> list[tuple[int, int, float]]:
    """One auto request with the monitor's counters cleared before every proposal: each round's (lanes, k, ms)."""
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        scheduler = Scheduler(Backend("target", target_channel, target_pb2_grpc.TargetStub),
                              Backend("draft", draft_channel, draft_pb2_grpc.DraftStub), mode="auto", k=2)
        seen: list[tuple[int, int, float]] = []
        observe, propose = scheduler.planner.observe, scheduler.drafter.propose

        def recorded(lanes: int, k: int, sequences: int, ms: float) -> None:
            seen.append((lanes, k, ms))
            observe(lanes, k, sequences, ms)

        async def cleared_first(*args, **kwargs):
            scheduler.snapshot(clear=True)  # as a monitor's GetStats(clear=True) landing mid-round
            return await propose(*args, **kwargs)

        scheduler.planner.observe, scheduler.drafter.propose = recorded, cleared_first
        scheduler.planner.next = lambda current, *_: current  # speculate throughout (the tiny draft is random)
        scheduler.start()
        request = Request(seq_id="cost-0", sampling=Sampling(), max_tokens=24,
                          prompt_ids=tokenizer.encode("def add(a, b):", add_special_tokens=False),
                          text=TextStream(tokenizer, []), eos_ids=frozenset())
        scheduler.submit(request)
        while not request.done:
            await asyncio.sleep(0.02)
        await scheduler.stop()
        return seen


def test_a_monitor_clearing_its_counters_mid_round_leaves_round_costs_alone(tiny_clusters, tiny_pair) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    seen = asyncio.run(costs_while_cleared(tiny_clusters["sd"], tokenizer))
    speculative = [ms for _, k, ms in seen if k > 0]
    assert len(speculative) >= 3, "premise: several rounds drafted"
    assert all(ms > 0 for _, _, ms in seen), seen
