"""Terminal rendering of a compiled module: the one place dpc_fx uses rich.

``show(gm)`` prints one row per matmul-like layer (name, op, parameters, MACs, depth,
capacity, bits, bit-operations and, once a fused layer has trained a step, the bytes it keeps
for backward) and a summary with the cost saving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dpc_fx.cost import bitops, cost
from dpc_fx.errors import PassOrderError
from dpc_fx.meta import LayerMeta, records

__all__ = ["layer_table", "show", "summary_text"]

# Fewer bits, warmer colour: the eye finds the layers DPC shrank.
_BIT_STYLE = {
    1: "bold red",
    2: "bold red",
    3: "red",
    4: "dark_orange",
    5: "yellow",
    6: "gold1",
    7: "green_yellow",
    8: "green",
}


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _bits_cell(bits: int | None) -> str:
    if bits is None:
        return "[dim]fp[/dim]"
    style = _BIT_STYLE.get(bits, "cyan")
    return f"[{style}]{bits}[/{style}]"


def layer_table(gm: nn.Module, *, title: str | None = None) -> object:
    """A ``rich.table.Table`` with one row per matmul-like layer of ``gm``."""
    from rich.table import Table

    rows: list[LayerMeta] = records(gm)
    has_macs = all(m.macs is not None for m in rows)
    table = Table(title=title, header_style="bold", show_lines=False, pad_edge=False)
    for name, justify in (
        ("#", "right"),
        ("layer", "left"),
        ("op", "left"),
        ("out shape", "left"),
        ("params", "right"),
        ("MACs", "right"),
        ("depth", "right"),
        ("capacity", "right"),
        ("w", "right"),
        ("a", "right"),
        ("g", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    if has_macs:
        table.add_column("bitops", justify="right")
    kept = _kept(gm) if has_macs else {}
    if kept:
        table.add_column("kept", justify="right")  # bytes saved for backward
    for i, m in enumerate(rows):
        bits = m.bits
        cells = [
            str(i),
            m.layer + (" [dim](pinned)[/dim]" if m.pinned else ""),
            m.module_type or m.op,
            "x".join(map(str, m.out_shape)) if m.out_shape else "-",
            _human(m.params),
            _human(m.macs),
            str(m.depth),
            _human(m.capacity),
            _bits_cell(bits.w if bits else None),
            _bits_cell(bits.a if bits else None),
            _bits_cell(bits.g if bits else None),
        ]
        if has_macs and bits is not None and m.macs is not None:
            cells.append(_human(sum(bitops(m.macs, bits))))
        if kept:
            saved = kept.get(m.layer)
            cells.append("-" if saved is None else f"{_human(saved)}B")
        table.add_row(*cells)
    return table


def _kept(gm: nn.Module) -> dict[str, int | None]:
    """Per layer, the bytes its fused layer keeps for backward; empty if no layer says."""
    try:
        rows = cost(gm).layers
    except PassOrderError:
        return {}
    found = {r.layer: r.saved_bytes for r in rows}
    return found if any(v is not None for v in found.values()) else {}


def summary_text(gm: nn.Module) -> str:
    """A few lines: layer counts, parameters, MACs, mean bits and the cost saving."""
    rows = records(gm)
    quantised = [m for m in rows if m.bits is not None and not m.bits.full_precision]
    pinned = sum(m.pinned for m in rows)
    params = sum(m.params for m in rows)
    lines = [
        f"{len(rows)} matmul-like layers: {len(quantised)} quantised, {pinned} pinned to full "
        f"precision, {len(rows) - len(quantised) - pinned} left in full precision otherwise",
        f"parameters in these layers: {_human(params)}",
    ]
    if quantised:
        weights = [float(m.macs if m.macs is not None else m.params) for m in quantised]
        widths = [(m.bits.w if m.bits else None) or 32 for m in quantised]
        mean = sum(w * b for w, b in zip(weights, widths, strict=True))
        basis = "MACs" if all(m.macs is not None for m in quantised) else "parameters"
        lines.append(
            f"mean weight/activation bits of quantised layers ({basis}-weighted): "
            f"{mean / max(sum(weights), 1.0):.2f}"
        )
    if rows and all(m.macs is not None for m in rows):
        c = cost(gm)
        lines.append(
            f"MACs per step: {_human(sum(r.macs for r in c.layers))}; training bit-operations: "
            f"{c.saving_vs_fp32:.1%} fewer than fp32, {c.saving_vs_8bit:.1%} fewer than static 8-bit"
        )
    return "\n".join(lines)


def show(gm: nn.Module, *, console: object = None, title: str | None = None) -> None:
    """Print the annotated layers of ``gm`` and a summary to the terminal."""
    from rich.console import Console
    from rich.panel import Panel

    con = console if console is not None else Console()
    name = title or f"{gm.__class__.__name__}: DPC plan"
    con.print(layer_table(gm, title=name))  # type: ignore[attr-defined]
    con.print(Panel(summary_text(gm), title="summary", expand=False))  # type: ignore[attr-defined]


def to_json(gm: nn.Module) -> dict[str, Any]:
    """The annotated layers, the plan's config and (with MACs) the cost, as JSON-ready data."""
    from dpc_fx.plan import plan_of

    rows = records(gm)
    plan = plan_of(gm)
    out: dict[str, Any] = {
        "model": gm.__class__.__name__,
        "fingerprint": plan.fingerprint,
        "config": plan.config.to_dict(),
        "layers": [
            {
                "layer": m.layer,
                "op": m.op,
                "module_type": m.module_type,
                "out_shape": list(m.out_shape) if m.out_shape else None,
                "params": m.params,
                "macs": m.macs,
                "flops": m.flops,
                "depth": m.depth,
                "capacity": m.capacity,
                "pinned": m.pinned,
                "bits": {"w": m.bits.w, "a": m.bits.a, "g": m.bits.g} if m.bits else None,
            }
            for m in rows
        ],
    }
    if rows and all(m.macs is not None for m in rows):
        c = cost(gm)
        out["cost"] = {
            "bitops": c.total,
            "forward_bitops": c.forward,
            "fp32_bitops": c.fp32,
            "static8_bitops": c.static8,
            "saving_vs_fp32": c.saving_vs_fp32,
            "saving_vs_8bit": c.saving_vs_8bit,
        }
    return out


def plot(gm: nn.Module, path: str | Path, *, title: str | None = None) -> None:
    """Save a figure of bits (bars) and capacity (line, log scale) per layer in network order."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'dpc-fx[demo]'") from e

    rows = records(gm)
    xs = list(range(len(rows)))
    bits = [(m.bits.w if m.bits and m.bits.w is not None else 32) for m in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(rows) + 2), 3.6), dpi=120)
    colours = ["#bbbbbb" if b == 32 else plt.cm.viridis((b - 1) / 8) for b in bits]
    shown = [min(b, 10) for b in bits]  # full precision drawn as a short grey bar, labelled
    ax.bar(xs, shown, color=colours, width=0.8)
    for x, b in zip(xs, bits, strict=True):
        ax.text(x, min(b, 10) + 0.15, "fp" if b == 32 else str(b), ha="center", fontsize=7)
    ax.set_ylabel("weight / activation bits")
    ax.set_ylim(0, 11)
    ax.set_xticks(xs, [m.layer for m in rows], rotation=90, fontsize=7)
    cap = ax.twinx()
    capacity = [m.capacity if m.capacity else float("nan") for m in rows]
    cap.plot(xs, capacity, color="#d62728", marker="o", markersize=3, linewidth=1)
    cap.set_yscale("log")
    cap.set_ylabel("capacity", color="#d62728")
    head = title or gm.__class__.__name__
    if rows and all(m.macs is not None for m in rows):
        c = cost(gm)
        head += (
            f": {c.saving_vs_fp32:.1%} fewer bit-ops than fp32, {c.saving_vs_8bit:.1%} than 8-bit"
        )
    ax.set_title(head, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
