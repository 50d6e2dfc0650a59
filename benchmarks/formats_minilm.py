"""Every number format on one real weight matrix (MiniLM), and the time to RTN-quantize all of MiniLM;
llama.cpp's block formats on a second weight whose rows split into their 256-element super-blocks.

python benchmarks/formats_minilm.py
"""

from __future__ import annotations

import time

import torch
from common import markdown_table, write_result

import lowbit
from lowbit.formats import Quantizer, make_format
from lowbit.models import load_model

LAYER = "encoder.layer.3.intermediate.dense"  # 1536 x 384, a real trained FFN weight

FORMATS = [
    ("int8 per-channel", "int8", {"group_size": -1}),
    ("int8 g128", "int8", {}),
    ("int4 sym g128", "int4", {}),
    ("int4 asym g128", "int4", {"symmetric": False}),
    ("int4 asym g128 mse-clip", "int4", {"symmetric": False, "clip": "mse"}),
    ("int3 asym g128", "int3", {"symmetric": False}),
    ("int2 asym g64", "int2", {"symmetric": False, "group_size": 64}),
    ("fp8 e4m3 per-channel", "fp8_e4m3", {}),
    ("fp8 e5m2 per-channel", "fp8_e5m2", {}),
    ("fp6 e3m2 g128", "fp6_e3m2", {}),
    ("fp6 e2m3 g128", "fp6_e2m3", {}),
    ("fp4 e2m1 g128", "fp4", {}),
    ("mxfp8", "mxfp8", {}),
    ("mxfp4", "mxfp4", {}),
    ("nvfp4", "nvfp4", {}),
    ("nf4 g64", "nf4", {}),
    ("ternary per-channel", "ternary", {}),
    ("binary per-channel", "binary", {}),
]

# llama.cpp's block formats need rows that split into 256-element super-blocks (384 does not)
GGML_LAYER = "encoder.layer.3.output.dense"  # 384 x 1536
GGML_FORMATS = ["q8_0", "q6_k", "q5_1", "q5_k", "q5_0", "q4_1", "q4_k", "q4_0", "q3_k", "q2_k"]
GGML_RULES = {"min-max": "minmax", "mse": "mse", "llama.cpp": "llama.cpp"}


def rel_error(q: Quantizer, weight: torch.Tensor) -> float:
    deq = q.dequantize(q.quantize(weight))
    return float((weight - deq).norm() / weight.norm())


def ggml_rows(weight: torch.Tensor) -> list[dict]:
    """Each llama.cpp format with lowbit's rules (min-max, MSE clip search) and llama.cpp's own."""
    rows = []
    for name in GGML_FORMATS:
        row = {"format": name, "bits/weight": Quantizer(make_format(name)).bits_per_weight(weight.shape)}
        for label, clip in GGML_RULES.items():
            row[f"rel. error {label}"] = rel_error(Quantizer(make_format(name, clip=clip)), weight)
        rows.append(row)
    return rows


def main() -> None:
    torch.manual_seed(0)
    loaded = load_model("minilm")
    modules = dict(loaded.model.named_modules())
    weight = modules[LAYER].weight.detach().float()
    ggml_weight = modules[GGML_LAYER].weight.detach().float()
    ggml = ggml_rows(ggml_weight)
    rows = []
    for label, name, kw in FORMATS:
        q = Quantizer(make_format(name, **kw))
        deq = q.dequantize(q.quantize(weight))
        rel = float((weight - deq).norm() / weight.norm())
        sqnr = float(10 * torch.log10(weight.pow(2).sum() / (weight - deq).pow(2).sum()))
        rows.append(
            {
                "format": label,
                "spec": q.spec.label(),
                "bits/weight": q.bits_per_weight(weight.shape),
                "rel. error": rel,
                "SQNR dB": sqnr,
            }
        )

    timings = []
    for _ in range(3):
        model = load_model("minilm").model
        start = time.perf_counter()
        res = lowbit.quantize(model, lowbit.RTN(format="int4", group_size=128))
        timings.append(time.perf_counter() - start)
    body = (
        f"Weight: `{LAYER}` of all-MiniLM-L6-v2, shape {tuple(weight.shape)}.\n\n"
        + markdown_table(
            rows,
            ["format", "spec", "bits/weight", "rel. error", "SQNR dB"],
            {"bits/weight": ".4f", "rel. error": ".4f", "SQNR dB": ".2f"},
        )
        + f"\n\nRTN INT4-g128 of all {len(res.report.layers)} linear layers of MiniLM ({res.report.quantized_params / 1e6:.2f}M weights): "
        + f"best of 3 runs {min(timings):.2f} s (runs: {', '.join(f'{t:.2f}' for t in timings)} s).\n"
        + f"\nllama.cpp's block formats on `{GGML_LAYER}`, shape {tuple(ggml_weight.shape)} (relative error of RTN "
        + "with lowbit's min-max and MSE rules and with llama.cpp's reference rule, `clip='llama.cpp'`):\n\n"
        + markdown_table(
            ggml,
            ["format", "bits/weight", *(f"rel. error {label}" for label in GGML_RULES)],
            {"bits/weight": ".4f", **{f"rel. error {label}": ".4f" for label in GGML_RULES}},
        )
    )
    write_result(
        "formats_minilm",
        "Number formats on a real MiniLM weight",
        body,
        {"formats": rows, "rtn_seconds": timings, "ggml_layer": GGML_LAYER, "ggml_formats": ggml},
    )


if __name__ == "__main__":
    main()
