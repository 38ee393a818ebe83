"""Train a small Llama-style language model from Hugging Face transformers with DPC.

    python examples/hf_finetune.py              # 60 steps each, fp32 then DPC: about a minute
    python examples/hf_finetune.py --steps 300

The model is built from a config with random weights (nothing is downloaded) and trained
on characters of the text that ships with Python (experiments.data.stdlib_text). It is
compiled from the keyword inputs it is called with (input_ids, attention_mask, labels),
so the compiled module is called the same way and returns the same ModelOutput, loss
included. The fp32 model and the DPC one start from the same weights and see the same
batches; the script prints both losses and step times.
"""

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

# experiments/ is the repository's package, not installed with dpc_fx; running this file
# puts only examples/ on the path, so add the repository root that holds it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dpc_fx
from experiments.data import char_corpus

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--block", type=int, default=64, help="characters per sequence")
args = parser.parse_args()

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    sys.exit("this example needs transformers: pip install 'transformers>=5'")

corpus = char_corpus()
config = LlamaConfig(
    vocab_size=len(corpus.vocab),
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=args.block,
    use_cache=False,  # training: no key/value cache in the outputs
)
torch.manual_seed(args.seed)
model = LlamaForCausalLM(config)
fp32 = copy.deepcopy(model)


def batch(split: torch.Tensor, generator: torch.Generator, size: int = 16) -> dict:
    start = torch.randint(0, len(split) - args.block, (size,), generator=generator)
    ids = torch.stack([split[s : s + args.block] for s in start.tolist()])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


example = batch(corpus.train, torch.Generator().manual_seed(0), size=2)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # transformers' own notes on tracing
    gm = dpc_fx.compile(model, example_kwargs=example)
print(dpc_fx.coverage(gm))
print(dpc_fx.cost(gm))


def train(module: torch.nn.Module) -> tuple[float, float, float]:
    """(final train loss, validation loss, seconds per step) after ``args.steps`` steps."""
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)
    module.train()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = module(**batch(corpus.train, generator)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    per_step = (time.perf_counter() - start) / args.steps
    module.eval()
    with torch.no_grad():
        val = module(**batch(corpus.val, torch.Generator().manual_seed(1), size=64)).loss
    return loss.item(), val.item(), per_step


for name, module in (("fp32", fp32), ("DPC", gm)):
    loss, val, per_step = train(module)
    print(
        f"{name:>4}: train loss {loss:.3f}, validation loss {val:.3f}, {per_step * 1e3:.0f} ms/step"
    )
