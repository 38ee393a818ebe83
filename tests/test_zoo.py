"""A representative slice of the torchvision zoo: compile, count, step (tools/zoo.py does all).

One model per family at a small input: compiled with the default config, the number of
conv/linear layers quantised is pinned, and one training step (forward in train mode, a
loss, backward) must give every parameter a gradient. Detection and optical-flow models go
through the fallback: their own forward cannot be traced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import convnext
from toys import tiny_swin, tiny_vit

import dpc_fx
from dpc_fx import DPCConfig


def tiny_convnext() -> nn.Module:
    blocks = [convnext.CNBlockConfig(16, 32, 2), convnext.CNBlockConfig(32, None, 2)]
    return convnext.ConvNeXt(blocks, num_classes=10)


def image(*shape: int) -> Callable[[], tuple[Any, ...]]:
    return lambda: (torch.randn(*shape),)


M = torchvision.models
# name: (build, inputs, (quantised, conv/linear layers))
CLASSIFIERS: dict[
    str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]], tuple[int, int]]
] = {
    "resnet18": (lambda: M.resnet18(num_classes=10), image(2, 3, 32, 32), (19, 21)),
    "mobilenet_v3_small": (
        lambda: M.mobilenet_v3_small(num_classes=10),
        image(2, 3, 32, 32),
        (52, 54),
    ),
    "efficientnet_b0": (lambda: M.efficientnet_b0(num_classes=10), image(2, 3, 32, 32), (80, 82)),
    "regnet_x_400mf": (lambda: M.regnet_x_400mf(num_classes=10), image(2, 3, 32, 32), (70, 72)),
    "densenet121": (lambda: M.densenet121(num_classes=10), image(2, 3, 32, 32), (119, 121)),
    "vit (2 layers)": (tiny_vit, image(2, 3, 32, 32), (8, 10)),
    "swin (2 stages)": (tiny_swin, image(2, 3, 32, 32), (17, 19)),
    "convnext (2 stages)": (tiny_convnext, image(2, 3, 32, 32), (13, 15)),
    "lraspp_mobilenet_v3_large": (
        lambda: M.segmentation.lraspp_mobilenet_v3_large(weights_backbone=None, num_classes=3),
        image(2, 3, 64, 64),
        (64, 66),
    ),
    "r3d_18": (lambda: M.video.r3d_18(num_classes=5), image(2, 3, 4, 32, 32), (19, 21)),
}


def compiled(build: Callable[[], nn.Module], inputs: tuple[Any, ...], **config: Any) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpc_fx.compile(build(), inputs, config=DPCConfig(**config))


def output_loss(out: Any) -> Tensor:
    if isinstance(out, dict):
        return sum(v.float().pow(2).mean() for v in out.values())  # type: ignore[return-value]
    return out.float().pow(2).mean()


def step(gm: nn.Module, inputs: tuple[Any, ...]) -> None:
    gm.train()
    output_loss(gm(*inputs)).backward()
    missing = [name for name, p in gm.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifiers_trace_whole_quantise_their_layers_and_step(name: str) -> None:
    build, inputs, (quantised, total) = CLASSIFIERS[name]
    x = inputs()
    gm = compiled(build, x)
    cov = dpc_fx.coverage(gm)
    assert cov.traced and not cov.leaves
    assert (cov.quantised, cov.layers) == (quantised, total)
    assert cov.macs_share is not None and cov.macs_share > 0.3
    step(gm, x)


# ------------------------------------------------------------------------- fallback


def boxes(images: list[Tensor]) -> list[dict[str, Tensor]]:
    """One box of class 1 per image: enough for every loss term."""
    box = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])}
    return [box for _ in images]


RCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
DETECTORS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int], int, set[str]]] = {
    # name: (build, (quantised, conv/linear layers), leaves, loss terms)
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        lambda: M.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights_backbone=None, num_classes=3, min_size=64, max_size=64
        ),
        (71, 73),
        5,  # rpn.head and roi_heads.box_predictor are captured by torch.export
        RCNN_LOSSES,
    ),
    "retinanet_resnet50_fpn": (
        lambda: M.detection.retinanet_resnet50_fpn(
            weights_backbone=None, num_classes=3, min_size=64, max_size=64
        ),
        (
            70,
            71,
        ),  # the pinned last layer is the last call of cls_logits; earlier ones are quantised
        3,  # its head's parts are captured by torch.export
        {"classification", "bbox_regression"},
    ),
    "ssdlite320_mobilenet_v3_large": (
        lambda: M.detection.ssdlite320_mobilenet_v3_large(weights_backbone=None, num_classes=3),
        (96, 98),
        3,  # its head's parts are captured by torch.export
        {"classification", "bbox_regression"},
    ),
}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detectors_compile_through_the_fallback_and_train(name: str) -> None:
    build, (quantised, total), leaves, terms = DETECTORS[name]
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = dpc_fx.compile(model, (images,))
    said = [str(w.message) for w in caught]
    assert f"{type(model).__name__}: torch.fx cannot trace its forward" in said[0]
    assert len(said) == leaves  # one warning per leaf
    assert type(gm) is type(model) and list(dpc_fx.model_state_dict(gm)) == list(model.state_dict())
    cov = dpc_fx.coverage(gm)
    assert (cov.quantised, cov.layers, len(cov.leaves)) == (quantised, total, leaves)
    assert cov.macs_share is not None and cov.macs_share > 0.9
    gm.train()
    losses = gm(images, boxes(images))
    assert set(losses) == terms
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    gm.eval()
    assert set(gm(images)[0]) == {"boxes", "labels", "scores"}


def test_raft_is_captured_whole_by_torch_export_and_trains() -> None:
    torch.manual_seed(0)
    model = M.optical_flow.raft_small()
    frames = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing kept whole
        gm = dpc_fx.compile(model, frames, example_kwargs={"num_flow_updates": 2})
    cov = dpc_fx.coverage(gm)
    assert cov.leaves == ()
    # 53 convolutions (one module called twice, its first call quantised; the last call is the
    # pinned last layer) and the correlation volume's matmul, a product of two activations.
    assert (cov.quantised, cov.layers) == (53, 54)
    gm.train()
    flows = gm(*frames, num_flow_updates=2)
    assert len(flows) == 2 and flows[-1].shape == (1, 2, 128, 128)
    flows[-1].abs().mean().backward()
    assert all(p.grad is not None for p in gm.parameters())
