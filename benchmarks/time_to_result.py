"""Time to result of the CLI on reference-lm: wall and CPU seconds of whole commands, and KL of the result.

    python benchmarks/time_to_result.py [--repeats 2] [--before PATH_TO_OLD_SRC]

Each command runs as a subprocess (CPU = user + system time of the child, all threads), ``--repeats`` times,
the commands interleaved (round robin), on the machine as it is: run it on an idle machine. With ``--before``,
the same quantize commands also run with that source tree on PYTHONPATH (e.g. a worktree of an earlier commit),
interleaved with the current ones, for a before/after comparison in one run. Every quantized output is
evaluated against the original (held-out perplexity, KL, top-1 agreement) with the current code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import markdown_table, write_result

QUANTIZE = (
    "lowbit quantize reference-lm --bits 4 --group-size 128 --asymmetric --overwrite --method {method} --out {out}"
)
README_JOB = (
    "lowbit quantize reference-lm --method gptq --bits 4 --group-size 128 --asymmetric --out {out} --overwrite "
    "&& lowbit eval {out} --reference reference-lm"
)
API_EXAMPLE = """
import lowbit
from lowbit.algorithms import AWQ, GPTQ

result = lowbit.quantize(
    "reference-lm",
    [
        AWQ(format="int4", group_size=128, symmetric=False),
        GPTQ(format="int4", group_size=128, symmetric=False, act_order=True),
    ],
    calibration="builtin",
    n_samples=128,
    seq_len=256,
    seed=0,
)
print(result.report.to_dict()["totals"])
result.save("{out}", overwrite=True)
"""


def run(command: str, env: dict | None = None) -> tuple[float, float, int]:
    """Wall and CPU seconds of a shell command (its children's rusage), and its exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, shell=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    return wall, cpu, proc.returncode


def kl_of(out: Path) -> dict:
    res = subprocess.run(
        ["lowbit", "eval", str(out), "--reference", "reference-lm", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    d = json.loads(res.stdout)
    return {"ppl": d["ppl"], "KL": d["kl"], "top-1 agree": d["top1_agreement"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--before", type=Path, default=None, help="an older lowbit source tree (its src/) to compare")
    p.add_argument("--methods", default="rtn,gptq,awq,awq+gptq")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lowbit-ttr-"))
    jobs: dict[str, tuple[str, dict | None, Path | None]] = {}
    for method in args.methods.split(","):
        out = work / f"now-{method}"
        jobs[f"quantize --method {method}"] = (QUANTIZE.format(method=method, out=out), None, out)
        if args.before is not None:
            old = work / f"before-{method}"
            env = {**os.environ, "PYTHONPATH": str(args.before)}
            cmd = f"{sys.executable} -m lowbit " + QUANTIZE.format(method=method, out=old).removeprefix("lowbit ")
            jobs[f"quantize --method {method} (before)"] = (cmd, env, old)
    jobs["README main job (quantize + eval)"] = (README_JOB.format(out=work / "readme"), None, None)
    script = work / "api_example.py"
    script.write_text(API_EXAMPLE.format(out=work / "api"))
    jobs["README Python API example"] = (f"{sys.executable} {script}", None, None)
    jobs["lowbit --help"] = ("lowbit --help", None, None)
    jobs["lowbit --version"] = ("lowbit --version", None, None)

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    for r in range(args.repeats):
        for name, (cmd, env, _) in jobs.items():
            wall, cpu, status = run(cmd, env)
            if status != 0:
                raise SystemExit(f"{name} failed ({status})")
            times[name].append((wall, cpu))
            print(f"round {r + 1}: {name}: wall {wall:.1f}s CPU {cpu:.1f}s", flush=True)
    rows = []
    for name, (_cmd, _, out) in jobs.items():
        walls, cpus = [t[0] for t in times[name]], [t[1] for t in times[name]]
        row = {
            "command": name,
            "wall s": f"{statistics.median(walls):.2f} [{min(walls):.2f}, {max(walls):.2f}]",
            "CPU s": f"{statistics.median(cpus):.1f} [{min(cpus):.1f}, {max(cpus):.1f}]",
        }
        if out is not None:
            row.update(kl_of(out))
        rows.append(row)
    body = (
        f"Calibration: the CLI defaults for reference-lm (128 x 256 tokens of the built-in text, batch 8). "
        f"Each command ran {args.repeats} times, round robin; median [min, max]. CPU = user + system seconds of "
        "the process and its threads. Quality: `lowbit eval OUT --reference reference-lm` (held-out text, "
        "context 256, stride 128).\n\n"
        + markdown_table(
            rows,
            ["command", "wall s", "CPU s", "ppl", "KL", "top-1 agree"],
            {"ppl": ".3f", "KL": ".2e", "top-1 agree": ".4f"},
        )
    )
    write_result("time_to_result", "Time to result on reference-lm (CLI)", body, {"rows": rows, "times": times})


if __name__ == "__main__":
    main()
