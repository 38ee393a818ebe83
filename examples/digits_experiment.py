"""The digits experiment in one file: fp32, static 8-bit and DPC on scikit-learn's digits.

    python examples/digits_experiment.py                # 600 steps, one seed: about 15 s
    python examples/digits_experiment.py --steps 1500 --seed 1

The 1,797 8x8 handwritten digits ship with scikit-learn (1,400 train / 397 test here). A
small 2-D CNN (three convolutions and a linear classifier) starts from the same weights and
sees the same batches under every method. Compare with examples/mnist1d_experiment.py;
tools/reproduce.py runs the full comparison.
"""

import argparse
import time

import torch
from torch import nn

import dpc_fx
from dpc_fx import DPCConfig
from dpc_fx.demo import DigitsCNN, digits, evaluate, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=600)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(1)  # a model this small runs best on one thread

train_set, test_set = digits()
methods = {
    "fp32": None,
    "static 8-bit": DPCConfig(policy="uniform", b_min=8, b_max=8, grad_bits=8),
    "DPC": DPCConfig(),
}
print(f"{'method':<14}{'test acc':>9}{'vs fp32':>10}{'vs 8-bit':>10}{'time':>8}")
for name, config in methods.items():
    torch.manual_seed(args.seed)  # same initial weights for every method
    model: nn.Module = DigitsCNN()
    saving = ("-", "-")
    if config is not None:
        model = dpc_fx.compile(model, train_set.x[:100], config=config)
        c = dpc_fx.cost(model)
        saving = (f"{c.saving_vs_fp32:.1%}", f"{c.saving_vs_8bit:.1%}")
    start = time.perf_counter()
    train(model, train_set, steps=args.steps, batch_size=64, seed=args.seed)  # Adam, cosine
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, test_set)
    print(f"{name:<14}{accuracy:>9.1%}{saving[0]:>10}{saving[1]:>10}{seconds:>7.0f}s")
