"""Train a compiled model with DistributedDataParallel (gloo on CPU, nccl on GPUs).

    torchrun --nproc_per_node=2 examples/ddp_train.py

Each rank compiles the same model, wraps it in DDP and trains on its own shard of data.
DDP averages the (quantised) gradients, so parameters stay identical across ranks; it also
broadcasts buffers from rank 0 before each forward, which includes the activation
quantisers' running ranges, so every rank quantises alike in eval. Stochastic rounding draws
its seed from torch's generator, offset by the rank: ranks round with independent noise,
and a run is reproducible under torch.manual_seed.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import dpc_fx


def main(steps: int = 20) -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
    )

    torch.manual_seed(0)  # the same initial weights everywhere
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8)
    )
    gm = dpc_fx.compile(model, torch.randn(16, 32)).to(device)
    ddp = nn.parallel.DistributedDataParallel(gm)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)

    torch.manual_seed(1000 + rank)  # each rank: its own data
    for step in range(steps):
        x = torch.randn(16, 32, device=device)
        y = (x[:, :8]).argmax(1)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}  (world size {world})")

    flat = torch.cat([p.detach().flatten() for p in gm.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        print(f"parameters identical on all {world} ranks: {same}")
    # DDP holds the process group in a reference cycle. Collect it before leaving the group:
    # if the group lived on into interpreter shutdown, a gloo thread would free a finished
    # collective's tensors then and abort the process (after training, but with an error).
    del ddp, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(os.environ.get("STEPS", "20")))
