"""The MNIST-1D experiment in one file: fp32, static 8-bit and DPC on the MNIST-1D CNN.

    python examples/mnist1d_experiment.py                # 2000 steps, one seed: about a minute
    python examples/mnist1d_experiment.py --steps 4000 --seed 1

MNIST-1D is generated locally by the ``mnist1d`` package (4000 train / 1000 test). Every
method starts from the same weights and sees the same batches (Adam, cosine decay). For the
full comparison (more methods, several seeds, a results page) use ``tools/reproduce.py``.
"""

import argparse

import torch

from dpc_fx import DPCConfig
from dpc_fx.demo import MNIST1DCNN, Result, compare, mnist1d

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(1)  # a model this small runs best on one thread

methods = {
    "fp32": None,
    "static 8-bit": DPCConfig(policy="uniform", b_min=8, b_max=8, grad_bits=8),
    "DPC": DPCConfig(),
}
print(Result.HEADER)
for result in compare(methods, MNIST1DCNN, mnist1d(), steps=args.steps, seed=args.seed):
    print(result.line())
