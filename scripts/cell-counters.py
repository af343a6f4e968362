"""Prints each cell's lane and sequence rounds from a router's GetStats(cell=i): usage ADDRESS CELLS."""

import asyncio
import sys

import grpc

from minedraft.protos import monitor_pb2, monitor_pb2_grpc


async def main(address: str, cells: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = monitor_pb2_grpc.RouterMonitorStub(channel)
        for cell in range(cells):
            stats = await stub.GetStats(monitor_pb2.StatsRequest(cell=cell))
            lane_rounds = sum(lane.rounds for lane in stats.lanes)
            sequence_rounds = sum(lane.sequences_in_rounds for lane in stats.lanes)
            print(f"{address} cell {cell}: {lane_rounds} lane rounds, {sequence_rounds} sequence rounds")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
