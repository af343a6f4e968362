"""However the auto plan moves, output is unchanged: a router scheduler forced to change its lanes and k at
every lane boundary (closing lane 1 hands its sequences over, reopening rebalances) must emit exactly the
greedy tokens of target-only decoding. Real draft and target services, real gRPC on loopback."""

import asyncio
import itertools

from transformers import AutoTokenizer

from minedraft.engine.sampling import Sampling
from minedraft.protos import draft_pb2_grpc, target_pb2_grpc
from services.router import policy as policy_module
from services.router import probe as probe_module
from services.router.backends import Backend
from services.router.k_trial import KTrial
from services.router.policy import Plan
from services.router.request import Request
from services.router.scheduler import Scheduler
from services.router.text_stream import TextStream
from tests.conftest import internal_channel

PROMPTS = ["def add(a, b):", "Hello", "The quick brown fox jumps over the lazy dog.", "for i in range(10):\n",
           "class Lane:", "import torch\nx = ", "a"]
PLANS = [Plan(2, 3, 0.0), Plan(1, 0, 0.0), Plan(1, 5, 0.0), Plan(2, 1, 0.0), Plan(2, 0, 0.0), Plan(1, 2, 0.0),
         Plan(2, 6, 0.0)]


async def generate(cluster, tokenizer, mode: str, prompt_ids: list[list[int]], max_tokens: int) -> list[Request]:
    async with internal_channel(cluster, cluster.target_address) as target_channel, \
            internal_channel(cluster, cluster.draft_address) as draft_channel:
        target = Backend("target", target_channel, target_pb2_grpc.TargetStub)
        draft = Backend("draft", draft_channel, draft_pb2_grpc.DraftStub) if mode != "ar" else None
        scheduler = Scheduler(target, draft, mode=mode, k=4, max_batch=3)
        scheduler.start()
        requests = [Request(seq_id=f"{mode}-{i}", prompt_ids=ids, sampling=Sampling(), max_tokens=max_tokens,
                            text=TextStream(tokenizer, []), eos_ids=frozenset()) for i, ids in enumerate(prompt_ids)]
        for request in requests:  # staggered, so requests join lanes mid-flight
            scheduler.submit(request)
            await asyncio.sleep(0.02)
        while not all(r.done for r in requests):
            await asyncio.sleep(0.02)
        await scheduler.stop()
        assert all(r.finish_reason == "length" for r in requests)
        return requests


def test_forced_plan_changes_every_boundary_change_no_token(tiny_clusters, tiny_pair, monkeypatch) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    cluster = tiny_clusters["psd"]  # its draft and target services; this test brings its own router
    expected = [r.generated for r in asyncio.run(generate(cluster, tokenizer, "ar", prompt_ids, max_tokens=30))]

    plans = itertools.cycle(PLANS)
    chosen: list[Plan] = []

    def forced_plan(*_args, **_kwargs) -> Plan:
        chosen.append(next(plans))
        return chosen[-1]

    monkeypatch.setattr(policy_module, "next_plan", forced_plan)
    # Let every forced k through: the measured-gain gate would hold a step until a window of rounds is timed.
    monkeypatch.setattr(KTrial, "decide", lambda _self, _current, wanted, _sequences: wanted)
    switched = asyncio.run(generate(cluster, tokenizer, "auto", prompt_ids, max_tokens=30))
    assert [r.generated for r in switched] == expected
    drafted, accepted = sum(r.drafted for r in switched), sum(r.accepted for r in switched)
    assert 0 < accepted < drafted, "premise: drafts were proposed, and some rejected"
    assert len(chosen) >= 2 * len(PLANS), "the plan must have moved through every layout and k, more than once"



def test_probes_after_target_only_change_no_token(tiny_clusters, tiny_pair, monkeypatch) -> None:
    """The plan drops to target-only after every speculating round and only a probe brings it back (due after
    any target-only round here): each probe re-sends the draft what it missed, and the output stays
    target-only's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair[0])
    prompt_ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    cluster = tiny_clusters["psd"]
    expected = [r.generated for r in asyncio.run(generate(cluster, tokenizer, "ar", prompt_ids, max_tokens=30))]

    monkeypatch.setattr(policy_module, "next_plan", lambda model, current, *_args, **_kwargs:
                        Plan(1, 0, 0.0) if current.k and model.known else current)  # a round timed: drop
    monkeypatch.setattr(probe_module, "PROBE_RATIO", 0.0)
    monkeypatch.setattr(probe_module, "PROBE_WITHIN", float("inf"))
    probes = []
    revise = probe_module.Probe.revise

    def counted(self, model, current, *args) -> Plan:
        plan = revise(self, model, current, *args)
        probes.extend([plan] if plan.k and not current.k else [])
        return plan

    monkeypatch.setattr(probe_module.Probe, "revise", counted)
    probed = asyncio.run(generate(cluster, tokenizer, "auto", prompt_ids, max_tokens=30))
    assert [r.generated for r in probed] == expected
    assert len(probes) >= 3, "premise: the plan went back to speculating through probes, again and again"
    assert sum(r.drafted for r in probed) > 0
