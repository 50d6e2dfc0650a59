"""Perplexity of a causal LM, and its divergence from a reference (full-precision) model.

Both stream over sliding windows: only one batch of logits is alive at a time, so memory does not
grow with the corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import builtin_text_path
from ..calibration.data import read_text_file
from ..pipeline.progress import ProgressReporter
from .windows import sliding_windows


@dataclass
class LanguageEval:
    tokens: int
    ppl: float
    ppl_reference: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    context: int = 0
    stride: int = 0

    def to_dict(self) -> dict:
        d = {"tokens": self.tokens, "ppl": self.ppl, "context": self.context, "stride": self.stride}
        if self.kl is not None:
            d.update(ppl_reference=self.ppl_reference, kl=self.kl, top1_agreement=self.top1_agreement)
        return d


def tokenize_text(
    tokenizer, text: str | None = None, path: str | None = None, max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids of ``text``, of the file ``path``, or of the built-in held-out text."""
    if text is None:
        source = Path(path or builtin_text_path("heldout"))
        try:
            text = read_text_file(source, "evaluation text")
        except OSError as exc:
            raise FileNotFoundError(f"cannot read evaluation text {source}: {exc.strerror}") from None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids


def default_context(model: nn.Module, cap: int = 512) -> int:
    """The evaluation window: ``cap`` tokens, or fewer if the model's context is shorter."""
    return min(cap, getattr(model.config, "max_position_embeddings", None) or cap)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate_language(
    model: nn.Module,
    input_ids: torch.Tensor,
    reference: nn.Module | None = None,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    kv_cache: Any = None,
) -> LanguageEval:
    """Perplexity of ``model`` on ``input_ids``; with ``reference``, also mean KL(reference || model)
    per scored token, top-1 agreement of next-token predictions, and the reference's perplexity.
    ``kv_cache``: a :class:`~lowbit.runtime.kv_cache.KVCacheScheme` the model's attention reads its
    keys and values through (each window in one forward pass; see that module for what it means).

    ``context`` defaults to 512 tokens or the model's maximum position if smaller; ``stride``
    to half the context.
    """
    context = context or default_context(model)
    stride = stride or max(1, context // 2)
    nll = nll_ref = kl = 0.0
    agree = count = 0
    windows = list(sliding_windows(input_ids, context, stride, batch_size))
    with ProgressReporter(progress, total=len(windows), description="evaluating") as bar:
        for w in windows:
            logp = _log_probs(model, w.input_ids, kv_cache)
            targets = w.input_ids[:, 1:].to(logp.device)
            mask = w.score_mask[:, :-1].to(logp.device)
            lp = logp[:, :-1][mask]  # [n, V]
            tgt = targets[mask]
            nll += -lp.gather(-1, tgt[:, None]).sum().item()
            count += int(mask.sum())
            if reference is not None:
                ref = _log_probs(reference, w.input_ids).to(lp.device)[:, :-1][mask]
                nll_ref += -ref.gather(-1, tgt[:, None]).sum().item()
                kl += F.kl_div(lp, ref, log_target=True, reduction="sum").item()
                agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            bar.advance()
    result = LanguageEval(tokens=count, ppl=math.exp(nll / count), context=context, stride=stride)
    if reference is not None:
        result.ppl_reference = math.exp(nll_ref / count)
        result.kl = kl / count
        result.top1_agreement = agree / count
    return result


def _log_probs(model: nn.Module, ids: torch.Tensor, kv_cache: Any = None) -> torch.Tensor:
    if kv_cache is None:
        out = model(input_ids=ids.to(_device_of(model)), use_cache=False)
    else:
        from ..runtime.kv_cache import QuantizedKVCache

        out = model(input_ids=ids.to(_device_of(model)), past_key_values=QuantizedKVCache(kv_cache), use_cache=True)
    return torch.log_softmax(out.logits.float(), dim=-1)
