"""DistributedDataParallel: two gloo processes on loopback train a compiled module."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dpc_fx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    gm = dpc_fx.compile(model, torch.randn(4, 8))
    ddp = nn.parallel.DistributedDataParallel(gm)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data and rounding noise per rank
    for _ in range(5):
        x = torch.randn(16, 8)
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()
    ddp(torch.randn(4, 8))  # an eval forward: DDP broadcasts rank 0's buffers first
    act = gm.dpc.get_submodule("_2").act_q
    state = {
        "params": torch.cat([p.detach().flatten() for p in gm.parameters()]),
        "range": torch.stack([act.running_min, act.running_max]),
    }
    torch.save(state, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_stay_identical_under_ddp(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert torch.equal(states[0]["params"], states[1]["params"])
    assert torch.equal(states[0]["range"], states[1]["range"])
    assert float(states[0]["range"][1]) > float(states[0]["range"][0])
