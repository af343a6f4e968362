"""The static (slot) KV layout and its fixed-shape padding must give exactly the dynamic layout's tokens."""

import pytest
import torch

from minedraft.engine.model_runner import ModelRunner, SequenceState
from minedraft.engine.sampling import Sampling
from minedraft.engine.slot_attention import PAGE
from minedraft.engine.static_kv import available_bytes, bucket, fit_context, kv_shape
from minedraft.errors import ResourceExhausted
from services.draft.engine import DraftEngine
from services.target.engine import TargetEngine, Verdict
from tests.formats import NEEDS_FBGEMM
from tests.test_engines import PROMPTS as ENGINE_PROMPTS
from tests.test_engines import speculate
from tests.test_model_runner import PROMPTS, reference_greedy

LAYOUTS = {"dynamic": {"kv": "dynamic"}, "static": {"kv": "static", "max_seqs": 8, "max_context": 64},
           "static-padded": {"kv": "static", "max_seqs": 8, "max_context": 64}}


def load(path, layout: str, dtype: str = "float64") -> ModelRunner:
    runner = ModelRunner.load(str(path), dtype=dtype, **LAYOUTS[layout])
    if layout == "static-padded":  # the shapes a CUDA graph replays: batch and width buckets, scratch rows
        runner.static.pad_shapes = True
        runner.static.min_width = 16
    return runner


@pytest.mark.parametrize("layout", ["static", "static-padded"])
def test_static_greedy_decoding_matches_uncached_reference(tiny_pair, layout: str) -> None:
    from transformers import AutoModelForCausalLM

    runner = load(tiny_pair[0], layout)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_pair[0]), dtype=torch.float64).eval()
    states = [SequenceState(list(p)) for p in PROMPTS]
    for _ in range(24):  # crosses a width bucket (16 → 32) in the padded layout
        logits = runner.forward(states, logits_to_keep=1)
        assert logits.shape[0] == len(states)
        for i, state in enumerate(states):
            state.tokens.append(int(logits[i, -1].argmax()))
    for prompt, state in zip(PROMPTS, states, strict=True):
        assert state.tokens[len(prompt):] == reference_greedy(reference, prompt, 24)


@pytest.mark.parametrize("layout", ["static", "static-padded"])
def test_static_feed_and_rollback_match_dynamic_logits(tiny_pair, layout: str) -> None:
    """Multi-token feeds, rollbacks and re-feeds (what verify does) leave the same logits as the dynamic cache."""
    runners = {"dynamic": load(tiny_pair[0], "dynamic"), layout: load(tiny_pair[0], layout)}
    states = {name: [SequenceState(list(range(3, 15))), SequenceState([40, 41])] for name in runners}
    script = [([50, 51, 52], [60]), ("rollback", 13, 3), ([70, 71], [61, 62, 63]), ("rollback", 15, 4), ([9], [8])]
    for name, runner in runners.items():
        runner.forward(states[name], logits_to_keep=1)
    for step in script:
        outs = {}
        for name, runner in runners.items():
            long, short = states[name]
            if step[0] == "rollback":
                long.truncate(step[1])
                short.truncate(step[2])
                continue
            long.tokens += step[0]
            short.tokens += step[1]
            outs[name] = runner.forward([long, short], logits_to_keep=3)
        if outs:  # rows before a sequence's own new tokens are padding: only its own rows mean anything
            for row, fed in enumerate(step):
                assert torch.allclose(outs["dynamic"][row, -len(fed):], outs[layout][row, -len(fed):], atol=1e-10)


def test_static_engines_speculate_exactly_like_dynamic(tiny_pair) -> None:
    """Greedy and sampled rounds through both engines: same tokens with either layout, and slots come back."""
    results = {}
    for layout in ("dynamic", "static", "static-padded"):
        target = TargetEngine(load(tiny_pair[0], layout))
        draft = DraftEngine(load(tiny_pair[1], layout), top_m=8)
        results[layout] = speculate(target, draft, list(ENGINE_PROMPTS), rounds=6, batched=True)
        if layout != "dynamic":
            assert target.runner.static.slots_free == draft.runner.static.slots_free == 8
    assert results["static"] == results["dynamic"]
    assert results["static-padded"] == results["dynamic"]


def test_static_cache_full_is_resource_exhausted_and_frees_on_release(tiny_pair) -> None:
    target = TargetEngine(ModelRunner.load(str(tiny_pair[0]), dtype="float64", kv="static", max_seqs=2,
                                           max_context=32))
    _, second, third = target.prefill([("a", [1, 2], Sampling()), ("b", [3, 4], Sampling()),
                                       ("c", [5, 6], Sampling())])
    assert isinstance(third, ResourceExhausted) and isinstance(second, Verdict)  # the newcomer alone is refused
    assert target.runner.static.slots_free == 0
    (too_long,) = target.prefill([("c", list(range(40)), Sampling())])
    assert "exceeds" in str(too_long) and "c" not in target.table
    target.release(["a"])
    assert isinstance(target.prefill([("c", [5, 6], Sampling())])[0], Verdict)
    assert target.runner.static.slots_free == 0 and len(target.table) == 2
    target.release(["b", "c"])
    assert target.runner.static.slots_free == 2

def test_buckets() -> None:
    assert [bucket(b, 1, 64) for b in (1, 2, 3, 5, 9, 33, 64)] == [1, 2, 4, 8, 16, 64, 64]
    assert [bucket(w, 256, 1000) for w in (1, 256, 257, 900)] == [256, 256, 512, 1000]


def test_static_kv_cluster_matches_target_only_and_router_knows_its_context(clusters, tiny_clusters,
                                                                            tiny_pair) -> None:
    """psd with static caches on both services == dynamic target-only; the router refuses what would overflow."""
    import grpc

    from minedraft.app.client import collect, make_request, stream
    from tests.conftest import channel_to
    from tests.test_end_to_end import PROMPTS as E2E_PROMPTS
    from tests.test_end_to_end import run_all

    static = clusters.get("psd", tiny_pair, max_batch=4, kv="static", max_seqs=16, max_context=256)
    assert [r.token_ids for r in run_all(static, E2E_PROMPTS)] == \
        [r.token_ids for r in run_all(tiny_clusters["ar"], E2E_PROMPTS)]
    with channel_to(static) as channel, pytest.raises(grpc.RpcError) as error:
        collect(stream(channel, make_request(prompt="Hello", max_tokens=300), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context 256" in error.value.details()


def test_a_cache_larger_than_free_memory_is_refused_at_start(tiny_pair) -> None:
    with pytest.raises(ValueError, match="lower --max-seqs or --max-context"):
        ModelRunner.load(str(tiny_pair[0]), dtype="float32", kv="static", max_seqs=1 << 20, max_context=1000)


def fraction_for_pages(model_path, slots: int, pages: float) -> float:
    """The memory fraction that holds `pages` pages of float64 KV in each of `slots` slots (and the scratch slot)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    _, _, heads, head_dim = kv_shape(config, slots, 1)
    per_page = 2 * config.num_hidden_layers * heads * head_dim * 8 * PAGE
    return pages * (slots + 1) * per_page / available_bytes(torch.device("cpu"))


def test_an_unsized_cache_shrinks_to_whole_pages_that_fit_and_a_sized_one_is_refused(tiny_pair) -> None:
    from transformers import AutoConfig

    config, cpu = AutoConfig.from_pretrained(tiny_pair[0]), torch.device("cpu")
    fraction = fraction_for_pages(tiny_pair[0], 16, 5.5)  # 5 pages a slot: a context of 4 (and a scratch column)
    assert fit_context(config, 16, 0, 1 << 30, torch.float64, cpu, fraction) == 4 * PAGE
    assert fit_context(config, 16, 0, 300, torch.float64, cpu, fraction) == 300  # the model's limit fits whole
    assert fit_context(config, 16, 4 * PAGE, 1 << 30, torch.float64, cpu, fraction) == 4 * PAGE
    with pytest.raises(ValueError, match="lower --max-seqs or --max-context"):
        fit_context(config, 16, 5 * PAGE, 1 << 30, torch.float64, cpu, fraction)
    with pytest.raises(ValueError, match="lower --max-seqs or --max-context"):  # under two pages: not worth serving
        fit_context(config, 16, 0, 1 << 30, torch.float64, cpu, fraction_for_pages(tiny_pair[0], 16, 1.5))


def deeper_copy(model_path, out) -> str:
    """A random model with twice `model_path`'s layers and its tokenizer: twice the KV bytes per token."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_path)
    config.num_hidden_layers *= 2
    config.layer_types = config.layer_types * 2  # one attention type per layer
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return str(out)


def held_contexts(cluster) -> list[int]:
    """What the target's and the draft's caches hold, from their own Renew answers."""
    import asyncio

    from minedraft.protos import common_pb2, draft_pb2_grpc, target_pb2_grpc
    from tests.conftest import internal_channel

    async def ask() -> list[int]:
        held = []
        for address, stub in ((cluster.target_address, target_pb2_grpc.TargetStub),
                              (cluster.draft_address, draft_pb2_grpc.DraftStub)):
            async with internal_channel(cluster, address) as channel:
                held.append((await stub(channel).Renew(common_pb2.RenewRequest())).max_context)
        return held

    return asyncio.run(ask())


def test_the_router_serves_the_least_context_its_services_could_fit(clusters, tiny_pair, tmp_path) -> None:
    """A draft with twice the target's layers fits half the context in the same memory: the router serves the
    draft's, and refuses a request that would outgrow it. (Free memory moves between this test and the load, so
    each context may be a page off.)"""
    import grpc

    from minedraft.app.client import collect, make_request, stream
    from minedraft.protos import generate_pb2, generate_pb2_grpc
    from tests.conftest import channel_to

    deeper = deeper_copy(tiny_pair[1], tmp_path / "deeper")
    cluster = clusters.get("sd", (tiny_pair[0], deeper), kv="static", max_seqs=16,
                           kv_memory_fraction=fraction_for_pages(deeper, 16, 3.5))
    target_holds, draft_holds = held_contexts(cluster)  # the target: 7 pages, capped at its model's 1024 tokens
    assert draft_holds % PAGE == 0 and PAGE <= draft_holds <= 3 * PAGE < target_holds  # 2 pages, give or take
    with channel_to(cluster) as channel:
        info = generate_pb2_grpc.GenerationStub(channel).GetModelInfo(generate_pb2.ModelInfoRequest())
        assert info.max_context == draft_holds
        fits = collect(stream(channel, make_request(prompt="Hello", max_tokens=8, ignore_eos=True), timeout=60))
        assert len(fits.token_ids) == 8
        with pytest.raises(grpc.RpcError) as error:
            collect(stream(channel, make_request(prompt="Hello", max_tokens=draft_holds), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"context {draft_holds}" in error.value.details()


def test_prompts_of_different_lengths_prefill_alone_all_or_nothing(tiny_pair) -> None:
    """Long feeds of different lengths run one sequence at a time (no padding computed): the same logits as a
    padded batch, and a batch that does not fit takes no slot at all."""
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float64", kv="static", max_seqs=2, max_context=128)
    prompts = [list(range(3, 40)), list(range(50, 70))]
    alone = runner.forward([SequenceState(list(p)) for p in prompts], logits_to_keep=1)
    padded = ModelRunner.load(str(tiny_pair[0]), dtype="float64", kv="dynamic")
    assert torch.allclose(alone, padded.forward([SequenceState(list(p)) for p in prompts], logits_to_keep=1),
                          atol=1e-10)
    assert runner.static.slots_free == 0
    runner.static.free(SequenceState([], slot=0))
    with pytest.raises(ResourceExhausted):
        runner.forward([SequenceState(list(p)) for p in [*prompts, list(range(80, 100))]], logits_to_keep=1)
    assert runner.static.slots_free == 1


def test_a_long_verify_beside_a_short_one_keeps_its_logits_aligned(tiny_pair) -> None:
    """Feeds of 20 and 3 tokens keeping 4 logits each (a verify of 19 drafts beside one of 2): one batched call."""
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float64", kv="static", max_seqs=3, max_context=128)
    states = [SequenceState(list(range(3, 10))), SequenceState(list(range(20, 30)))]
    runner.forward(states, logits_to_keep=1)
    states[0].tokens += list(range(40, 60))
    states[1].tokens += [61, 62, 63]
    logits = runner.forward(states, logits_to_keep=4)
    assert logits.shape[:2] == (2, 4)
    alone = runner.forward([SequenceState(list(states[1].tokens))], logits_to_keep=4)
    assert torch.allclose(logits[1, -3:], alone[0, -3:], atol=1e-10)  # its 3 fed tokens, right-aligned


def decode_one_at_a_time(runner: ModelRunner, state: SequenceState, feed: list[int]) -> list[torch.Tensor]:
    """The last logits of the state's prompt, then those after each fed token: one decode call each."""
    decoded = [runner.forward([state], logits_to_keep=1)[0, -1].clone()]
    for token in feed:
        state.tokens.append(token)
        decoded.append(runner.forward([state], logits_to_keep=1)[0, -1].clone())
    return decoded


# float32 with dense linears is left out: MKL's float32 GEMM rounds a row by its call's row count (tests/ties.py)
@pytest.mark.parametrize(("quant", "dtype"), [
    ("none", "bfloat16"), ("w8a8", "bfloat16"), ("w8a8", "float32"),
    pytest.param("w8a8-fbgemm", "bfloat16", marks=NEEDS_FBGEMM),
    pytest.param("w8a8-fbgemm", "float32", marks=NEEDS_FBGEMM)])
def test_a_querys_numbers_do_not_depend_on_the_rest_of_its_feed(tiny_pair, quant: str, dtype: str) -> None:
    """On the in-place (rows) path: a position's logits are the same bits whether it is decoded alone or
    verified among k + 1 positions (and, in bfloat16, prefilled with its prompt), for prompts ending on and off
    a vector boundary and verifies that cross a key block. This is what makes target-only and speculative
    decoding agree token for token, ties included (CPU SDPA rounds by the key and query counts it is given:
    slot_attention.KEY_BLOCK; in float32 on AVX2 a verify's bits differed from a decode's before, and a C = 32
    bench's sd wrote other tokens than ar)."""
    runner = ModelRunner.load(str(tiny_pair[0]), dtype=dtype, quant=quant, kv="static", max_seqs=4,
                              max_context=96)
    generator = torch.Generator().manual_seed(0)
    for length in (14, 15, 16, 28, 31, 33, 60):
        prompt = torch.randint(3, 200, (length,), generator=generator).tolist()
        feed = torch.randint(3, 200, (5,), generator=generator).tolist()
        one_shot = SequenceState(prompt + feed)
        whole = runner.forward([one_shot], logits_to_keep=6)[0].clone()
        runner.drop(one_shot)
        state = SequenceState(list(prompt))
        decoded = decode_one_at_a_time(runner, state, feed)
        state.truncate(length)
        state.tokens.extend(feed)
        verified = runner.forward([state], logits_to_keep=5)[0].clone()  # a verify of 5: after each fed token
        runner.drop(state)
        assert torch.equal(verified, torch.stack(decoded[1:])), length
        if dtype == "bfloat16":  # float32 SDPA rounds a prompt's query blocks its own way; no mode differs there
            assert torch.equal(torch.stack(decoded), whole), length


@pytest.mark.parametrize("quant", ["w8a8", pytest.param("w8a8-fbgemm", marks=NEEDS_FBGEMM)])
def test_a_batched_float32_verify_of_uneven_feeds_equals_each_rows_decodes(tiny_pair, quant: str) -> None:
    """Rows verifying 5 and 2 tokens in one forward (the shorter right-aligned in the padded feed), one of them
    across a key block: every position the bits its own decode gives (slot_attention's float32 rule)."""
    runner = ModelRunner.load(str(tiny_pair[0]), dtype="float32", quant=quant, kv="static", max_seqs=4,
                              max_context=96)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (length,), generator=generator).tolist() for length in (30, 17)]
    feeds = [torch.randint(3, 200, (count,), generator=generator).tolist() for count in (5, 2)]
    decoded = []
    for prompt, feed in zip(prompts, feeds, strict=True):
        state = SequenceState(list(prompt))
        decoded.append(torch.stack(decode_one_at_a_time(runner, state, feed)[1:]))  # the logits after each fed token
        runner.drop(state)
    states = [SequenceState(list(prompt)) for prompt in prompts]
    runner.forward(states, logits_to_keep=1)
    for state, feed in zip(states, feeds, strict=True):
        state.tokens.extend(feed)
    verified = runner.forward(states, logits_to_keep=5)
    assert torch.equal(verified[0], decoded[0])
    assert torch.equal(verified[1, -2:], decoded[1])
