"""gRPC face of the target engine: protobuf in, engine call on the device thread, protobuf out."""

from __future__ import annotations

import grpc

from minedraft.engine.sampling import Sampling
from minedraft.protos import target_pb2, target_pb2_grpc
from minedraft.serving.servicing import EngineServicer, owner_of, seq_errors
from services.target.engine import TargetEngine


class TargetServicer(EngineServicer, target_pb2_grpc.TargetServicer):
    engine: TargetEngine | None

    async def Prefill(self, request: target_pb2.TargetPrefillRequest,
                      context: grpc.aio.ServicerContext) -> target_pb2.TargetPrefillResponse:
        engine = await self.ready_engine(context)
        seqs = [(s.seq_id, list(s.tokens), Sampling.from_proto(s.sampling)) for s in request.seqs]
        firsts, stats = await self.call(context, len(seqs), engine.prefill, seqs, owner_of(context),
                                        threads=request.threads)
        ids = [seq_id for seq_id, _, _ in seqs]
        errors = seq_errors(ids, firsts)
        return target_pb2.TargetPrefillResponse(
            tokens=[target_pb2.FirstToken(seq_id=seq_id, error=errors[seq_id]) if seq_id in errors else
                    target_pb2.FirstToken(seq_id=seq_id, token_id=token)
                    for seq_id, token in zip(ids, firsts, strict=True)],
            stats=stats)

    async def Verify(self, request: target_pb2.VerifyRequest,
                     context: grpc.aio.ServicerContext) -> target_pb2.VerifyResponse:
        engine = await self.ready_engine(context)
        seqs = [(s.seq_id, [(d.token_id, list(d.q.token_ids), list(d.q.probs)) for d in s.drafts])
                for s in request.seqs]
        verdicts, stats = await self.call(context, len(seqs), engine.verify, seqs, owner_of(context),
                                          threads=request.threads)
        ids = [seq_id for seq_id, _ in seqs]
        errors = seq_errors(ids, verdicts)
        return target_pb2.VerifyResponse(
            verdicts=[target_pb2.Verdict(seq_id=seq_id, error=errors[seq_id]) if seq_id in errors else
                      target_pb2.Verdict(seq_id=seq_id, accepted=verdict[0], next_token=verdict[1])
                      for seq_id, verdict in zip(ids, verdicts, strict=True)],
            stats=stats)
