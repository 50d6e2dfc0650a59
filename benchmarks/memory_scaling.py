"""Peak memory and seconds per block when quantizing large random Llamas on this CPU.

    python benchmarks/make_random_llama.py --size 1b --out /tmp/llama-1b
    python benchmarks/memory_scaling.py --model /tmp/llama-1b --mode streaming --method gptq
    python benchmarks/memory_scaling.py --model /tmp/llama-1b --mode in-memory --method gptq

Each measurement runs in a fresh process and reports its peak RSS (ru_maxrss) against the bf16
checkpoint size. ``streaming`` is what ``lowbit quantize`` does (blocks read from disk one at a
time, written out as they finish); ``in-memory`` loads the whole model and quantizes it in place
(``lowbit.quantize`` on an nn.Module). Results are appended to benchmarks/results/memory_scaling.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, command, git_revision, machine


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--mode", choices=["streaming", "in-memory"])
    p.add_argument("--method", choices=["rtn", "gptq"], default="gptq")
    p.add_argument(
        "--recipe", type=Path, default=None, help="a YAML recipe instead of --method (its file name labels the row)"
    )
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="calibration sequences per forward pass (the block forward's temporaries grow with it)",
    )
    p.add_argument("--out", default="/tmp/lowbit-memory-out")
    p.add_argument("--render", action="store_true", help="only write results/memory_scaling.md from the jsonl rows")
    p.add_argument(
        "--stop-after-blocks",
        type=int,
        default=None,
        help="streaming only: run `lowbit quantize` in a child process, watch its peak RSS and block times, "
        "and kill it once this many blocks are done (for runs too long to finish here; the same command resumes)",
    )
    args = p.parse_args()
    if args.render:
        render()
        return
    if not args.model or not args.mode:
        p.error("--model and --mode are required (unless --render)")
    if args.stop_after_blocks:
        partial_run(args)
        return

    import lowbit
    from lowbit.algorithms import GPTQ, RTN
    from lowbit.api import quantize_checkpoint
    from lowbit.pipeline import PipelineOptions

    model_dir = Path(args.model)
    size = checkpoint_bytes(model_dir)
    if args.recipe is not None:
        from lowbit.recipe import Recipe

        steps = list(Recipe.from_yaml(args.recipe))
        args.method = args.recipe.stem
    else:
        steps = [(GPTQ if args.method == "gptq" else RTN)(format="int4", group_size=128, symmetric=False)]
    # streaming as the CLI runs it (glibc's allocator tuned, as the CLI does for checkpoints of 1 GiB and more)
    options = PipelineOptions(
        progress=True, sanity_samples=2, batch_size=args.batch_size, tune_allocator=args.mode == "streaming"
    )
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    start = time.perf_counter()
    if args.mode == "streaming":
        run = quantize_checkpoint(
            model_dir, steps, out, n_samples=args.n_samples, seq_len=args.seq_len, options=options, force=True
        )
        report = run.report
    else:
        loaded = lowbit.load_model(model_dir, dtype=torch.bfloat16)
        result = lowbit.quantize(
            loaded, steps, calibration="builtin", n_samples=args.n_samples, seq_len=args.seq_len, options=options
        )
        report = result.report
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    blocks = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    row = {
        "model": str(model_dir),
        "mode": args.mode,
        "method": args.method,
        "calibration": f"{args.n_samples} x {args.seq_len}",
        "batch_size": args.batch_size,
        "checkpoint_gib": size / 2**30,
        "peak_rss_gib": peak / 2**30,
        "peak_over_checkpoint": peak / size,
        "seconds": seconds,
        "seconds_per_block": seconds / max(1, blocks),
        "blocks": blocks,
        "layers_quantized": len(report.layers),
        "phase_seconds": report.timings,
        **tmpdir_backup(model_dir, args.method),
        "command": command(),
        "revision": git_revision(),
        "machine": machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "memory_scaling.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2))
    shutil.rmtree(out, ignore_errors=True)


def tmpdir_backup(model_dir: Path, method: str) -> dict:
    """The packed Hessian GPTQ writes to TMPDIR for damping retries (its largest), and whether TMPDIR is in memory
    (a tmpfs): then that file is memory too, which ru_maxrss does not count."""
    from lowbit.algorithms.hessian import hessian_nbytes, packs, temp_files_in_memory

    config = json.loads((model_dir / "config.json").read_text())
    widest = max(config["hidden_size"], config["intermediate_size"])
    backup = hessian_nbytes(widest, "cpu") if "gptq" in method and packs(widest, "cpu") else 0
    return {"tmpdir_backup_gib": backup / 2**30, "tmpdir_in_memory": temp_files_in_memory()}


def partial_run(args) -> None:
    """The first blocks of a long streaming run through the CLI, killed (SIGKILL) after N blocks."""
    import os
    import signal
    import subprocess

    model_dir = Path(args.model)
    out = Path(args.out)
    work = out.parent / f".{out.name}.partial"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit", "quantize", str(model_dir), "--out", str(out)]
    if args.recipe is not None:
        cmd += ["--recipe", str(args.recipe)]
        args.method = args.recipe.stem
    else:
        cmd += ["--method", args.method, "--bits", "4", "--group-size", "128", "--asymmetric"]
    cmd += ["--n-samples", str(args.n_samples)]
    cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--sanity-samples", "2", "--force"]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_at: list[float] = []
    peak_kib = 0
    while child.poll() is None:
        with open(f"/proc/{child.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        try:
            next_block = json.loads((work / "lowbit_run.json").read_text())["next_block"]
        except (OSError, ValueError, KeyError):
            next_block = 0
        while len(done_at) < next_block:
            done_at.append(time.perf_counter() - start)
            print(f"block {len(done_at)} done at {done_at[-1]:.0f} s, peak RSS {peak_kib / 2**20:.2f} GiB", flush=True)
        if next_block >= args.stop_after_blocks:
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(1)
    child.wait()
    size = checkpoint_bytes(model_dir)
    per_block = [b - a for a, b in itertools.pairwise(done_at)]
    row = {
        "model": str(model_dir),
        "mode": "streaming",
        "method": args.method,
        "calibration": f"{args.n_samples} x {args.seq_len}",
        "batch_size": args.batch_size,
        "checkpoint_gib": size / 2**30,
        "peak_rss_gib": peak_kib / 2**20,
        "peak_over_checkpoint": peak_kib * 1024 / size,
        "partial": True,
        "blocks_done": len(done_at),
        "first_block_seconds": done_at[0] if done_at else None,
        "seconds_per_block": sorted(per_block)[len(per_block) // 2] if per_block else None,
        "seconds": time.perf_counter() - start,
        "blocks": json.loads((model_dir / "config.json").read_text())["num_hidden_layers"],
        "command": command(),
        "child_command": " ".join(cmd[1:]),
        **tmpdir_backup(model_dir, args.method),
        "revision": git_revision(),
        "machine": machine(),
    }
    with open(RESULTS / "memory_scaling.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def render() -> None:
    """results/memory_scaling.md from the rows measured so far (the newest row per configuration)."""
    from common import markdown_table

    latest = {}
    for line in (RESULTS / "memory_scaling.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.setdefault("batch_size", 4)  # rows from before the option existed all used 4
        latest[(row["model"], row["mode"], row["method"], row.get("partial", False), row["batch_size"])] = row
    rows = []
    for row in latest.values():
        rows.append(
            {
                "model": Path(row["model"]).name,
                "mode": row["mode"] + (f" (first {row['blocks_done']} blocks)" if row.get("partial") else ""),
                "method": row["method"] + " int4 g128",
                "calibration": f"{row['calibration']}, batch {row['batch_size']}" if row["method"] != "rtn" else "-",
                "checkpoint GiB": row["checkpoint_gib"],
                "peak RSS GiB": row["peak_rss_gib"],
                "peak / checkpoint": row["peak_over_checkpoint"],
                # the packed Hessian's retry backup in TMPDIR: memory as well when TMPDIR is a tmpfs
                "TMPDIR file GiB": (
                    f"{row['tmpdir_backup_gib']:.3f} ({'tmpfs: add to the peak' if row['tmpdir_in_memory'] else 'disk'})"
                    if "tmpdir_backup_gib" in row
                    else "-"
                ),
                "s per block": row["seconds_per_block"],
                "total s": row["seconds"],
                # rows from before revisions were recorded ran the code before packed Hessians
                "code": row.get("revision", "older"),
            }
        )
    table = markdown_table(
        rows,
        list(rows[0]),
        {
            "checkpoint GiB": ".2f",
            "peak RSS GiB": ".3f",
            "peak / checkpoint": ".3f",
            "s per block": ".1f",
            "total s": ".0f",
        },
    )
    machine_ = next(iter(latest.values()))["machine"]
    text = (
        "# Peak memory and time on large random Llamas\n\n"
        "Commands (each row in a fresh process; see the docstring of `memory_scaling.py`):\n\n"
        "```\n" + "\n".join(sorted({r["command"] for r in latest.values()})) + "\n```\n\n"
        f"Machine: {machine_['cpu']}, {machine_['cores']} cores, torch {machine_['torch']}, no GPU.\n\n"
        + table
        + "\n\nPeak RSS is the process's maximum resident set (ru_maxrss), which includes about 0.40 GiB "
        "for Python, torch, transformers and the tokenizer before any work. Seconds per block is the whole run (calibration "
        "capture, the sanity check with its greedy generation, writing) divided by the number of blocks.\n"
        + "".join(
            f"\nThe row marked *first {r['blocks_done']} blocks* ran `{r['child_command']}` and was killed "
            f"(SIGKILL) after {r['blocks_done']} of {r['blocks']} blocks: peak RSS of that process so far; seconds "
            f"per block is the median of blocks 2-{r['blocks_done']} (block 1, with calibration capture and the "
            f"original model's greedy generation, took {r['first_block_seconds']:.0f} s).\n"
            for r in latest.values()
            if r.get("partial")
        )
    )
    (RESULTS / "memory_scaling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
