"""PNG chart of a federated job: accuracy per round above, uplink bytes per round below.

The byte panel shows what the codec actually sent next to the dense-fp32 equivalent (what FedAvg without
compression would have sent for the same participants), on a log scale so a 100x saving is visible.
Uses the object-oriented Agg API (no pyplot global state), so it is safe inside a server thread.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

ACCURACY_COLOR = "#1f77b4"
ONNX_COLOR = "#2ca02c"
SENT_COLOR = "#ff7f0e"
DENSE_COLOR = "#d62728"
REJECTED_COLOR = "#7f7f7f"
EPSILON_COLOR = "#9467bd"


def human_bytes(n: float, _pos: Any = None) -> str:
    """1536 -> '1.5 KB' (decimal units: what network dashboards show)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


def _series(rounds: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        value = r.get(key)
        if value is not None:
            xs.append(int(r["round"]))
            ys.append(float(value))
    return xs, ys


def plot_rounds(rounds: Sequence[Mapping[str, Any]], out_path: str | Path, *, title: str = "FedSight job",
                onnx_accuracy: float | None = None, dpi: int = 110) -> Path:
    """Write the two-panel PNG and return its path.

    ``rounds``: one mapping per round with ``round``, ``accuracy`` (0..1 or None), ``uplink_bytes`` and
    optionally ``dense_bytes`` (dense-fp32 equivalent of that round's accepted uplink) and ``rejected_bytes``
    (rejected and junk traffic, drawn apart so it never counts as compressed uplink). ``onnx_accuracy`` adds a
    marker at the last round for the exported model's accuracy.
    """
    if not rounds:
        raise ValueError("no rounds to plot")
    fig = Figure(figsize=(7.5, 6.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_bytes = fig.subplots(2, 1, sharex=True)
    fig.suptitle(title, fontsize=12)

    xs, acc = _series(rounds, "accuracy")
    if xs:
        ax_acc.plot(xs, [a * 100 for a in acc], marker="o", color=ACCURACY_COLOR, label="global model (PyTorch)")
        ax_acc.annotate(f"{acc[-1] * 100:.1f}%", (xs[-1], acc[-1] * 100), textcoords="offset points",
                        xytext=(-6, -16), ha="right", fontsize=9, color=ACCURACY_COLOR)
    if onnx_accuracy is not None:
        last = int(rounds[-1]["round"])
        ax_acc.scatter([last], [onnx_accuracy * 100], marker="*", s=160, color=ONNX_COLOR, zorder=3,
                       label=f"exported ONNX ({onnx_accuracy * 100:.1f}%)")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_ylim(0, 100)
    ax_acc.grid(True, alpha=0.3)
    ax_acc.set_title("accuracy on the held-out test set after each round", fontsize=10)
    handles, labels = ax_acc.get_legend_handles_labels()
    ex, eps = _series(rounds, "epsilon")
    if ex:  # DP jobs: privacy spent (accountant's epsilon after each round) on a second axis
        ax_eps = ax_acc.twinx()
        ax_eps.step(ex, eps, where="post", color=EPSILON_COLOR, linestyle="-.", label="epsilon spent")
        ax_eps.set_ylabel("epsilon spent", color=EPSILON_COLOR)
        ax_eps.set_ylim(0, max(eps) * 1.15 or 1.0)
        h2, l2 = ax_eps.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
        ax_acc.set_title(f"accuracy on the held-out test set after each round; epsilon {eps[-1]:.2f} spent",
                         fontsize=10)
    if handles:
        ax_acc.legend(handles, labels, loc="lower right", fontsize=9)

    bx, sent = _series(rounds, "uplink_bytes")
    ax_bytes.bar(bx, sent, width=0.6, color=SENT_COLOR, label="accepted updates (compressed)")
    rx, refused = _series(rounds, "rejected_bytes")
    if any(v > 0 for v in refused):  # kept apart: rejected traffic says nothing about compression
        ax_bytes.scatter(rx, [v if v > 0 else float("nan") for v in refused], marker="x", color=REJECTED_COLOR,
                         zorder=3, label=f"rejected ({human_bytes(sum(refused))} in total)")
    dx, dense = _series(rounds, "dense_bytes")
    if dx:
        ax_bytes.plot(dx, dense, linestyle="--", color=DENSE_COLOR, linewidth=2,
                      label="raw fp32 (4 B x numel)")
        total_sent, total_dense = sum(sent), sum(dense)
        if total_sent > 0:
            ax_bytes.set_title(f"uplink per round: {human_bytes(total_sent)} sent in total vs "
                               f"{human_bytes(total_dense)} raw fp32 "
                               f"({total_dense / total_sent:.0f}x less vs raw fp32)",
                               fontsize=10)
    else:
        ax_bytes.set_title(f"uplink per round ({human_bytes(sum(sent))} in total)", fontsize=10)
    positive = [v for v in sent + dense + refused if v > 0]
    if positive:
        ax_bytes.set_yscale("log")
        ax_bytes.set_ylim(min(positive) / 3, max(positive) * 3)  # bars visible, reference line not at the rim
        ax_bytes.yaxis.set_minor_formatter(NullFormatter())
    ax_bytes.yaxis.set_major_formatter(FuncFormatter(human_bytes))
    ax_bytes.set_ylabel("uplink bytes per round")
    ax_bytes.set_xlabel("round")
    ax_bytes.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_bytes.grid(True, which="major", alpha=0.3)
    ax_bytes.legend(loc="best", fontsize=9)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a chart is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
