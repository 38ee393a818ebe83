"""Shared fixtures and the hypothesis profiles.

Profiles: ``default`` (the suite's budget: a few minutes on two CPU cores) and ``thorough``
(select with ``pytest --hypothesis-profile=thorough``) for a longer hunt.

The quantisers run on the native loops here, as they do for users, and the torch kernels
for what those loops do not take run eagerly, not compiled (``DPC_FX_KERNELS=native+eager``
unless the caller set it): the suite feeds them hundreds of shapes, ranks and dtypes, and
compiling each variant would cost far more than the tensors themselves.
``test_quant.py`` checks the compiled kernels against the eager ones on their own (fixture
``fused_kernels``), and ``test_native.py`` the native loops against the eager kernels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=1000)
settings.load_profile("default")

# The tensors are tiny: more threads only add contention on a shared two-core machine.
torch.set_num_threads(1)
os.environ.setdefault("DPC_FX_KERNELS", "native+eager")


@pytest.fixture
def fused_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run the quantisers' kernels through ``torch.compile`` for one test, from a clean
    dynamo cache (recompile counts are global) and leaving one behind."""
    monkeypatch.setenv("DPC_FX_KERNELS", "fused")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def resnet18_compiled():
    """``(model, gm, x)``: torchvision's resnet18 (10 classes) compiled on a 2x3x32x32 batch,
    unfused (``fuse=False``): the tests that use it read the rewrite's quantiser nodes;
    ``test_fuse.py`` checks the fused layers against them.

    Session-scoped to save time: tests must not change it (copy it first).
    """
    torchvision = pytest.importorskip("torchvision")
    import dpc_fx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = dpc_fx.compile(model, x, config=dpc_fx.DPCConfig(fuse=False))
    # resnet18 traces whole and has layers to quantise: dpc_fx has nothing to warn about.
    assert not [w for w in caught if "dpc_fx" in str(w.message)], [str(w.message) for w in caught]
    return model, gm, x
