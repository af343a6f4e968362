"""The OpenAI HTTP front, through the official `openai` client and raw HTTP, against a real cluster."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import openai
import pytest
from transformers import AutoTokenizer

from minedraft.app.client import Generation, collect, make_request, stream
from minedraft.app.launcher import Cluster, free_port
from minedraft.protos.generate_pb2 import TokenizeRequest
from minedraft.protos.generate_pb2_grpc import GenerationStub
from services.router.text_stream import TextStream
from tests.conftest import channel_to, cluster_args
from tests.test_end_to_end import PROMPTS, held_sequences
from tests.test_faults import wait_until

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def front(tiny_pair):
    with Cluster(cluster_args("psd", *tiny_pair, max_batch=4, http_port=free_port())) as cluster:
        cluster.wait_ready(timeout_s=120)
        yield cluster


def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{cluster.http_address}/v1", api_key="unused", max_retries=0)


def post(url: str, body: bytes) -> tuple[int, dict]:
    """Raw HTTP, as a client with a bug would send it."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as failure:
        return failure.code, json.load(failure)


def grpc_text(cluster: Cluster, **request) -> str:
    return grpc_generation(cluster, **request).text


def grpc_generation(cluster: Cluster, **request) -> Generation:
    with channel_to(cluster) as channel:
        return collect(stream(channel, make_request(**request)))


def test_n_samples_logprobs_and_penalties_match_the_grpc_path(front, tiny_pair) -> None:
    api = client(front)
    whole = api.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=0.9, seed=5, n=2,
                                   logprobs=2)
    streamed = api.completions.create(model="target", prompt=PROMPT, max_tokens=16, temperature=0.9, seed=5, n=2,
                                      logprobs=2, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    for index in range(2):
        expected = grpc_generation(front, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=5 + index, logprobs=2)
        choice = whole.choices[index]
        assert choice.index == index and choice.text == expected.text == texts[index]
        assert choice.logprobs.token_logprobs == pytest.approx([e["logprob"] for e in expected.logprobs], abs=1e-5)
        # A dict by token text, as OpenAI's completions format has it: two ids with one text (say, byte pieces) merge.
        assert all(0 < len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert whole.usage.completion_tokens == sum(len(grpc_generation(
        front, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=5 + i).token_ids) for i in range(2))
    messages = [{"role": "user", "content": "Hello"}]
    chat = api.chat.completions.create(model="target", messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3)
    alone = grpc_generation(front, messages=messages, max_tokens=12, logprobs=3, speculation="off")
    assert chat.choices[0].message.content == alone.text  # speculation on (HTTP) and off (gRPC)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in alone.logprobs], abs=1e-5)
    assert len(content) == len(alone.token_ids) and all(len(c.top_logprobs) == 3 for c in content)
    own = TextStream(AutoTokenizer.from_pretrained(str(tiny_pair[0])), [])  # a token's bytes, not its lone text's
    assert [bytes(c.bytes) for c in content] == [own.token_bytes(t) for t in alone.token_ids]
    assert [[bytes(top.bytes) for top in c.top_logprobs] for c in content] == [
        [own.token_bytes(int(t)) for t in e["top_ids"]] for e in alone.logprobs]
    code, reply = post(f"http://{front.http_address}/v1/chat/completions", json.dumps(
        {"model": "target", "messages": messages, "max_tokens": 4, "logprobs": None}).encode())
    assert code == 200 and reply["choices"][0]["logprobs"] is None  # null is OpenAI's "no logprobs"
    penalties = {"frequency_penalty": 0.8, "presence_penalty": 0.4, "max_tokens": 16, "temperature": 0}
    extra = {"repetition_penalty": 1.3, "min_p": 0.1, "top_k": 8}
    penalised = api.completions.create(model="target", prompt=PROMPT, extra_body=extra, **penalties)
    assert penalised.choices[0].text == grpc_text(front, prompt=PROMPT, speculation="off", **extra, **penalties)
    with channel_to(front) as channel:
        ids = list(GenerationStub(channel).Tokenize(TokenizeRequest(prompt=PROMPT)).token_ids)
    by_ids = api.completions.create(model="target", prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == grpc_text(front, prompt=PROMPT, max_tokens=16)


def test_completions_match_the_grpc_path_streamed_or_not(front) -> None:
    api = client(front)
    assert [m.id for m in api.models.list().data] == ["target"]
    expected = grpc_text(front, prompt=PROMPT, max_tokens=24)
    whole = api.completions.create(model="target", prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens == 24 or whole.choices[0].finish_reason == "stop"
    streamed = api.completions.create(model="target", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    sampled = grpc_text(front, prompt=PROMPT, max_tokens=24, temperature=0.8, seed=11)
    assert api.completions.create(model="target", prompt=PROMPT, max_tokens=24, temperature=0.8,
                                  seed=11).choices[0].text == sampled


def test_chat_streams_with_usage_and_stops(front) -> None:
    api = client(front)
    messages = [{"role": "user", "content": "Hello"}]
    expected = grpc_text(front, messages=messages, max_tokens=20)
    chunks = list(api.chat.completions.create(model="target", messages=messages, max_tokens=20, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0
    whole = api.chat.completions.create(model="target", messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == expected
    if len(expected) > 3:  # a stop string cuts the reply where it first appears
        stopped = api.chat.completions.create(model="target", messages=messages, max_tokens=20, temperature=0,
                                              stop=[expected[2:4]])
        assert stopped.choices[0].message.content == expected[:expected.index(expected[2:4])]
        assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("body", "status", "param"), [
    ("{not json", 400, None),
    ({"model": "target", "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ({"model": "target", "prompt": PROMPT, "n": 17}, 400, "n"),
    ({"model": "target", "prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
    ({"model": "target", "prompt": PROMPT, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": "target", "prompt": PROMPT, "tools": []}, 400, "tools"),
    ({"model": "target", "prompt": PROMPT, "best_of": 2}, 400, "best_of"),
    ({"model": "target", "prompt": PROMPT, "top_k": 2**40}, 400, "top_k"),  # more than the wire carries
    ({"model": "target", "prompt": PROMPT, "repetition_penalty": 1e-40}, 400, "repetition_penalty"),
    ({"model": "target", "prompt": PROMPT, "echo": True}, 400, "echo"),
    ({"model": "target", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "target", "prompt": [10**8]}, 400, None),  # a token id outside the vocabulary (the router's check)
    ({"model": "target", "prompt": PROMPT, "min_tokens": 30, "max_tokens": 5}, 400, None),
    ({"model": "target", "prompt": PROMPT, "temperature": 0.0001}, 400, None),  # the router's own check
    ({"model": "target", "prompt": "x" * (9 << 20)}, 413, None),
])
def test_bad_requests_get_openai_errors_and_the_server_serves_on(front, body, status, param) -> None:
    url = f"http://{front.http_address}/v1/completions"
    code, reply = post(url, body.encode() if isinstance(body, str) else json.dumps(body).encode())
    assert code == status, reply
    failure = reply["error"]
    assert failure["message"] and failure["type"] == "invalid_request_error"
    if param:
        assert failure["param"] == param
    with urllib.request.urlopen(f"http://{front.http_address}/health", timeout=10) as health:
        assert health.status == 200


def post_chunked(address: str, pieces: list[bytes]) -> tuple[int, dict]:
    """A body sent in chunks, with no Content-Length to check up front."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/v1/completions", body=iter(pieces), headers={"content-type": "application/json"})
        reply = connection.getresponse()
        return reply.status, json.load(reply)
    finally:
        connection.close()


def test_a_chunked_body_is_capped_as_it_arrives(front) -> None:
    start, end = b'{"model": "target", "max_tokens": 4, "temperature": 0, "prompt": "', b'"}'
    status, reply = post_chunked(front.http_address, [start, *[b"x" * (1 << 20)] * 9, end])
    assert status == 413 and "over" in reply["error"]["message"], reply
    status, reply = post_chunked(front.http_address, [start, PROMPT.encode(), end])  # under the cap: served whole
    assert status == 200 and reply["choices"][0]["text"], reply


def test_a_client_that_goes_away_frees_its_sequence(front) -> None:
    api = client(front)
    chunks = api.completions.create(model="target", prompt=PROMPT, max_tokens=800, temperature=1.0, seed=2,
                                    stream=True)
    next(iter(chunks))
    assert held_sequences(front) == (1, 1)
    chunks.close()  # the HTTP connection closes: the front cancels the gRPC stream
    wait_until(lambda: held_sequences(front) == (0, 0), 10, "the sequence to be released on both services")


def test_a_whole_reply_whose_client_leaves_stops_too(front) -> None:
    impatient = openai.OpenAI(base_url=f"http://{front.http_address}/v1", api_key="unused", max_retries=0,
                              timeout=0.5)
    with pytest.raises(openai.APITimeoutError):  # the prompt and seed of test_faults' deadline test: no early EOS
        impatient.completions.create(model="target", prompt=PROMPTS[2], max_tokens=800, temperature=1.0, seed=1)
    wait_until(lambda: held_sequences(front) == (0, 0), 10, "the abandoned reply's sequence to be released")
