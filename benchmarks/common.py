"""Shared helpers for lowbit's benchmarks: machine description, tables, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def quantized_copy(model, recipe, calibration, **options):
    """A deep copy of ``model`` quantized by ``recipe`` (the original stays the reference), the
    :class:`~lowbit.api.QuantizationResult`, and the wall seconds ``lowbit.quantize`` took."""
    import copy
    import time

    import lowbit

    model = copy.deepcopy(model)
    start = time.perf_counter()
    result = lowbit.quantize(model, recipe, calibration=calibration, **options)
    return model, result, time.perf_counter() - start


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(rows: list[dict], columns: list[str], formats: dict[str, str] | None = None) -> str:
    formats = formats or {}
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            if isinstance(v, float) and c in formats:
                cells.append(format(v, formats[c]))
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_result(name: str, title: str, body: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    header = (
        f"# {title}\n\n"
        f"Command: `{command()}` (lowbit at git {git_revision()})\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}\n\n"
    )
    md = RESULTS / f"{name}.md"
    md.write_text(header + body + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command(), "machine": m, **data}, indent=2) + "\n")
    print(md.read_text())
    return md
