"""The MNIST-1D experiment in one file: fp32, static 8-bit and DPC on the MNIST-1D CNN.

    python examples/mnist1d_experiment.py                # 2000 steps, one seed: about a minute
    python examples/mnist1d_experiment.py --steps 4000 --seed 1

MNIST-1D is generated locally by the ``mnist1d`` package (4000 train / 1000 test). Every
method starts from the same weights and sees the same batches (Adam, cosine decay). For the
full comparison (more methods, several seeds, a results page) use ``tools/reproduce.py``.
"""

import argparse
import sys
from pathlib import Path

import torch

# experiments/ is the repository's package, not installed with dpc_fx; running this file
# puts only examples/ on the path, so add the repository root that holds it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpc_fx import DPCConfig
from experiments.data import mnist1d
from experiments.models import MNIST1DCNN
from experiments.train import Result, compare

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
