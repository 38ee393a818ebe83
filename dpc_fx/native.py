"""The quantisers' hot loops as native code: ``csrc/quant.cpp``, built on first use.

A compiled torch kernel costs about 30 us a call before it touches a byte (dynamo's guards,
the wrappers, the output allocation), and a fused layer makes several calls a step in
forward and as many in backward: on a small model, that fixed cost is most of what DPC
adds to a step. These loops do the same arithmetic, op for op, in a pass or two each and a
few microseconds a call through :mod:`ctypes`; the activation's codes are packed in the
pass that quantises it, and unpacked in the pass that dequantises them.

The library is built with the C++ compiler (``$CXX``, else ``g++``) into
``$DPC_FX_CACHE`` (default ``~/.cache/dpc_fx``), once per source, compiler and CPU, in
about a second. It uses the OpenMP runtime torch has loaded, so its threads are torch's
(``torch.set_num_threads`` applies). Where it cannot be built or loaded (no compiler, not
Linux, or ``DPC_FX_KERNELS`` set to ``fused`` or ``eager``: see :mod:`dpc_fx.kernels`),
:func:`library` returns ``None`` and the callers run the torch kernels of
:mod:`dpc_fx.kernels`, with the same results.

The arithmetic is IEEE float32 without fused multiply-adds (``-ffp-contract=off``), so
every value equals the torch kernels' bit for bit (``tests/test_native.py``).

:func:`layers` builds a second library, ``csrc/layer.cpp``, against the installed torch's
headers: a fused layer's whole step as one torch operator with a C++ autograd node (see
:mod:`dpc_fx.fused`), for the layers where Python's own cost per call would dominate.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from dpc_fx.kernels import packed_bytes

__all__ = [
    "dequantize",
    "fake_quant_rows",
    "held_bytes",
    "int8_codes",
    "int8_stochastic",
    "int8_sums",
    "int8_transpose",
    "layers",
    "library",
    "pool",
    "quantize",
    "quantize_measured",
    "range_of",
    "release",
    "stochastic",
    "unavailable",
    "usable",
]

_SOURCE = Path(__file__).with_name("csrc") / "quant.cpp"
_LAYER_SOURCE = _SOURCE.with_name("layer.cpp")
_FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-fopenmp",
    "-fPIC",
    "-shared",
    # IEEE arithmetic as torch's kernels do it: no contraction into fused multiply-adds, no
    # fast-math. (errno and FP traps are never read; dropping them lets loops vectorise.)
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
)

_f, _i64, _i32 = ctypes.c_float, ctypes.c_int64, ctypes.c_int
_p = ctypes.c_void_p
_SIGNATURES = {
    "dpc_range": (_i32, [_p, _i64, _p, _i32]),
    "dpc_quantize": (None, [_p, _i64, _f, _f, _f, _i32, _p, _p, _i32]),
    "dpc_dequantize": (None, [_p, _i64, _i32, _f, _f, _f, _i32, _p, _i32]),
    "dpc_fake_quant_rows": (None, [_p, _i64, _i64, _f, _p, _i32]),
    "dpc_quantize_measured": (_i32, [_p, _i64, _f, _i32, _p, _p, _p, _i32]),
    "dpc_stochastic_measured": (None, [_p, _i64, _f, _i64, _p, _i32]),
    "dpc_int8_row_sums": (None, [_p, _i64, _i64, _p, _i32]),
    "dpc_int8_col_sums": (None, [_p, _i64, _i64, _p, _i32]),
    "dpc_int8_transpose": (None, [_p, _i64, _i64, _i32, _p, _i32]),
    "dpc_int8_combine": (None, [_p, _i64, _i64, _p, _p, _p, _f, _f, _f, _f, _i32]),
    "dpc_int8_codes": (_i32, [_p, _i64, _f, _f, _f, _p, _i32]),
    "dpc_int8_stochastic": (_i32, [_p, _i64, _f, _i64, _p, _p, _i32]),
}

_state: dict[str, object] = {}  # "lib": the loaded library, or "error": why there is none


def _cache_dir() -> Path:
    root = os.environ.get("DPC_FX_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dpc_fx"


def _cpu() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _build(
    source: Path,
    flags: tuple[str, ...],
    link: tuple[str, ...] = (),
    key: str = "",
    announce: str = "",
) -> Path:
    """The library ``source`` builds into with ``flags``, from the cache if built before
    (once per source, flags, compiler and CPU; ``key`` adds what else it depends on).
    ``announce``: a line for stderr when a build starts (one that keeps the user waiting)."""
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise OSError("no C++ compiler (set CXX, or install g++)")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    # (layer.cpp includes quant.cpp: every source here is part of every key)
    texts = [p.read_text() for p in sorted(source.parent.glob("*.cpp"))]
    digest = hashlib.sha256(
        "\0".join((*texts, " ".join(flags + link), version, _cpu(), key)).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if announce:
        print(f"dpc_fx: {announce} into {target.parent} (once)", file=sys.stderr, flush=True)
    # Build beside the target and rename: processes building at once never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(source), "-o", tmp, *link],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_build(_SOURCE, _FLAGS)))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _why(e: Exception) -> str:
    detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else str(e)
    return f"{type(e).__name__}: {str(detail).strip()[:300]}"


def library() -> ctypes.CDLL | None:
    """The loaded native library, built on first call; ``None`` where there is none (the
    reason is kept in :func:`unavailable`, and warned about once where a build failed)."""
    if "native" not in os.environ.get("DPC_FX_KERNELS", "native").split("+"):
        return None
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    if "error" in _state:
        return None
    if not sys.platform.startswith("linux"):  # by design, not a fault: no warning
        _state["error"] = f"the native loops are built on Linux only (this is {sys.platform})"
        return None
    try:
        _state["lib"] = _load()
    except (OSError, subprocess.SubprocessError) as e:
        _state["error"] = _why(e)
        warnings.warn(
            f"dpc_fx: the native quantisation kernels are unavailable ({_state['error']}); "
            "running the torch kernels instead, with the same results "
            "(DPC_FX_KERNELS=fused silences this).",
            stacklevel=3,
        )
        return None
    return _state["lib"]  # type: ignore[return-value]


def unavailable() -> str | None:
    """Why :func:`library` returned ``None``, else why :func:`layers` returned ``False``
    after a failed build (``None`` if neither did, or was not asked)."""
    return _state.get("error", _state.get("layer error"))  # type: ignore[return-value]


def _torch_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Compile and link flags for a library of torch operators, from the installed torch."""
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = tuple(f for f in _FLAGS if not f.startswith("-std="))  # torch's headers: C++20
    compile_ = (*flags, "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}")
    lib = root / "lib"
    return compile_, (f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}")


def _registered() -> bool:
    return hasattr(torch.ops.dpc_fx, "layer")


def layers() -> bool:
    """Whether the fused layers' operator (``csrc/layer.cpp``: ``torch.ops.dpc_fx.layer``, a
    layer's step as one call forward and one C++ autograd node backward) is loaded; built on
    first call, against the installed torch, in about twenty seconds, then loaded from the
    cache. Where it cannot be (no native loops, or the build failed: warned about once, the
    reason kept in :func:`unavailable`), the fused layers run the same loops and ops from
    Python, with the same results."""
    if library() is None:
        return False
    if "layers" in _state:
        return bool(_state["layers"])
    _state["layers"] = False
    if _registered():  # loaded already (an operator namespace loads once a process)
        _for_compile()
        _state["layers"] = True
        return True
    try:
        compile_, link = _torch_flags()
        target = _build(
            _LAYER_SOURCE,
            compile_,
            link,
            key=torch.__version__,
            announce=f"building the layer operator for torch {torch.__version__}",
        )
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _state["layer error"] = _why(e)
        warnings.warn(
            f"dpc_fx: the fused layers' native operator is unavailable ({_why(e)}); the "
            "fused layers run their loops from Python instead, with the same results.",
            stacklevel=3,
        )
        return False
    _for_compile()
    _state["layers"] = True
    return True


def layers_loaded() -> bool:
    """Whether :func:`layers` has loaded the operator: a plain lookup, safe inside a
    ``torch.compile`` trace (which must not start a build)."""
    return _state.get("layers") is True


def held_bytes() -> int:
    """The bytes the fused layers' buffers hold on this thread, for the next layer or step
    to reuse: the operator's buffer for the quantised weights (the size of the largest it
    has made, up to 64 MiB), its pool's free buffers and the input the last layer shared
    (let go when autograd's engine ends a backward pass: between steps, only the weights'
    buffer), and :data:`pool`'s free buffers (the Python path's). A step's memory counts
    them: resident before it, they serve it."""
    held = sum(t.untyped_storage().nbytes() for t in pool.free)
    return held + (int(torch.ops.dpc_fx.held_bytes()) if layers_loaded() else 0)


def release() -> None:
    """Lets go of what :func:`held_bytes` counts, on this thread (later calls make new
    buffers)."""
    pool.free.clear()
    pool.pass_ = None
    if layers_loaded():
        torch.ops.dpc_fx.release()


# Under torch.compile a layer's step is two opaque operators, torch.ops.dpc_fx.layer_forward
# and layer_backward (the halves of torch.ops.dpc_fx.layer), which dpc_fx.fused joins in an
# autograd.Function for dynamo to trace: inductor runs them between its own kernels, and what
# forward keeps for backward stays the input's codes, never a float copy. The fake
# implementations give the shapes a trace needs.


def _product_fake(x: Tensor, weight: Tensor, bias: Tensor | None, *conv: object) -> Tensor:
    if x.dim() == 2:
        return torch.nn.functional.linear(x, weight, bias)
    fn = (torch.conv1d, torch.conv2d, torch.conv3d)[x.dim() - 3]
    return fn(x, weight, bias, *conv)  # type: ignore[call-overload, no-any-return]


def _forward_fake(
    x: Tensor, weight: Tensor, bias: Tensor | None, a_bits: int, w_bits: int, stride: list[int],
    padding: list[int], dilation: list[int], groups: int, *unused: int,
) -> tuple[Tensor, ...]:  # fmt: skip
    y = _product_fake(x.contiguous(), weight, bias, stride, padding, dilation, groups)
    codes = x.new_empty(packed_bytes(x.numel(), a_bits), dtype=torch.uint8)
    scalar = x.new_empty(())
    return y, codes, scalar, scalar.clone(), x.new_empty((), dtype=torch.bool)


def _backward_fake(
    grad: Tensor, codes: Tensor, lo: Tensor, hi: Tensor, bad: Tensor, weight: Tensor,
    x_size: list[int], *args: object,
) -> tuple[Tensor, ...]:  # fmt: skip
    has_bias, want = args[-2], args[-1]
    assert isinstance(want, list)
    empty = grad.new_empty(0)
    return (
        grad.new_empty(x_size) if want[0] else empty,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if want[1] else empty,
        grad.new_empty(weight.shape[0]) if want[2] and has_bias else empty,
    )


def _relu_forward_fake(x: Tensor, top: float) -> tuple[Tensor, Tensor]:
    bits = x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)
    return torch.empty_like(x, memory_format=torch.contiguous_format), bits


def _relu_backward_fake(grad: Tensor, bits: Tensor) -> Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _for_compile() -> None:
    if _state.get("compile ops"):
        return
    torch.library.register_fake("dpc_fx::layer_forward", _forward_fake)
    torch.library.register_fake("dpc_fx::layer_backward", _backward_fake)
    torch.library.register_fake("dpc_fx::relu_forward", _relu_forward_fake)
    torch.library.register_fake("dpc_fx::relu_backward", _relu_backward_fake)
    _state["compile ops"] = True


_DTYPES = (torch.float32, torch.uint8)


def int8_sums(q: Tensor, dim: int) -> Tensor | None:
    """``q.sum(dim, dtype=torch.int32)`` of an int8 matrix ``q`` that is dense row- or
    column-major on the CPU, in one vectorised pass; ``None`` where the loops cannot take it
    (ATen's own sum then casts the whole matrix to int32 first, a pass and a buffer more)."""
    if torch.compiler.is_compiling() or q.dtype != torch.int8 or q.device.type != "cpu":
        return None
    if q.dim() != 2 or library() is None:
        return None
    if not q.is_contiguous():
        q, dim = q.t(), 1 - dim  # a transposed view: the other sums of its dense matrix
        if not q.is_contiguous():
            return None
    rows, cols = q.shape
    out = torch.empty(rows if dim == 1 else cols, dtype=torch.int32)
    fn = _lib().dpc_int8_row_sums if dim == 1 else _lib().dpc_int8_col_sums
    fn(q.data_ptr(), rows, cols, out.data_ptr(), torch.get_num_threads())
    return out


def int8_codes(x: Tensor, lo: float, hi: float, bits: int) -> Tensor | None:
    """The int8 codes of :func:`dpc_fx.kernels.quantize_int8` for a dense float32 ``x`` on
    the CPU (nearest rounding over ``[lo, hi]``, shifted by ``2**(bits-1)``), in one pass;
    ``None`` where the loops cannot take ``x`` or it holds an ``inf`` or ``nan`` (the torch
    kernel then flags the rows that do)."""
    if bits > 8 or x.dtype != torch.float32 or not usable(x):
        return None
    codes = torch.empty(x.shape, dtype=torch.int8)
    bad = _lib().dpc_int8_codes(
        x.data_ptr(),
        x.numel(),
        lo,
        hi,
        float(2**bits - 1),
        codes.data_ptr(),
        torch.get_num_threads(),
    )
    return None if bad else codes


def int8_stochastic(x: Tensor, bits: int, seed: int) -> tuple[Tensor, Tensor] | None:
    """``(codes, [lo, hi])``: the finite range of a dense float32 ``x`` on the CPU and the int8
    codes of :func:`dpc_fx.kernels.quantize_int8_stochastic` over it (the same noise);
    ``None`` where the loops cannot take ``x`` or it holds an ``inf`` or ``nan``."""
    if bits > 8 or x.dtype != torch.float32 or not usable(x):
        return None
    codes = torch.empty(x.shape, dtype=torch.int8)
    span = torch.empty(2)
    bad = _lib().dpc_int8_stochastic(
        x.data_ptr(),
        x.numel(),
        float(2**bits - 1),
        seed,
        codes.data_ptr(),
        span.data_ptr(),
        torch.get_num_threads(),
    )
    return None if bad else (codes, span)


def int8_transpose(q: Tensor, flip: int = 0) -> Tensor | None:
    """``q.t()`` of a dense int8 matrix ``q`` on the CPU, made dense, each byte XOR-ed with
    ``flip`` (128: int8 codes as the u8 codes of a kernel whose zero point is 128), in one
    tiled pass; ``None`` where the loops cannot take it. (ATen's copy of a transposed int8
    view moves a byte at a time down columns, and the XOR would be a pass more.)"""
    if torch.compiler.is_compiling() or q.dtype != torch.int8 or q.device.type != "cpu":
        return None
    if q.dim() != 2 or not q.is_contiguous() or library() is None:
        return None
    rows, cols = q.shape
    out = torch.empty(cols, rows, dtype=torch.int8)
    _lib().dpc_int8_transpose(
        q.data_ptr(), rows, cols, flip, out.data_ptr(), torch.get_num_threads()
    )
    return out


def int8_combine(
    y: Tensor,
    rows: Tensor,
    cols: Tensor,
    factors: tuple[float, ...],
    bias: Tensor | None,
) -> bool:
    """``y = (a * y + r * rows[:, None]) + column[None, :]`` in place, with ``column = c *
    cols + k (+ bias)``, for ``factors = (a, r, c, k)`` (``dpc_fx.int8._factors``), in one
    pass: :func:`dpc_fx.int8._combine`'s arithmetic, in its order. ``False`` (``y``
    untouched) where the loops cannot take the tensors: ``y`` and ``bias`` dense float32,
    ``rows`` and ``cols`` dense int32, on the CPU."""
    if not usable(y) or y.dtype != torch.float32 or y.dim() != 2 or len(factors) != 4:
        return False
    n, j = y.shape
    for t, size in ((rows, n), (cols, j)):
        if t.dtype != torch.int32 or not t.is_contiguous() or t.numel() != size:
            return False
    if bias is not None and not (
        usable(bias) and bias.dtype == torch.float32 and bias.numel() == j
    ):
        return False
    _lib().dpc_int8_combine(
        y.data_ptr(),
        n,
        j,
        rows.data_ptr(),
        cols.data_ptr(),
        None if bias is None else bias.data_ptr(),
        *factors,
        torch.get_num_threads(),
    )
    return True


def usable(*tensors: Tensor) -> bool:
    """Whether the native loops can take these tensors: float32 (or uint8 codes), dense, on
    the CPU, outside a ``torch.compile`` trace (which must see torch ops), and the library
    built."""
    if torch.compiler.is_compiling():  # first: a trace must not see the stride checks
        return False
    for t in tensors:
        if t.dtype not in _DTYPES or t.device.type != "cpu" or not t.is_contiguous():
            return False
    return library() is not None


def _lib() -> ctypes.CDLL:
    lib = _state.get("lib")
    assert lib is not None, "call native.usable() first"
    return lib  # type: ignore[return-value]


def range_of(x: Tensor) -> tuple[Tensor, bool]:
    """``([lo, hi], bad)``: the finite min and max of ``x`` ([0, 0] if none is finite) as
    a float32 pair, and whether ``x`` holds an ``inf`` or ``nan``."""
    out = torch.empty(2)
    bad = _lib().dpc_range(x.data_ptr(), x.numel(), out.data_ptr(), torch.get_num_threads())
    return out, bool(bad)


def quantize(
    x: Tensor, lo: float, hi: float, bits: int, *, packed: bool, out: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """``(x_hat, codes)``: nearest rounding of ``x`` onto ``2**bits`` levels of ``[lo, hi]``
    (clamped into it; ``inf``/``nan`` passed through) and, if ``packed``, its codes packed as
    :func:`dpc_fx.fused.pack` packs them (to :func:`~dpc_fx.kernels.packed_bytes` bytes; a
    non-finite value's code is 0). ``out``: where to write ``x_hat`` (a float32 vector)."""
    x_hat = torch.empty_like(x) if out is None else out
    codes = torch.empty(packed_bytes(x.numel(), bits), dtype=torch.uint8) if packed else None
    _lib().dpc_quantize(
        x.data_ptr(),
        x.numel(),
        lo,
        hi,
        float(2**bits - 1),
        bits,
        x_hat.data_ptr(),
        codes.data_ptr() if codes is not None else None,
        torch.get_num_threads(),
    )
    return x_hat, codes


def dequantize(
    codes: Tensor,
    numel: int,
    bits: int,
    lo: float,
    hi: float,
    bad: bool,
    out: Tensor | None = None,
) -> Tensor:
    """The ``numel`` floats that ``codes`` (from :func:`quantize`) stand for, as a vector
    (into ``out`` if given); all ``nan`` if ``bad``."""
    out = torch.empty(numel) if out is None else out
    _lib().dpc_dequantize(
        codes.data_ptr(),
        numel,
        bits,
        lo,
        hi,
        float(2**bits - 1),
        int(bad),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def stochastic(x: Tensor, bits: int, seed: int, out: Tensor | None = None) -> Tensor:
    """:func:`dpc_fx.kernels.fake_quant_stochastic` of ``x`` (into ``out`` if given): its
    finite range measured, then stochastic rounding with the same noise stream."""
    out = torch.empty_like(x) if out is None else out
    _lib().dpc_stochastic_measured(
        x.data_ptr(), x.numel(), float(2**bits - 1), seed, out.data_ptr(), torch.get_num_threads()
    )
    return out


def quantize_measured(
    x: Tensor, bits: int, out: Tensor | None = None, *, packed: bool = True
) -> tuple[Tensor, Tensor | None, Tensor, bool]:
    """:func:`range_of` and :func:`quantize` over that range, in one call: ``(x_hat, codes,
    [lo, hi], bad)`` (``codes`` None unless ``packed``)."""
    x_hat = torch.empty_like(x) if out is None else out
    codes = torch.empty(packed_bytes(x.numel(), bits), dtype=torch.uint8) if packed else None
    span = torch.empty(2)
    bad = _lib().dpc_quantize_measured(
        x.data_ptr(),
        x.numel(),
        float(2**bits - 1),
        bits,
        x_hat.data_ptr(),
        codes.data_ptr() if codes is not None else None,
        span.data_ptr(),
        torch.get_num_threads(),
    )
    return x_hat, codes, span, bool(bad)


def fake_quant_rows(x: Tensor, bits: int) -> Tensor:
    """:func:`dpc_fx.kernels.fake_quant_channels` of the matrix ``x``: each row quantised
    over its own finite range."""
    out = torch.empty_like(x)
    rows, cols = x.shape
    _lib().dpc_fake_quant_rows(
        x.data_ptr(), rows, cols, float(2**bits - 1), out.data_ptr(), torch.get_num_threads()
    )
    return out


class _Pool(threading.local):
    """Float32 buffers for a fused layer's temporaries (its quantised input in forward; the
    quantised gradient and the dequantised input in backward), handed back once the layer's
    product has read them, and handed out again to the next layer that needs one of the
    same size: fresh memory of a few megabytes costs page faults on every use, and on a
    two-core machine those made up a tenth of a Transformer block's step.

    At most :attr:`KEEP` buffers are kept, and those of one pass are let go when the other
    pass starts (forward's when backward does, and backward's at the next forward), so the
    pool never holds memory through the pass where the activations peak. Per thread."""

    KEEP = 4
    SMALLEST = 1 << 16  # elements; smaller blocks come from the allocator's heap anyway

    def __init__(self) -> None:
        self.free: list[Tensor] = []
        self.pass_: str | None = None

    def enter(self, pass_: str) -> None:
        if pass_ != self.pass_:
            self.free.clear()
            self.pass_ = pass_

    def take(self, numel: int) -> Tensor:
        for i, t in enumerate(self.free):
            if t.numel() == numel:
                return self.free.pop(i)
        return torch.empty(numel)

    def give(self, *tensors: Tensor | None) -> None:
        for t in tensors:
            if t is not None and t.numel() >= self.SMALLEST and t._base is None:
                self.free.append(t)
        del self.free[: -self.KEEP]


pool = _Pool()
