"""A release still frees the sequence when its caller stops waiting: under load a release queues behind long
forwards and can outlast the router's deadline, and a cancelled release would leak the state for good.
A real draft engine and servicer behind real gRPC on loopback."""

import asyncio
import threading

import grpc
import pytest

from minedraft.engine.device_worker import DeviceWorker
from minedraft.engine.model_runner import ModelRunner
from minedraft.protos import common_pb2, draft_pb2, draft_pb2_grpc
from services.draft.engine import DraftEngine
from services.draft.servicer import DraftServicer


async def release_past_deadline(draft_path: str) -> tuple[grpc.StatusCode, int, int]:
    servicer = DraftServicer(DeviceWorker("draft-test"))
    servicer.engine = DraftEngine(ModelRunner.load(draft_path, dtype="float32"), top_m=8)
    server = grpc.aio.server()
    draft_pb2_grpc.add_DraftServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gate = threading.Event()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = draft_pb2_grpc.DraftStub(channel)
            await stub.Prefill(draft_pb2.DraftPrefillRequest(seqs=[
                draft_pb2.DraftPrefillSeq(seq_id=f"s{i}", tokens=[1, 2, 3]) for i in range(3)]))
            busy = asyncio.ensure_future(servicer.worker.run(gate.wait, 30))  # a long forward holds the device
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await stub.Release(common_pb2.ReleaseRequest(seq_ids=["s0", "s1"]), timeout=0.3)
            held_while_busy = len(servicer.engine.table)
            gate.set()
            await busy
            for _ in range(100):  # the release was queued behind the forward; it runs right after it
                if len(servicer.engine.table) == 1:
                    break
                await asyncio.sleep(0.01)
            return expired.value.code(), held_while_busy, len(servicer.engine.table)
    finally:
        gate.set()
        await server.stop(None)
        servicer.worker.shutdown()


def test_release_runs_after_its_deadline_expires(tiny_pair) -> None:
    code, held_while_busy, held_after = asyncio.run(release_past_deadline(str(tiny_pair[1])))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert held_while_busy == 3
    assert held_after == 1  # s0 and s1 released, s2 kept
