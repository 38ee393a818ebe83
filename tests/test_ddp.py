"""Distributed training: two gloo processes on loopback train a compiled module under
DistributedDataParallel, and under FSDP2 (``fully_shard``) against DDP."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import dpc_fx
from dpc_fx import kernels


def _join(rank: int, world: int, out: str) -> None:
    """Join the gloo group through a file in the test's folder: no port to pick (a port
    found free and released can be taken by another process before rank 0 binds it)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world
    )


def _leave() -> None:
    """Leave the group once nothing holds it: DDP and FSDP keep the process group in
    reference cycles, and if the last one is only collected while the interpreter shuts
    down, a gloo thread frees a finished collective's tensors then and aborts the process."""
    gc.collect()
    dist.destroy_process_group()


def _worker(rank: int, world: int, out: str) -> None:
    _join(rank, world, out)
    torch.set_num_threads(1)
    torch.manual_seed(7)  # ranks seeded alike round with their own noise
    seed = kernels.new_seed()
    torch.manual_seed(7)
    seeds = torch.stack([seed, torch.randint(0, 2**31 - 1, (), dtype=torch.int64)])
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
        "seeds": seeds,
    }
    torch.save(state, f"{out}/rank{rank}.pt")
    del ddp, opt
    _leave()


def _spawn(worker: Callable[[int, int, str], None], tmp_path: Path) -> list[dict]:
    """Run ``worker`` on two gloo ranks; what each saved, by rank."""
    world = 2
    mp.spawn(worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def test_ranks_stay_identical_under_ddp(tmp_path: Path) -> None:
    states = _spawn(_worker, tmp_path)
    assert torch.equal(states[0]["params"], states[1]["params"])
    assert torch.equal(states[0]["range"], states[1]["range"])
    assert float(states[0]["range"][1]) > float(states[0]["range"][0])
    # Stochastic rounding: the same generator state gives each rank its own seed; rank 0
    # gets the generator's draw unchanged, as a single process would.
    (seed0, draw0), (seed1, draw1) = states[0]["seeds"], states[1]["seeds"]
    assert torch.equal(draw0, draw1) and torch.equal(seed0, draw0)
    assert not torch.equal(seed1, seed0)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _train(module: nn.Module, rank: int) -> None:
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # the same data and rounding noise for both wrappers
    for _ in range(5):
        loss = module(torch.randn(16, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter as a whole tensor: FSDP2 keeps the root's unsharded after a forward."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _fsdp_worker(rank: int, world: int, out: str) -> None:
    _join(rank, world, out)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(4, 8)
    ddp_gm, fsdp_gm = dpc_fx.compile(model, x), dpc_fx.compile(copy.deepcopy(model), x)
    _train(nn.parallel.DistributedDataParallel(ddp_gm), rank)
    fully_shard(fsdp_gm, mesh=init_device_mesh("cpu", (world,)))
    _train(fsdp_gm, rank)
    fsdp_gm.eval()
    before = fsdp_gm(x).detach()  # each rank's own running ranges
    synced = dpc_fx.sync_ranges(fsdp_gm)
    after = fsdp_gm(x).detach()
    state = {
        "ddp": torch.cat([p.detach().flatten() for p in ddp_gm.parameters()]),
        "fsdp": torch.cat([_full(p).detach().flatten() for p in fsdp_gm.parameters()]),
        "before": before,
        "after": after,
        "synced": synced,
    }
    torch.save(state, f"{out}/rank{rank}.pt")
    del ddp_gm, fsdp_gm
    _leave()


def test_fsdp2_trains_as_ddp_does_and_ranges_sync(tmp_path: Path) -> None:
    states = _spawn(_fsdp_worker, tmp_path)
    # Same data, seeds and rounding noise: sharded training lands where DDP does, up to
    # the order of the gradient reductions.
    for s in states:
        torch.testing.assert_close(s["fsdp"], s["ddp"], rtol=1e-4, atol=1e-5)
    # FSDP2 leaves buffers alone: eval differs per rank until the ranges are synchronised.
    assert states[0]["synced"] == 1  # the middle layer; the first and last are pinned
    assert not torch.equal(states[0]["before"], states[1]["before"])
    assert torch.equal(states[0]["after"], states[1]["after"])
