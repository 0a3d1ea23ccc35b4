"""Writes one benchmark's section of BENCHMARKS.md, leaving the other sections as they are.

Each section sits between ``<!-- name:start -->`` and ``<!-- name:end -->`` and always carries the command
that produced it and when, so a reader can re-run it.
"""
from __future__ import annotations

import datetime as dt
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
_HEADER = ("# Benchmarks\n\nWritten by the scripts in `benchmarks/`; each section names the command that produced "
           "it. Raw numbers are in `benchmarks/results/*.json`.\n")


def machine() -> str:
    import os
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def write_section(name: str, title: str, command: str, lines: list[str], path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section ``name`` in BENCHMARKS.md."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([f"<!-- {name}:start -->", f"## {title}", "",
                      f"Command: `{command}`  ", f"Run: {stamp} on {machine()}", "", *lines, f"<!-- {name}:end -->"])
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)
