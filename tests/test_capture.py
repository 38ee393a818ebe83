"""Keyword example inputs, ``None`` optionals, and whole capture through ``torch.export``
(passes/capture.py) of what ``torch.fx`` cannot trace."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import quantizers_off
from torch import Tensor, fx, nn

import dpc_fx
from dpc_fx import ConfigError, DPCConfig
from dpc_fx.cli import main
from dpc_fx.errors import TraceError
from dpc_fx.passes.capture import capture

# ------------------------------------------------------------------------ keyword inputs


class Keyworded(nn.Module):
    """Called with keywords: a tensor, an optional tensor, a dict of tensors, a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        extra: dict[str, Tensor] | None = None,
        scale: float = 1.0,
        return_dict: bool = True,
    ) -> Tensor | dict[str, Tensor]:
        h = F.relu(self.a(x))
        if mask is not None:
            h = h * mask
        if extra is not None:
            h = h + extra["bias"]
        out = self.c(F.relu(self.b(h))) * scale
        return {"out": out} if return_dict else out


def keyword_inputs() -> dict[str, object]:
    return {
        "x": torch.randn(4, 8),
        "mask": torch.rand(4, 16),
        "extra": {"bias": torch.randn(16)},
        "scale": 2.0,
        "return_dict": False,
    }


def test_keyword_inputs_are_traced_and_called_as_the_model_is() -> None:
    torch.manual_seed(0)
    model, kwargs = Keyworded(), keyword_inputs()
    gm = dpc_fx.compile(model, example_kwargs=kwargs)
    assert isinstance(gm, fx.GraphModule)
    assert dpc_fx.coverage(gm).leaves == ()
    assert [m.layer for m in dpc_fx.layers(gm)] == ["a", "b", "c"]
    assert all(m.macs for m in dpc_fx.layers(gm))  # measured on the keyword inputs
    off = quantizers_off(copy.deepcopy(gm))
    assert torch.equal(off(**kwargs), model(**kwargs))  # the plain values specialise it
    other = {**kwargs, "x": torch.randn(5, 8), "mask": torch.rand(5, 16)}
    assert torch.equal(off(**other), model(**other))


def test_keyword_and_positional_inputs_together() -> None:
    torch.manual_seed(0)
    model = Keyworded()
    x, kwargs = torch.randn(4, 8), {"mask": torch.rand(4, 16), "return_dict": False}
    gm = dpc_fx.compile(model, (x,), example_kwargs=kwargs)
    assert torch.equal(quantizers_off(copy.deepcopy(gm))(x, **kwargs), model(x, **kwargs))


def test_a_none_keyword_specialises_the_trace() -> None:
    torch.manual_seed(0)
    model = Keyworded()
    kwargs = {"x": torch.randn(4, 8), "mask": None, "return_dict": True}
    gm = dpc_fx.compile(model, example_kwargs=kwargs)
    assert isinstance(gm, fx.GraphModule)
    got = quantizers_off(copy.deepcopy(gm))(**kwargs)
    assert torch.equal(got["out"], model(**kwargs)["out"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ([("x", 1)], r"example_kwargs must be a dict of keyword arguments by name, got list"),
        ({1: torch.randn(4, 8)}, r"example_kwargs must be a dict .* got dict"),
        (
            {"x": torch.randn(4, 8), "masks": None},
            r"example_kwargs names \['masks'\], which Keyworded.forward does not take "
            r"\(its parameters: x, mask, extra, scale, return_dict\)",
        ),
    ],
)
def test_bad_keyword_inputs_are_named(kwargs: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dpc_fx.compile(Keyworded(), example_kwargs=kwargs)  # type: ignore[arg-type]


def test_an_argument_given_twice_is_named() -> None:
    with pytest.raises(ConfigError, match=r"do not fit Keyworded.forward.*multiple values"):
        dpc_fx.compile(Keyworded(), (torch.randn(4, 8),), example_kwargs={"x": torch.randn(4, 8)})


# ---------------------------------------------------------- capture through torch.export


class Unrolled(nn.Module):
    """FX cannot iterate over a proxy; torch.export unrolls the loop on the example input.
    A conv, batch norm, dropout (module and functional, the probability set by the mode)
    and a loss returned beside the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        h = self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3))
        h = torch.stack([F.relu(self.fc(row)) for row in h])  # iterates over the batch
        h = F.dropout(h, 0.3 if self.training else 0.0)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def unrolled_inputs() -> dict[str, Tensor]:
    return {"x": torch.randn(4, 3, 8, 8), "labels": torch.tensor([0, 1, 2, 0])}


def test_symbolic_trace_fails_on_the_unrolled_model() -> None:
    with pytest.raises(TraceError):
        dpc_fx.passes.trace(Unrolled())


def test_what_fx_cannot_trace_is_captured_whole() -> None:
    torch.manual_seed(0)
    model = Unrolled()
    gm = dpc_fx.compile(model, example_kwargs=unrolled_inputs())
    assert dpc_fx.coverage(gm).leaves == ()
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.conv2d.default in targets and torch.ops.aten.linear.default in targets
    # layers named after their modules (the loop ran once per example row: four calls of
    # one module, numbered after the first)
    assert [m.layer for m in dpc_fx.layers(gm)] == ["conv", "fc", "fc.1", "fc.2", "fc.3", "head"]
    keys = [k for k in gm.state_dict() if not k.startswith("dpc.")]  # quantisers' own state
    assert keys == list(model.state_dict())
    fresh = Unrolled()
    compiled = dpc_fx.compile(fresh, example_kwargs=unrolled_inputs())
    loaded = compiled.load_state_dict(model.state_dict(), strict=False)
    assert loaded.unexpected_keys == [] and all(k.startswith("dpc.") for k in loaded.missing_keys)
    assert torch.equal(fresh.conv.weight, model.conv.weight)  # shared with the model


class RowsMinus(nn.Module):
    """Captured (the loop over rows); its two inputs play different parts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.stack([self.fc(row) for row in a]) - b


def test_example_inputs_given_as_one_tensor_stay_two_inputs() -> None:
    """``input_ids=ids, labels=ids`` is the usual way to call a language model; export, seeing
    one tensor, would make the graph read one input for both."""
    torch.manual_seed(0)
    model = RowsMinus()
    shared = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="no layer to quantise"):  # (none asked for)
        gm = dpc_fx.compile(
            model,
            example_kwargs={"a": shared, "b": shared},
            config=DPCConfig(overrides={"*": None}),
        )
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(gm(a=a, b=b), model(a, b))


def _run(module: nn.Module, kwargs: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    return module(**kwargs)


@pytest.mark.parametrize("training", [True, False])
def test_a_captured_part_follows_train_and_eval(training: bool) -> None:
    torch.manual_seed(0)
    model, kwargs = Unrolled(), unrolled_inputs()
    gm = quantizers_off(dpc_fx.compile(copy.deepcopy(model), example_kwargs=kwargs))
    model.train(training)
    gm.train(training)
    for seed in (1, 2):  # batch norm's running statistics move in training only
        ours, theirs = _run(gm, kwargs, seed), _run(model, kwargs, seed)
        assert set(ours) == {"logits", "loss"}
        assert torch.equal(ours["logits"], theirs["logits"])
        assert torch.equal(ours["loss"], theirs["loss"])
    bn, mine = model.bn, gm.get_submodule("bn")
    assert torch.equal(mine.running_mean, bn.running_mean)
    assert int(mine.num_batches_tracked) == int(bn.num_batches_tracked) == (2 if training else 0)
    dropped = (_run(gm, kwargs, 3)["logits"] != _run(gm, kwargs, 4)["logits"]).any()
    assert bool(dropped) is training  # dropout draws masks in training only


def test_a_captured_part_trains_under_autograd() -> None:
    torch.manual_seed(0)
    model, kwargs = Unrolled(), unrolled_inputs()
    gm = dpc_fx.compile(copy.deepcopy(model), example_kwargs=kwargs)
    off = quantizers_off(copy.deepcopy(gm))
    _run(off, kwargs, 1)["loss"].backward()
    _run(model, kwargs, 1)["loss"].backward()
    for name, p in model.named_parameters():
        theirs = off.get_parameter(name).grad
        assert p.grad is not None and theirs is not None, name
        assert torch.allclose(p.grad, theirs), name
    quantised = [m for m in dpc_fx.layers(gm) if m.quantised]
    assert quantised
    before = gm.get_parameter("fc.weight").detach().clone()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(**kwargs)["loss"].backward()
    opt.step()
    assert not torch.equal(before, gm.get_parameter("fc.weight"))


def test_a_captured_part_takes_another_batch_size() -> None:
    torch.manual_seed(0)
    model = Dropless()
    x = torch.randn(4, 6)
    gm = quantizers_off(dpc_fx.compile(model, example_kwargs={"x": x}))
    x3 = torch.randn(3, 6)
    assert torch.equal(gm(x=x3), model(x=x3))


class Dropless(nn.Module):
    """FX cannot trace ``**kwargs`` forwards that read their keywords by name."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, **kwargs: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(kwargs["x"])))


class BranchesOnMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.aux = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.training:  # a layer that runs in training only
            h = h + self.aux(h)
        return torch.stack(list(h))


def test_capture_refuses_code_that_branches_on_the_mode_around_layers() -> None:
    with pytest.raises(TraceError, match=r"differently in training and eval mode .* branches on"):
        capture(BranchesOnMode(), (torch.randn(2, 4),))


def test_capture_says_when_torch_export_fails() -> None:
    class ReadsNumpy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.as_tensor(x.numpy() * 2)

    with pytest.raises(TraceError, match=r"torch.export could not capture ReadsNumpy"):
        capture(ReadsNumpy(), (torch.randn(2, 4),))


def test_a_module_neither_can_read_is_kept_whole_with_its_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), BranchesOnMode(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"submodule '1' \(BranchesOnMode\)"):
        gm = dpc_fx.compile(model, x)
    assert [leaf.path for leaf in dpc_fx.coverage(gm).leaves] == ["1"]
    model.eval()
    gm.eval()
    assert torch.equal(quantizers_off(copy.deepcopy(gm))(x), model(x))


# ----------------------------------------------------------------------- None optionals


class TypedEmbedding(nn.Module):
    """A submodule with an optional argument its model leaves ``None`` (BERT's embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.words, self.types = nn.Embedding(10, 8), nn.Embedding(2, 8)

    def forward(self, ids: Tensor, type_ids: Tensor | None = None) -> Tensor:
        if type_ids is None:
            type_ids = torch.zeros_like(ids)
        return self.words(ids) + self.types(type_ids)


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.a, self.head = TypedEmbedding(), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids: Tensor, type_ids: Tensor | None = None) -> Tensor:
        return self.head(torch.relu(self.a(self.embed(ids, type_ids))))


def test_an_optional_argument_left_none_is_none_in_the_graph() -> None:
    torch.manual_seed(0)
    model, ids = Tagger(), torch.randint(0, 10, (2, 5))
    gm = dpc_fx.compile(model, (ids,))
    assert isinstance(gm, fx.GraphModule)
    assert dpc_fx.coverage(gm).leaves == ()
    assert torch.equal(quantizers_off(copy.deepcopy(gm))(ids), model(ids))


# ---------------------------------------------------------- Hugging Face transformers, tiny

transformers = pytest.importorskip("transformers")


def _ids() -> dict[str, Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    return {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _hf(name: str) -> tuple[nn.Module, dict[str, Tensor | bool]]:
    """A one-layer model of the family ``name`` with random weights, and its keyword inputs
    (the model's own cache off, as for training)."""
    T, text, labels = transformers, _ids(), torch.tensor([0, 1])
    torch.manual_seed(0)
    small = {"vocab_size": 100}
    if name == "gpt2":
        config = T.GPT2Config(
            n_layer=1, n_embd=64, n_head=4, bos_token_id=0, eos_token_id=0, **small
        )
        return T.GPT2LMHeadModel(config), {**text, "labels": text["input_ids"], "use_cache": False}
    if name == "llama":
        config = T.LlamaConfig(
            num_hidden_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            **small,
        )
        return T.LlamaForCausalLM(config), {**text, "labels": text["input_ids"], "use_cache": False}
    if name == "bert":
        config = T.BertConfig(
            num_hidden_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            **small,
        )
        return T.BertForSequenceClassification(config), {**text, "labels": labels}
    if name == "distilbert":
        config = T.DistilBertConfig(n_layers=1, dim=64, n_heads=4, hidden_dim=128, **small)
        return T.DistilBertForSequenceClassification(config), {**text, "labels": labels}
    if name == "t5":
        config = T.T5Config(
            num_layers=1,
            num_decoder_layers=1,
            d_model=64,
            d_ff=128,
            num_heads=4,
            d_kv=16,
            decoder_start_token_id=0,
            pad_token_id=0,
            **small,
        )
        model = T.T5ForConditionalGeneration(config)
        return model, {**text, "labels": text["input_ids"], "use_cache": False}
    assert name == "vit"
    config = T.ViTConfig(
        num_hidden_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    pixels = torch.randn(2, 3, 16, 16)
    return T.ViTForImageClassification(config), {"pixel_values": pixels, "labels": labels}


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "distilbert", "t5", "vit"])
def test_tiny_transformers_compile_from_keyword_inputs_and_train(name: str) -> None:
    model, kwargs = _hf(name)
    model.train()
    gm = dpc_fx.compile(model, example_kwargs=kwargs)
    assert dpc_fx.coverage(gm).leaves == ()  # nothing kept whole
    found = dpc_fx.layers(gm)
    assert sum(m.quantised for m in found) >= len(found) - 2  # all but the pinned ones
    assert all(m.macs for m in found)
    out = gm(**kwargs)
    assert type(out) is type(model(**kwargs))
    assert out.loss is not None and out.loss.dim() == 0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    out.loss.backward()
    opt.step()
    moved = [k for k, v in model.named_parameters() if not torch.equal(before[k], v)]
    assert len(moved) > len(before) // 2  # the model's own parameters trained
    gm.eval()
    model.eval()
    with torch.no_grad():
        ours, theirs = quantizers_off(gm)(**kwargs), model(**kwargs)
    assert torch.equal(ours.logits, theirs.logits)


@pytest.mark.hf
def test_bert_compiles_from_input_ids_alone() -> None:
    """BERT leaves ``token_type_ids`` ``None``; its embeddings made this a ShapeError."""
    model, kwargs = _hf("bert")
    ids = kwargs["input_ids"]
    gm = dpc_fx.compile(model, (ids,))
    assert dpc_fx.coverage(gm).leaves == ()
    model.eval()
    gm.eval()
    assert torch.equal(quantizers_off(gm)(ids).logits, model(ids).logits)


class Repeated(nn.Module):
    """Attention over keys and values repeated across the query's heads as decoders repeat
    them: each head in place (``interleave``: what grouped-query attention means) or the
    whole block of heads again (``tile``: which it does not mean); a causal mask or none."""

    def __init__(self, how: str, masked: bool) -> None:
        super().__init__()
        self.how, self.masked = how, masked
        self.q, self.kv = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)  # 4 query heads
        k, v = self.kv(x).view(b, t, 2, 2, 4).permute(2, 0, 3, 1, 4)  # 2 key/value heads
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() if self.masked else None
        return F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v), mask)

    def _repeat(self, x: Tensor) -> Tensor:
        b, h, t, e = x.shape
        if self.how == "interleave":
            return x[:, :, None, :, :].expand(b, h, 2, t, e).reshape(b, 2 * h, t, e)
        return x[:, None].expand(b, 2, h, t, e).reshape(b, 2 * h, t, e)


def _same_step(model: nn.Module, gm: nn.Module, x: Tensor, exact: bool = False) -> None:
    """The eager module and its capture give the same output and gradients (input's and
    parameters') for a weighted sum of the output; ``exact``: bit for bit."""
    outs = []
    for m in (model, gm):
        m.zero_grad()
        x_ = x.clone().requires_grad_()
        y = m(x_)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append([y.detach(), x_.grad, *(p.grad for p in m.parameters())])
    for u, v in zip(*outs, strict=True):
        torch.testing.assert_close(u, v, **({"rtol": 0, "atol": 0} if exact else {}))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("how", ["interleave", "tile"])
def test_attention_over_repeated_heads_reads_them_once_where_that_is_grouped_query(
    how: str, masked: bool
) -> None:
    torch.manual_seed(0)
    model, x = Repeated(how, masked), torch.randn(3, 8, 16)
    gm = capture(model, (x,))
    (call,) = [n for n in gm.graph.nodes if "attention" in str(n.target)]
    grouped = how == "interleave"
    assert call.kwargs.get("enable_gqa", False) is grouped
    assert [a.meta["val"].shape[1] for a in call.args[1:3]] == [2, 2] if grouped else [4, 4]
    repeats = [n for n in gm.graph.nodes if n.target is torch.ops.aten.expand.default]
    assert len([n for n in repeats if n.meta["val"].dim() == 5]) == (0 if grouped else 2)
    _same_step(model, gm, x)


class Sliced(nn.Module):
    """Slices of the whole tensor (as a Hugging Face head reads ``hidden[:, slice(-0,
    None), :]``) beside slices of part of it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        whole = x[:, 0:, :][0:]
        half = x[:, :, 4:]
        return self.head(whole) + self.head(torch.cat([half, -half], -1))


def test_slices_of_a_whole_tensor_read_the_tensor_itself_and_the_rest_stay() -> None:
    torch.manual_seed(0)
    model, x = Sliced(), torch.randn(3, 5, 8)
    gm = capture(model, (x,))
    slices = [n for n in gm.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
    assert [n.args[1:3] for n in slices] == [(2, 4)]  # export records four; one is of part
    _same_step(model, gm, x, exact=True)


# ------------------------------------------------------------------ torch.compile, CLI


def test_torch_compile_sees_no_graph_break_in_a_captured_module() -> None:
    torch.manual_seed(0)
    gm = dpc_fx.compile(Unrolled(), example_kwargs=unrolled_inputs())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(**unrolled_inputs())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_inspect_takes_keyword_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", "test_capture:Keyworded", "--kwarg", "x=4,8", "--kwarg", "mask=4,16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "x=(4, 8) mask=(4, 16)" in out and "traced whole" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kwarg", "x4,8"], r"--kwarg 'x4,8' is not NAME=SHAPE\[:DTYPE\]"),
        (["--kwarg", "x=4,8:complex"], r"dtypes: float, float32, long"),
        (
            ["--kwarg", "x=four"],
            r"--kwarg 'x=four': 'four' is not a shape; write it as e.g. input_ids=2,16:long",
        ),
        ([], r"inspect needs example inputs: --input SHAPE, --kwarg NAME=SHAPE"),
        (["--kwarg", "y=4,8"], r"example_kwargs names \['y'\]"),
    ],
)
def test_inspect_says_what_is_wrong_with_a_keyword_input(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["inspect", "test_capture:Keyworded", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert __import__("re").search(message, err), err


class CalledTwoWays(nn.Module):
    """FX cannot trace it; its model calls it with and without a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = torch.stack(list(self.lin(x)))
        return h if mask is None else h * mask


class TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.inner, self.last = nn.Linear(4, 4), CalledTwoWays(), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(self.first(x))
        h = self.inner(h, torch.ones_like(h)) if x.sum() > -1e9 else h  # FX cannot trace this
        return self.last(h)


def test_a_part_called_in_different_forms_is_not_captured_on_one_of_them() -> None:
    torch.manual_seed(0)
    model, x = TwoCalls(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"submodule 'inner' \(CalledTwoWays\)"):
        gm = dpc_fx.compile(model, x)
    assert "inner" in [leaf.path for leaf in dpc_fx.coverage(gm).leaves]
    model.eval()
    gm.eval()
    assert torch.equal(quantizers_off(copy.deepcopy(gm))(x), model(x))


class Steps(nn.Module):
    """An int argument FX cannot trace through (a loop over a tensor each step)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor, steps: int = 1) -> Tensor:
        for _ in range(steps):
            x = torch.stack([torch.tanh(self.lin(row)) for row in x])
        return x


def test_a_captured_module_says_when_called_with_another_value_it_was_specialised_on() -> None:
    torch.manual_seed(0)
    model, x = Steps(), torch.randn(3, 4)
    gm = quantizers_off(dpc_fx.compile(model, example_kwargs={"x": x, "steps": 2}))
    assert torch.equal(gm(x=x, steps=2), model(x=x, steps=2))
    with pytest.raises(
        ValueError, match=r"'steps' was captured with the value 2 and is called with 3"
    ):
        gm(x=x, steps=3)


def test_coverage_says_the_model_was_captured() -> None:
    torch.manual_seed(0)
    gm = dpc_fx.compile(Unrolled(), example_kwargs=unrolled_inputs())
    cov = dpc_fx.coverage(gm)
    assert cov.traced and cov.captured == ("",)
    assert str(cov).startswith("coverage: captured whole (torch.export); ")


# ------------------------------------------------------------------ values of sizes alone


@pytest.mark.hf
def test_a_captured_decoder_builds_its_mask_and_positions_once_per_size() -> None:
    """The positions and causal mask a captured decoder builds from its sequence length
    run in a SizeCache: once per size, the same tensors after that, the model's values
    at every size."""
    from dpc_fx.sizes import SizeCache

    model, kwargs = _hf("llama")
    model.train()
    ids = kwargs["input_ids"]  # no attention_mask: the mask is the causal one
    kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
    gm = capture(model, (), kwargs)
    assert isinstance(gm.sizes, SizeCache)
    assert len(gm.sizes.compute.graph.nodes) > 20  # the mask's ops, moved out of the graph
    for length in (ids.shape[1], 5, ids.shape[1]):
        short = {**kwargs, "input_ids": ids[:, :length], "labels": ids[:, :length]}
        torch.testing.assert_close(gm(**short).loss, model(**short).loss)
    assert gm.sizes.extra_repr() == "2 size(s) cached"


def _arange_cache() -> Any:
    from dpc_fx.sizes import SizeCache

    graph = fx.Graph()
    n = graph.placeholder("n")
    graph.output((graph.call_function(torch.ops.aten.arange.default, (n,)),))
    return SizeCache(fx.GraphModule(nn.Module(), graph))


def test_a_size_cache_computes_again_what_was_written_in_place() -> None:
    cache = _arange_cache()
    (a,) = cache(4)
    assert cache(4)[0] is a
    a[:2].add_(10)  # through a view: the same version counter
    (b,) = cache(4)
    assert b is not a and b.tolist() == [0, 1, 2, 3]


def test_a_size_cache_keeps_nothing_made_under_a_dispatch_mode() -> None:
    """Fake tensors (made while the capacity pass measures the graph) never reach a later
    real call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cache = _arange_cache()
    with FakeTensorMode():
        cache(4)
    (real,) = cache(4)
    assert type(real) is Tensor and real.tolist() == [0, 1, 2, 3]
    with torch.inference_mode():
        cache(6)
    assert cache.extra_repr() == "1 size(s) cached"


@pytest.mark.hf
def test_a_decoder_called_with_its_cache_on_says_to_turn_it_off() -> None:
    """Positional ``input_ids`` leave a decoder's cache on: FX cannot trace it and
    torch.export cannot output the cache. The warning and coverage give both reasons and
    the way past the second."""
    model, kwargs = _hf("llama")
    model.train()
    with pytest.warns(UserWarning, match="torch.export: the model returns its key/value cache"):
        gm = dpc_fx.compile(model, (kwargs["input_ids"],))
    (root,) = [leaf for leaf in dpc_fx.coverage(gm).leaves if leaf.path == ""]
    assert "use_cache=False" in root.reason
