"""Where a streaming GPTQ run's memory goes: resident memory sampled every 20 ms, labelled with the
pipeline's most recent log message, so each phase (a layer's Hessian capture, its factorisation,
the sanity generation, writing) shows its own peak.

    python benchmarks/make_random_llama.py --size 1b --out /tmp/llama-1b
    python benchmarks/memory_phases.py --model /tmp/llama-1b --blocks 2 --out-md benchmarks/results/memory_phases.md

``--blocks N`` runs a copy of the model cut to its first N blocks (files linked, not copied): the
phases of one block are the same in every block, and the run takes a minute instead of ten.
RSS is split into anonymous memory (tensors, the Python heap) and file-backed pages (mostly the
shared libraries' code).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import command, machine


def resident() -> tuple[float, float, float]:
    """(RSS, anonymous, file-backed) in GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(line.split()[1]) / 2**20
    return fields["VmRSS"], fields["RssAnon"], fields["RssFile"]


def cut_model(model: Path, blocks: int, into: Path) -> Path:
    """A view of ``model`` with only its first ``blocks`` blocks: links to the same files."""
    into.mkdir(parents=True)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    index = json.loads((model / "model.safetensors.index.json").read_text())
    keep = {
        k: v
        for k, v in index["weight_map"].items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks
    }
    index["weight_map"] = keep
    for f in {*keep.values(), "tokenizer.json", "tokenizer_config.json"}:
        if (model / f).exists():
            (into / f).symlink_to((model / f).resolve())
    (into / "config.json").write_text(json.dumps(config))
    (into / "model.safetensors.index.json").write_text(json.dumps(index))
    return into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--blocks", type=int, default=None, help="only the first N blocks (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out-md", default=None, help="also write the table here")
    args = p.parse_args()

    from lowbit.algorithms import GPTQ
    from lowbit.api import quantize_checkpoint
    from lowbit.pipeline import PipelineOptions

    phase = ["imports"]
    samples: list[tuple[tuple[float, float, float], str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((resident(), phase[0]))
            time.sleep(0.02)

    class Label(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            phase[0] = record.getMessage()[:80]

    logger = logging.getLogger("lowbit")
    logger.addHandler(Label())
    logger.setLevel(logging.DEBUG)
    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model)
        if args.blocks:
            model = cut_model(model, args.blocks, Path(tmp) / "model")
        out = Path(tmp) / "out"
        step = GPTQ(format="int4", group_size=128, symmetric=False)
        # as `lowbit quantize` runs a checkpoint of 1 GiB or more (the cut copy is smaller)
        options = PipelineOptions(progress=False, sanity_samples=2, batch_size=args.batch_size, tune_allocator=True)
        quantize_checkpoint(model, [step], out, n_samples=16, seq_len=512, options=options, force=True)
        shutil.rmtree(out, ignore_errors=True)
    done.set()

    peaks: dict[str, tuple[float, float, float]] = {}
    for values, label in samples:
        if label not in peaks or values[0] > peaks[label][0]:
            peaks[label] = values
    lines = [
        "# Resident memory by pipeline phase (streaming GPTQ int4 g128, 16 x 512 calibration)",
        "",
        f"Command: `{command()}`. Machine: {machine()['cpu']}, {machine()['cores']} cores, torch {machine()['torch']}.",
        f"Peak RSS of the whole run (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB.",
        "Each row: the highest RSS sampled while this log message was the latest one (the phase that follows it).",
        "",
        "| RSS GiB | anonymous | file-backed | phase (after this log message) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r:.3f} | {a:.3f} | {f:.3f} | {label} |" for label, (r, a, f) in peaks.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text)


if __name__ == "__main__":
    main()
