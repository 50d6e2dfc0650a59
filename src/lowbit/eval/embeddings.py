"""Embedding fidelity of an encoder: how close its sentence embeddings stay to the original's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def builtin_sentences() -> list[str]:
    """The shipped sentence set (560 sentences: KJV verses, Python docstrings, held-out Shakespeare)."""
    path = Path(str(resources.files("lowbit") / "data" / "text" / "sentences.txt"))
    return [line for line in path.read_text().splitlines() if line.strip()]


@torch.inference_mode()
def encode(
    model: nn.Module,
    tokenizer,
    sentences: list[str],
    batch_size: int = 64,
    max_length: int = 256,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean-pooled sentence embeddings (as sentence-transformers computes them for MiniLM)."""
    device = next(model.parameters()).device
    chunks = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        chunks.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(chunks).cpu()


@dataclass
class EmbeddingFidelity:
    sentences: int
    cosine_mean: float
    cosine_min: float
    retrieval_top10_overlap: float

    def to_dict(self) -> dict:
        return asdict(self)


def retrieval_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of shared neighbours among each sentence's top-``k`` (itself excluded)."""
    k = min(k, len(a) - 1)
    sa, sb = a @ a.T, b @ b.T
    sa.fill_diagonal_(-float("inf"))
    sb.fill_diagonal_(-float("inf"))
    ta, tb = sa.topk(k, dim=-1).indices, sb.topk(k, dim=-1).indices
    shared = (ta.unsqueeze(-1) == tb.unsqueeze(-2)).any(-1).sum(-1).float()
    return float((shared / k).mean())


def embedding_fidelity(
    model: nn.Module, reference: nn.Module, tokenizer, sentences: list[str] | None = None, batch_size: int = 64
) -> EmbeddingFidelity:
    sentences = sentences if sentences is not None else builtin_sentences()
    if len(sentences) < 2:
        raise ValueError("embedding fidelity needs at least 2 sentences")
    a = encode(reference, tokenizer, sentences, batch_size)
    b = encode(model, tokenizer, sentences, batch_size)
    cos = (a * b).sum(-1)
    return EmbeddingFidelity(
        sentences=len(sentences),
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
        retrieval_top10_overlap=retrieval_overlap(a, b, 10),
    )
