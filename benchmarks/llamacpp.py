"""lowbit's GGUF files against llama.cpp's own quantizer, scored by llama.cpp's own perplexity tool.

    python benchmarks/llamacpp.py --tools LLAMA_CPP/build/bin [--chunks 100]

Needs llama.cpp's ``llama-quantize``, ``llama-perplexity`` and ``llama-imatrix`` (built from the
``llama-cpp-python`` sdist, which vendors llama.cpp; not part of lowbit's tests). On reference-lm:

1. lowbit writes the full-precision model as an F16 GGUF (``lowbit export``); ``llama-perplexity``
   saves its logits on the held-out text (``--kl-divergence-base``) and scores every file below
   against them: perplexity, mean KL divergence, and how often the top token agrees.
2. llama.cpp quantizes that F16 file with ``llama-quantize``, with and without an importance matrix
   (``llama-imatrix`` on lowbit's built-in calibration text): its standard mixtures (Q4_K_M keeps
   some tensors in Q6_K, Q2_K some in Q3_K/Q4_K, the output matrix in Q6_K) and ``--pure`` files
   where every linear has the one type and embeddings and output stay F16, as in lowbit's files.
3. lowbit quantizes the original with GPTQ (and AWQ then GPTQ) straight onto the same llama.cpp grid
   (``--format q4_k`` ...) and writes the GGUF (``--save-format gguf``), 128 x 256 calibration tokens.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import markdown_table, write_result

from lowbit.calibration import builtin_text_path

TYPES = ("q4_0", "q4_k", "q3_k", "q2_k")
MIXTURES = {"q4_0": "Q4_0", "q4_k": "Q4_K_M", "q3_k": "Q3_K_M", "q2_k": "Q2_K"}


def sh(cmd: list[str], timeout: int = 3600) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def kld(tools: Path, model: Path, base: Path, chunks: int) -> dict:
    """llama.cpp's scores of ``model`` against the saved F16 logits (retried if its log lost the summary)."""
    for _ in range(3):
        out = sh([str(tools / "llama-perplexity"), "-m", str(model), "-c", "256", "-b", "256", "--chunks", str(chunks),
                  "--kl-divergence-base", str(base), "--kl-divergence"])  # fmt: skip
        found = {
            key: re.search(pattern, out)
            for key, pattern in (
                ("ppl", r"Mean PPL\(Q\)\s*:\s*([\d.]+)"),
                ("kld", r"Mean\s+KLD:\s*([-\d.e]+)"),
                ("top1", r"Same top p:\s*([\d.]+)"),
            )
        }
        if all(found.values()):
            return {k: float(m.group(1)) for k, m in found.items()}
    raise SystemExit(f"llama-perplexity printed no summary for {model}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tools", type=Path, required=True, help="llama.cpp's build/bin")
    p.add_argument("--chunks", type=int, default=100, help="256-token chunks of the held-out text scored")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--types", default=",".join(TYPES))
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    heldout, calibration = builtin_text_path("heldout"), builtin_text_path("calibration")
    lowbit = [sys.executable, "-m", "lowbit"]

    f16, base = work / "f16.gguf", work / "base.kld"
    sh([*lowbit, "export", "reference-lm", "--to", "gguf", "--out", str(f16), "--overwrite"])
    out = sh([str(args.tools / "llama-perplexity"), "-m", str(f16), "-f", str(heldout), "-c", "256", "-b", "256",
              "--chunks", str(args.chunks), "--kl-divergence-base", str(base)])  # fmt: skip
    f16_ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", out).group(1))
    imatrix = work / "imatrix.gguf"
    sh([str(args.tools / "llama-imatrix"), "-m", str(f16), "-f", str(calibration), "-c", "256", "-b", "256",
        "--chunks", "128", "-o", str(imatrix), "--no-ppl"])  # fmt: skip

    rows = [
        {
            "tool": "F16",
            "file": "f16",
            "size MiB": f16.stat().st_size / 2**20,
            "ppl": f16_ppl,
            "kld": 0.0,
            "top1": 100.0,
            "seconds": None,
        }
    ]

    def score(tool: str, label: str, path: Path, seconds: float) -> None:
        rows.append(
            {
                "tool": tool,
                "file": label,
                "size MiB": path.stat().st_size / 2**20,
                **kld(args.tools, path, base, args.chunks),
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)

    for t in types:
        for pure in (False, True):
            for imat in (False, True):
                name = f"{MIXTURES[t]}{' --pure' if pure else ''}{' imatrix' if imat else ''}"
                path = work / f"llamacpp-{t}-{'pure' if pure else 'mix'}-{'imat' if imat else 'plain'}.gguf"
                cmd = [str(args.tools / "llama-quantize")]
                if imat:
                    cmd += ["--imatrix", str(imatrix)]
                if pure:
                    cmd += ["--pure", "--output-tensor-type", "f16", "--token-embedding-type", "f16"]
                start = time.perf_counter()
                sh([*cmd, str(f16), str(path), MIXTURES[t], "2"])  # --pure: every matrix the mixture's base type
                score("llama.cpp", name, path, time.perf_counter() - start)
        for method in ("gptq", "awq+gptq"):
            out_dir = work / f"lowbit-{method}-{t}"
            start = time.perf_counter()
            sh([*lowbit, "quantize", "reference-lm", "--method", method, "--format", t, "--save-format", "gguf",
                "--out", str(out_dir), "--overwrite"])  # fmt: skip
            score("lowbit", f"{method} -> {t.upper()}", out_dir / "model.gguf", time.perf_counter() - start)

    body = (
        f"Held-out text: {args.chunks} chunks of 256 tokens (llama.cpp scores the second half of each chunk); "
        "KL divergence and top-token agreement against the F16 file's logits. llama.cpp's importance matrix: "
        "`llama-imatrix` on lowbit's built-in calibration text (128 chunks of 256). lowbit: 128 x 256 tokens of the "
        "same text. `pure`: every linear in the one type, embeddings and output F16 (lowbit's files likewise); "
        "without it, llama.cpp's standard mixture (e.g. Q4_K_M: attn_v/ffn_down of some layers in Q6_K, output "
        "Q6_K). Seconds: the whole quantization command (lowbit's includes its calibration, sanity check and "
        "writing).\n\n"
        + markdown_table(
            rows,
            ["tool", "file", "size MiB", "ppl", "kld", "top1", "seconds"],
            {"size MiB": ".2f", "ppl": ".3f", "kld": ".5f", "top1": ".2f", "seconds": ".1f"},
        )
    )
    write_result("llamacpp_reference_lm", "lowbit vs llama.cpp's quantizer, scored by llama.cpp", body, {"rows": rows})


if __name__ == "__main__":
    main()
