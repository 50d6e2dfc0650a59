"""Sliding windows over a token stream: each token is scored once, with up to ``context`` tokens of history."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Window:
    input_ids: torch.Tensor  # [B, T]
    score_mask: torch.Tensor  # [B, T] True where the *next-token prediction at that position* is scored


def sliding_windows(ids: torch.Tensor, context: int, stride: int, batch_size: int) -> Iterator[Window]:
    """Windows of ``context`` tokens advancing by ``stride`` (but always overlapping by one token).

    Position ``t`` of a window predicts token ``t + 1``; the first window scores all its
    predictions, every later one only those of the tokens no earlier window scored, so every token
    after the first is scored exactly once (the standard "strided" perplexity).
    """
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and context ({context}), got {stride}")
    ids = ids.flatten()
    n = len(ids)
    if n < 2:
        raise ValueError("need at least 2 tokens to evaluate")
    spans = []
    scored_until = 1  # tokens [0, scored_until) are already predicted (token 0 never is)
    begin = 0
    while scored_until < n:
        end = min(begin + context, n)
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == n:
            break
        # at least one token of overlap, so the first new token has something to be predicted from
        begin = min(begin + stride, scored_until - 1)
    # Group equal-length windows so they batch; keep order.
    batch: list[tuple[int, int, int]] = []
    for span in spans:
        if (batch and (span[1] - span[0]) != (batch[0][1] - batch[0][0])) or len(batch) == batch_size:
            yield _make(ids, batch)
            batch = []
        batch.append(span)
    if batch:
        yield _make(ids, batch)


def _make(ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> Window:
    inputs = torch.stack([ids[b:e] for b, e, _ in spans])
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    for row, (b, e, first_new) in enumerate(spans):
        # prediction at position t targets token b + t + 1; score targets in [first_new, e)
        mask[row, max(0, first_new - b - 1) : e - b - 1] = True
    return Window(inputs, mask)
