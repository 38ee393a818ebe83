"""The digits experiment in one file: fp32, static 8-bit and DPC on scikit-learn's digits.

    python examples/digits_experiment.py                # 600 steps, one seed: about 15 s
    python examples/digits_experiment.py --steps 1500 --seed 1

The 1,797 8x8 handwritten digits ship with scikit-learn (1,400 train / 397 test here). A
small 2-D CNN (three convolutions and a linear classifier) starts from the same weights and
sees the same batches under every method. Compare with examples/mnist1d_experiment.py;
tools/reproduce.py runs the full comparison.
"""

import argparse
import sys
from pathlib import Path

import torch

# experiments/ is the repository's package, not installed with dpc_fx; running this file
# puts only examples/ on the path, so add the repository root that holds it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpc_fx import DPCConfig
from experiments.data import digits
from experiments.models import DigitsCNN
from experiments.train import Result, compare

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(1)  # a model this small runs best on one thread

methods = {
    "fp32": None,
    "static 8-bit": DPCConfig(policy="uniform", b_min=8, b_max=8, grad_bits=8),
    "DPC": DPCConfig(),
}
print(Result.HEADER)
for result in compare(
    methods, DigitsCNN, digits(), steps=args.steps, seed=args.seed, batch_size=64
):
    print(result.line())
