"""Keeping ranks alike where PyTorch's distributed wrappers do not.

``DistributedDataParallel`` broadcasts rank 0's buffers before each forward, which carries
the activation quantisers' running ranges. FSDP2 (``fully_shard``) shards parameters but
leaves buffers alone, so each rank's running ranges follow its own data and eval would
quantise differently per rank: :func:`sync_ranges` averages them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dpc_fx.quant import ActQuantizer

__all__ = ["sync_ranges"]


@torch.no_grad()
def sync_ranges(module: nn.Module, *, group: dist.ProcessGroup | None = None) -> int:
    """Average the activation quantisers' running ranges over the ranks of ``group``.

    Call it on every rank (it is a collective) before evaluating or saving a module trained
    under FSDP2 or any wrapper that does not broadcast buffers. Ranks that have not seen a
    training batch yet do not count towards a quantiser's average. Outside a distributed
    run it does nothing.

    Returns:
        the number of activation quantisers in ``module``.

    >>> import dpc_fx
    >>> gm = dpc_fx.compile(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8),
    ...                                   nn.ReLU(), nn.Linear(8, 2)))
    >>> dpc_fx.sync_ranges(gm)  # single process: nothing to do
    1
    """
    quantizers = [m for m in module.modules() if isinstance(m, ActQuantizer)]
    if not quantizers or not (dist.is_available() and dist.is_initialized()):
        return len(quantizers)
    ref = quantizers[0].running_min
    seen = torch.tensor([float(q.observed) for q in quantizers], dtype=torch.float64)
    ranges = torch.stack([torch.stack([q.running_min, q.running_max]).double() for q in quantizers])
    payload = torch.cat([ranges * seen[:, None], seen[:, None]], dim=1).to(ref.device)
    dist.all_reduce(payload, group=group)
    count = payload[:, 2]
    for q, total, n in zip(quantizers, payload[:, :2], count.tolist(), strict=True):
        if n:
            mean = (total / n).to(q.running_min.dtype)
            q.running_min.copy_(mean[0])
            q.running_max.copy_(mean[1])
            q.seen.fill_(True)
    return len(quantizers)
