"""What auto prices each round with (the scheduler's device time for it), whatever a monitor does meanwhile:
a GetStats(clear=True) used to reset the counter a round's draft time was read from, mid-round, and the round
then cost minus all the draft time before it. Real draft and target services on the tiny pair, real gRPC."""

import asyncio
import itertools

from transformers import AutoTokenizer

from minedraft.engine.sampling import Sampling
from minedraft.protos import draft_pb2_grpc, target_pb2_grpc
from services.router.auto_plan import AutoPlanner
from services.router.backends import Backend
from services.router.request import Request
from services.router.scheduler import Scheduler
from services.router.stage_model import StageModel
from services.router.text_stream import TextStream
from tests.conftest import internal_channel

# The draft may still hold a finished test's sequence for a moment after its scheduler stops: a new id each time.
SEQ_IDS = itertools.count()


async def round_costs(cluster, tokenizer, undrafted_every: int = 0, asked: list[list[int]] | None = None,
                      models: list[StageModel] | None = None) -> list[tuple[int, float, float]]:
    """One auto request with the monitor's counters cleared before every proposal, and (undrafted_every > 0) the
    drafts of every such proposal dropped after the draft made them: each round's (k, cost ms, verify ms); `asked`
    gets the max_tokens in flight the stage model held at each plan, `models` the stage model."""
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        scheduler = Scheduler(Backend("target", target_channel, target_pb2_grpc.TargetStub),
                              Backend("draft", draft_channel, draft_pb2_grpc.DraftStub), mode="auto", k=2)
        seen: list[tuple[int, float, float]] = []
        verify_ms: list[float] = []
        observe, propose, verify = scheduler.planner.observe, scheduler.drafter.propose, scheduler._verify

        def recorded(lanes: int, k: int, sequences: int, ms: float, plain: int = 0) -> None:
            seen.append((k, ms, verify_ms[-1]))
            observe(lanes, k, sequences, ms, plain)

        async def cleared_first(*args, **kwargs):
            scheduler.snapshot(clear=True)  # as a monitor's GetStats(clear=True) landing mid-round
            drafts = await propose(*args, **kwargs)
            cleared_first.calls += 1
            return {} if undrafted_every and cleared_first.calls % undrafted_every == 0 else drafts

        async def timed(*args, **kwargs):
            response = await verify(*args, **kwargs)
            verify_ms.append(response.stats.forward_ms)
            return response

        cleared_first.calls = 0
        scheduler.planner.observe, scheduler.drafter.propose, scheduler._verify = recorded, cleared_first, timed
        def kept(current, *_):  # speculate throughout (the tiny draft is random)
            if asked is not None:
                asked.append(list(scheduler.stages.asked))
            return current

        scheduler.planner.next = kept
        scheduler.start()
        request = Request(seq_id=f"cost-{next(SEQ_IDS)}", sampling=Sampling(), max_tokens=24,
                          prompt_ids=tokenizer.encode("def add(a, b):", add_special_tokens=False),
                          text=TextStream(tokenizer, []), eos_ids=frozenset())
        scheduler.submit(request)
        while not request.done:
            await asyncio.sleep(0.02)
        await scheduler.stop()
        if models is not None:
            models.append(scheduler.stages)
        return seen


def test_a_monitor_clearing_its_counters_mid_round_leaves_round_costs_alone(tiny_clusters, tiny_pair) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    seen = asyncio.run(round_costs(tiny_clusters["sd"], tokenizer))
    speculative = [ms for k, ms, _ in seen if k > 0]
    assert len(speculative) >= 3, "premise: several rounds drafted"
    assert all(ms > 0 for _, ms, _ in seen), seen


def test_auto_plans_knowing_what_the_requests_in_flight_ask(tiny_clusters, tiny_pair) -> None:
    """The draft's prefill is spread over what completions make, which the requests in flight bound."""
    tokenizer, asked = AutoTokenizer.from_pretrained(tiny_pair[0]), []
    asyncio.run(round_costs(tiny_clusters["sd"], tokenizer, asked=asked))
    assert [24] in asked and set(map(tuple, asked)) <= {(24,), ()}, asked


def test_live_rounds_are_measured_as_live(tiny_clusters, tiny_pair) -> None:
    """The scheduler's and the drafter's calls count as live: the costs they measure are read as measured, no
    longer at the host's pace (stage_costs.py)."""
    tokenizer, models = AutoTokenizer.from_pretrained(tiny_pair[0]), []
    asyncio.run(round_costs(tiny_clusters["sd"], tokenizer, models=models))
    costs = models[0].alone
    assert costs.draft_step.live and costs.verify.by_k[2].live


def test_a_round_that_sent_no_drafts_costs_its_verify_alone(tiny_clusters, tiny_pair) -> None:
    """The draft's time in a round whose drafts never went out (the draft failed, or sent none) is not that
    round's cost: priced as a target-only round, it is its verify; a drafted round costs more than its verify."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    seen = asyncio.run(round_costs(tiny_clusters["sd"], tokenizer, undrafted_every=3))
    undrafted, drafted = [c for c in seen if c[0] == 0], [c for c in seen if c[0] > 0]
    assert len(undrafted) >= 3 and len(drafted) >= 3, seen
    assert all(cost == verify for _, cost, verify in undrafted), undrafted
    assert all(cost > verify for _, cost, verify in drafted), drafted


def test_a_round_is_priced_by_what_it_drafted() -> None:
    """Nothing drafted: a target-only round costing its verify. Beside the other lane: the slower stage, else
    draft plus verify; sequences sent no drafts count as rounds that made one token."""
    planner, seen = AutoPlanner(StageModel(), k=4, k_max=8), []
    planner.observe = lambda *args, **kwargs: seen.append((args, kwargs))
    planner.price(2, 4, 3, 0, 50.0, 80.0, beside=True)
    planner.price(2, 4, 3, 2, 50.0, 80.0, beside=True)
    planner.price(1, 4, 3, 3, 50.0, 80.0, beside=False)
    assert seen == [((2, 0, 3, 80.0), {}), ((2, 4, 3, 80.0), {"plain": 1}), ((1, 4, 3, 130.0), {"plain": 0})]
