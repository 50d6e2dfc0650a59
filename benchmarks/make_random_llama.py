"""Write a random-initialised Llama checkpoint (bf16 safetensors, sharded) of a given shape to disk.

    python benchmarks/make_random_llama.py --size 1b --out /tmp/llama-1b
    python benchmarks/make_random_llama.py --size 7b --out /tmp/llama-7b

Shapes: 1b = TinyLlama-1.1B (hidden 2048, 22 layers, intermediate 5632, 4 KV heads);
7b = Llama-2-7B (hidden 4096, 32 layers, intermediate 11008). The model is built one block at a
time on the meta device and written shard by shard, so writing a 13.5 GB checkpoint needs little
memory. The tokenizer is lowbit's reference tokenizer (vocabulary padded to 32000 ids).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SIZES = {
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit.models import resolve_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, dtype="bfloat16", **SIZES[args.size])
    config.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(args.seed)
    std = config.initializer_range
    weight_map, total = {}, 0
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, param in skeleton.named_parameters():
        key = f"block-{int(name.split('.')[2]):05d}" if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = param.shape
    for key, shapes in groups.items():
        tensors = {}
        for name, shape in shapes.items():
            if len(shape) == 1:  # norms
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * std
            tensors[name] = t.to(torch.bfloat16)
            total += tensors[name].numel() * 2
        file = f"model-{key}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        print(f"wrote {file}", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model_path("reference-lm")).save_pretrained(out)
    print(f"{sum(p.numel() for p in skeleton.parameters()) / 1e9:.2f}B parameters, {total / 2**30:.2f} GiB in {out}")


if __name__ == "__main__":
    main()
