"""Write one benchmark's table into benchmarks/RESULTS.md, replacing that benchmark's section only."""

from __future__ import annotations

import platform
import re
import sys
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEvery table below was produced by the command shown with it; rerun the command to refresh it.\n"


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {dev}, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(name: str, body: str, command: str | None = None) -> None:
    command = command or "python " + " ".join(sys.argv)
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else HEADER
    section = f"<!-- {name}:start -->\n## {name}\n\nCommand: `{command}`  \nMeasured {date.today().isoformat()} on {machine()}.\n\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text, encoding="utf-8")


def table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)
