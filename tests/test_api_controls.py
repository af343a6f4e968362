"""The gRPC API's controls through a real cluster: logprobs, n, token-level controls, penalties, model info.

Each must come out the same with speculation on as with the target alone."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from minedraft.app.client import collect, collect_all, make_request, stream
from minedraft.protos import generate_pb2, generate_pb2_grpc
from tests.conftest import channel_to

PROMPT = "def fibonacci(n):"
PENALTIES = {"repetition_penalty": 1.4, "frequency_penalty": 0.6, "presence_penalty": 0.3, "min_p": 0.1}


def generate(cluster, **params):
    with channel_to(cluster) as channel:
        return collect_all(stream(channel, make_request(**{"prompt": PROMPT, "max_tokens": 24, **params}),
                                  timeout=60))


def test_greedy_logprobs_and_penalties_are_the_same_with_speculation_off(tiny_clusters) -> None:
    psd = tiny_clusters["psd"]
    for params in ({"logprobs": 3}, {"logprobs": 2, "min_tokens": 5, **PENALTIES}):
        (spec,) = generate(psd, **params)
        (alone,) = generate(psd, speculation="off", **params)
        assert spec.token_ids == alone.token_ids and int(spec.stats["drafted_tokens"]) > 0
        assert [lp["token_id"] for lp in spec.logprobs] == spec.token_ids
        for a, b in zip(spec.logprobs, alone.logprobs, strict=True):
            assert a["top_ids"] == b["top_ids"] and len(a["top_ids"]) == params["logprobs"]
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
            assert a["top_logprobs"] == pytest.approx(b["top_logprobs"], abs=1e-5)
    (plain,) = generate(psd)
    (penalised,) = generate(psd, **PENALTIES)
    assert plain.token_ids != penalised.token_ids, "the penalties must change this output"


def test_n_samples_each_equal_a_single_request_with_its_seed(tiny_clusters) -> None:
    psd = tiny_clusters["psd"]
    samples = generate(psd, n=3, temperature=1.0, seed=11, logprobs=0)
    assert len(samples) == 3 and len({tuple(s.token_ids) for s in samples}) > 1
    for index, sample in enumerate(samples):
        (alone,) = generate(psd, temperature=1.0, seed=11 + index, logprobs=0)
        assert sample.token_ids == alone.token_ids and sample.stats["seed"] == str(11 + index)
        assert [lp["logprob"] for lp in sample.logprobs] == pytest.approx([lp["logprob"] for lp in alone.logprobs],
                                                                          abs=1e-5)


def test_token_controls(tiny_clusters) -> None:
    psd = tiny_clusters["psd"]
    (plain,) = generate(psd)
    stop_at = plain.token_ids[3]
    (stopped,) = generate(psd, stop_token_ids=[stop_at])
    cut = plain.token_ids.index(stop_at)
    assert stopped.token_ids == plain.token_ids[:cut] and stopped.finish_reason == "stop"
    (held,) = generate(psd, stop_token_ids=[plain.token_ids[0]], min_tokens=3)
    assert held.token_ids[0] != plain.token_ids[0] and len(held.token_ids) >= 3
    first_text = next(t for t in (plain.text[:n] for n in range(1, 4)) if t.strip())
    (cut_short,) = generate(psd, stop=[first_text])
    (held_stop,) = generate(psd, stop=[first_text], min_tokens=6)  # no stop string ends in the first 6 tokens
    assert len(plain.token_ids) > 6, "premise: the plain answer runs past min_tokens"
    assert len(cut_short.token_ids) <= 6 and cut_short.finish_reason == "stop"
    assert held_stop.token_ids[:6] == plain.token_ids[:6] and held_stop.text.startswith(first_text)
    (long,) = generate(psd, ignore_eos=True, max_tokens=30)
    assert len(long.token_ids) == 30 and long.finish_reason == "length"
    with channel_to(psd) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        ids = list(stub.Tokenize(generate_pb2.TokenizeRequest(prompt=PROMPT)).token_ids)
        (by_ids,) = collect_all(stream(channel, make_request(prompt_ids=ids, max_tokens=24), timeout=60))
        assert by_ids.token_ids == plain.token_ids
        assert stub.Detokenize(generate_pb2.DetokenizeRequest(token_ids=ids)).text == PROMPT
        info = stub.GetModelInfo(generate_pb2.ModelInfoRequest())
        assert info.mode == "psd" and info.k > 0 and info.max_context > 0 and info.vocab_size > max(ids)
        assert list(info.eos_token_ids) and info.target_model and info.max_n >= 3


@pytest.mark.parametrize("params, message", [
    ({"n": 17}, "n must be"), ({"logprobs": 21}, "logprobs"), ({"repetition_penalty": 1e-30}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 30, "max_tokens": 10}, "min_tokens"), ({"prompt_ids": [10**7]}, "prompt_ids"),
    ({"prompt_ids": []}, "no token ids"), ({"stop_token_ids": list(range(65))}, "stop_token_ids")])
def test_bad_controls_are_invalid_argument(tiny_clusters, params: dict, message: str) -> None:
    with channel_to(tiny_clusters["psd"]) as channel, pytest.raises(grpc.RpcError) as failure:
        collect(stream(channel, make_request(**{"prompt": PROMPT, **params}), timeout=30))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in failure.value.details()


def test_reflection_lists_the_new_methods(tiny_clusters) -> None:
    with channel_to(tiny_clusters["psd"]) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("minedraft.protos.Generation")
        assert {"Generate", "GetModelInfo", "Tokenize", "Detokenize"} <= {m.name for m in service.methods}


def test_generate_command_prints_every_sample_with_logprobs(tiny_clusters) -> None:
    """`minedraft generate --n 2 --logprobs 1 --json`: the samples and logprobs of the client library's request."""
    cluster = tiny_clusters["psd"]
    expected = generate(cluster, n=2, temperature=0.9, seed=3, logprobs=1, max_tokens=10, repetition_penalty=1.2)
    out = subprocess.run([sys.executable, "-m", "minedraft.cli", "generate", "--addr", cluster.address, "--json",
                          "--n", "2", "--temperature", "0.9", "--seed", "3", "--logprobs", "1", "--max-tokens", "10",
                          "--repetition-penalty", "1.2", PROMPT], check=True, capture_output=True, text=True,
                         timeout=60)
    samples = json.loads(out.stdout)["samples"]
    assert [s["token_ids"] for s in samples] == [e.token_ids for e in expected]
    for sample, reference in zip(samples, expected, strict=True):
        assert [lp["logprob"] for lp in sample["logprobs"]] == pytest.approx(
            [lp["logprob"] for lp in reference.logprobs], abs=1e-5)
        assert all(len(lp["top_ids"]) == 1 for lp in sample["logprobs"])
    # As text, with alternatives outside top-k (log-probability -inf).
    text = subprocess.run([sys.executable, "-m", "minedraft.cli", "generate", "--addr", cluster.address,
                           "--temperature", "0.9", "--top-k", "2", "--logprobs", "4", "--max-tokens", "4", PROMPT],
                          check=True, capture_output=True, text=True, timeout=60)
    assert "-inf" in text.stderr
