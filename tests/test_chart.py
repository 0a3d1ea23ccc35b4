"""The demo chart: a valid PNG whose panels actually draw the data given."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coordinator.cli.chart import DENSE_COLOR, EPSILON_COLOR, ONNX_COLOR, human_bytes, plot_rounds


def _rounds(n: int = 6, dense: bool = True) -> list[dict]:
    rows = []
    for i in range(1, n + 1):
        row = {"round": i, "accuracy": 0.2 + 0.12 * i, "uplink_bytes": 4000 + 50 * i}
        if dense:
            row["dense_bytes"] = 400_000
        rows.append(row)
    return rows


def _pixels_near(path: Path, hex_color: str, tol: int = 30) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    target = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=2) <= tol).sum())


def test_chart_is_a_readable_png(tmp_path: Path) -> None:
    path = plot_rounds(_rounds(), tmp_path / "sub" / "chart.png", title="t", onnx_accuracy=0.9)
    assert path == tmp_path / "sub" / "chart.png"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 600 and img.height >= 500
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, lines and bars, not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == ["chart.png"]  # no temp file left behind


def test_reference_line_and_onnx_marker_are_drawn_only_when_given(tmp_path: Path) -> None:
    with_all = plot_rounds(_rounds(), tmp_path / "a.png", onnx_accuracy=0.9)
    without = plot_rounds(_rounds(dense=False), tmp_path / "b.png")
    assert _pixels_near(with_all, DENSE_COLOR) > 100
    assert _pixels_near(without, DENSE_COLOR) == 0
    assert _pixels_near(with_all, ONNX_COLOR) > 50
    assert _pixels_near(without, ONNX_COLOR) == 0


def test_epsilon_spent_is_drawn_for_dp_jobs_only(tmp_path: Path) -> None:
    rows = [{**r, "epsilon": 0.5 * r["round"]} for r in _rounds()]
    assert _pixels_near(plot_rounds(rows, tmp_path / "dp.png"), EPSILON_COLOR, tol=20) > 100
    assert _pixels_near(plot_rounds(_rounds(), tmp_path / "plain.png"), EPSILON_COLOR, tol=20) == 0


def test_rounds_without_accuracy_and_zero_bytes_are_tolerated(tmp_path: Path) -> None:
    rows = [{"round": 1, "accuracy": None, "uplink_bytes": 0}, {"round": 2, "accuracy": 0.5, "uplink_bytes": 10}]
    with Image.open(plot_rounds(rows, tmp_path / "c.png")) as img:
        assert img.format == "PNG"


def test_no_rounds_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rounds"):
        plot_rounds([], tmp_path / "d.png")


@pytest.mark.parametrize("n,text", [(512, "512 B"), (1536, "1.54 KB"), (250_000, "250 KB"), (3.2e6, "3.2 MB")])
def test_human_bytes(n: float, text: str) -> None:
    assert human_bytes(n) == text
