"""gRPC face of the target engine: protobuf in, engine call on the device thread, protobuf out."""

from __future__ import annotations

import grpc

from minedraft.protos import target_pb2, target_pb2_grpc
from minedraft.sampling import Sampling
from minedraft.servicing import EngineServicer
from services.target.engine import TargetEngine


class TargetServicer(EngineServicer, target_pb2_grpc.TargetServicer):
    engine: TargetEngine | None

    async def Prefill(self, request: target_pb2.TargetPrefillRequest,
                      context: grpc.aio.ServicerContext) -> target_pb2.TargetPrefillResponse:
        seqs = [(s.seq_id, list(s.tokens), Sampling.from_proto(s.sampling)) for s in request.seqs]
        firsts, stats = await self.call(context, len(seqs), "prefill", seqs, threads=request.threads)
        return target_pb2.TargetPrefillResponse(
            tokens=[target_pb2.FirstToken(seq_id=seq_id, token_id=token)
                    for (seq_id, _, _), token in zip(seqs, firsts, strict=True)],
            stats=stats)

    async def Verify(self, request: target_pb2.VerifyRequest,
                     context: grpc.aio.ServicerContext) -> target_pb2.VerifyResponse:
        seqs = [(s.seq_id, [(d.token_id, list(d.q.token_ids), list(d.q.probs)) for d in s.drafts])
                for s in request.seqs]
        verdicts, stats = await self.call(context, len(seqs), "verify", seqs, threads=request.threads)
        return target_pb2.VerifyResponse(
            verdicts=[target_pb2.Verdict(seq_id=seq_id, accepted=accepted, next_token=token)
                      for (seq_id, _), (accepted, token) in zip(seqs, verdicts, strict=True)],
            stats=stats)
