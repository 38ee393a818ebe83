"""Compile a model for DPC low-precision training and train it: the whole API in 20 lines.

python examples/compile_and_train.py
"""

import torch
from torch import nn

import dpc_fx

torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4)
)
x = torch.randn(1024, 20)
y = (x[:, :4] + 0.2 * torch.randn(1024, 4)).argmax(1)  # a noisy 4-class problem

gm = dpc_fx.compile(model, x[:8])  # a torch.fx.GraphModule with quantisers inserted
print(dpc_fx.cost(gm))  # training bit-operations vs fp32 and vs static 8-bit

opt = torch.optim.Adam(gm.parameters(), lr=3e-3)  # any optimiser; master weights stay fp32
for _ in range(60):
    loss = nn.functional.cross_entropy(gm(x[:768]), y[:768])
    opt.zero_grad()
    loss.backward()  # each quantised layer's output gradient passes an 8-bit quantiser
    opt.step()
accuracy = (gm.eval()(x[768:]).argmax(1) == y[768:]).float().mean()  # running act. ranges
print(f"train loss {loss.item():.3f}, held-out accuracy {accuracy:.1%}")
print(list(dpc_fx.model_state_dict(gm)) == list(model.state_dict()))  # the model's own checkpoint
