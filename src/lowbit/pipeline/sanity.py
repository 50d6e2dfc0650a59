"""The check before saving: does the quantized model still behave like the original?

A few calibration samples are held back. The pipeline carries them through every block twice:
through the full-precision block (before the recipe runs on it) and through the quantized block
(after). At the end both go through the final norm and head, and the next-token distributions
are compared: mean KL divergence, top-1 agreement, NaN, and collapse to one repeated token.
This needs no second copy of the model and works when blocks are streamed from disk.

Besides, both models continue the start of the first held-back sample greedily for a few tokens
(:mod:`.generation`): a quantized model that only repeats one token where the original does not
fails the check.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .generation import generate_with_store, logits_of, prompt_of, repeats_one_token
from .tensors import linear_in
from .unit import BlockInputs

log = logging.getLogger(__name__)


@dataclass
class SanityReport:
    tokens: int
    kl: float
    top1_agreement: float
    nonfinite: bool
    top_token_share: float
    top_token_share_reference: float
    collapsed: bool
    prompt_ids: list[int] | None = None
    generated_ids: list[int] | None = None
    generated_ids_reference: list[int] | None = None
    prompt: str | None = None
    generation: str | None = None
    generation_reference: str | None = None
    passed: bool = True
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def decode(self, tokenizer) -> None:
        """Fill in the generations as text."""
        if tokenizer is None:
            return
        if self.prompt_ids is not None:
            self.prompt = tokenizer.decode(self.prompt_ids)
        if self.generated_ids is not None:
            self.generation = tokenizer.decode(self.generated_ids)
        if self.generated_ids_reference is not None:
            self.generation_reference = tokenizer.decode(self.generated_ids_reference)


@dataclass
class SanityThresholds:
    max_kl: float = 1.0
    collapse_share: float = 0.9  # most frequent predicted token above this share ...
    reference_share: float = 0.5  # ... while the original stays below this one


class SanityCheckFailed(RuntimeError):
    def __init__(self, report: SanityReport):
        self.report = report
        super().__init__(
            f"sanity check failed: {report.reason} (KL {report.kl:.3f}, top-1 agreement {report.top1_agreement:.3f}, "
            f"most frequent predicted token share {report.top_token_share:.2f} vs {report.top_token_share_reference:.2f} "
            "for the original); nothing was saved. Use --force to save anyway."
        )


class SanityTracker:
    """Held-back samples, carried through the full-precision and the quantized blocks."""

    def __init__(self, held_back: BlockInputs):
        self.fp = held_back
        self.q = held_back

    def transform(self, fn) -> None:
        """Apply a model transform's change to the samples' hidden states (both streams)."""
        self.fp = self.fp.with_hidden([fn(h) for h in self.fp.hidden])
        self.q = self.fp

    def before(self, unit) -> None:
        self._pending_fp = unit.forward_inputs(self.fp)

    def after(self, unit) -> None:
        self.q = self.q.with_hidden(unit.forward_inputs(self.q))
        self.fp = self.fp.with_hidden(self._pending_fp)

    #: the original model's greedy continuation of the prompt (computed before any block changes)
    generated_reference: list[int] | None = None

    def state(self) -> dict[str, list[torch.Tensor]]:
        state = {"sanity_fp": self.fp.hidden, "sanity_q": self.q.hidden}
        if self.generated_reference is not None:
            state["sanity_generated_reference"] = [torch.tensor(self.generated_reference, dtype=torch.long)]
        return state

    def restore(self, activations: dict[str, list[torch.Tensor]]) -> None:
        self.fp = self.fp.with_hidden(activations["sanity_fp"])
        self.q = self.q.with_hidden(activations["sanity_q"])
        if "sanity_generated_reference" in activations:
            self.generated_reference = activations["sanity_generated_reference"][0].tolist()

    @torch.no_grad()
    def report(
        self,
        head,
        thresholds: SanityThresholds,
        generated: list[int] | None = None,
        generation_nonfinite: bool = False,
        prompt: list[int] | None = None,
    ) -> SanityReport:
        """``head`` maps final hidden states to logits (final norm + output projection);
        ``generated`` is the quantized model's greedy continuation of the same prompt as
        :attr:`generated_reference`."""
        kl = agree = count = 0.0
        nonfinite = False
        q_top, fp_top = [], []
        for hq_all, hf_all in zip(self.q.hidden, self.fp.hidden):
            # a few positions at a time: logits over a large vocabulary are big
            for hq, hf in zip(hq_all.split(64, dim=-2), hf_all.split(64, dim=-2)):
                logits_q = head(hq).float()
                lq = torch.log_softmax(logits_q, -1).reshape(-1, logits_q.shape[-1])
                del logits_q
                lf = torch.log_softmax(head(hf).float(), -1).reshape(lq.shape)
                if not torch.isfinite(lq).all():
                    nonfinite = True
                    continue
                kl += F.kl_div(lq, lf, log_target=True, reduction="sum").item()
                agree += (lq.argmax(-1) == lf.argmax(-1)).sum().item()
                count += lq.shape[0]
                q_top.append(lq.argmax(-1))
                fp_top.append(lf.argmax(-1))
        share_q = _top_share(q_top)
        share_fp = _top_share(fp_top)
        rep = SanityReport(
            tokens=int(count),
            kl=kl / count if count else float("nan"),
            top1_agreement=agree / count if count else 0.0,
            nonfinite=nonfinite,
            top_token_share=share_q,
            top_token_share_reference=share_fp,
            collapsed=share_q > thresholds.collapse_share and share_fp < thresholds.reference_share,
            prompt_ids=prompt,
            generated_ids=generated,
            generated_ids_reference=self.generated_reference,
        )
        rep.nonfinite = rep.nonfinite or generation_nonfinite
        repeats = (
            generated is not None
            and self.generated_reference is not None
            and repeats_one_token(generated)
            and not repeats_one_token(self.generated_reference)
        )
        if rep.nonfinite:
            rep.passed, rep.reason = False, "the quantized model produces NaN/Inf"
        elif rep.collapsed:
            rep.passed, rep.reason = False, "the quantized model predicts almost only one token"
        elif repeats:
            rep.collapsed = True
            rep.passed, rep.reason = False, "the quantized model's greedy generation repeats one token"
        elif rep.kl > thresholds.max_kl:
            rep.passed, rep.reason = False, f"KL divergence above {thresholds.max_kl}"
        return rep


def final_report(
    model, adapter, sanity: SanityTracker, held_back, options, store, generate: bool, keep_head: bool
) -> SanityReport:
    """Compare the quantized model with the original on the held-back samples, and continue the
    prompt greedily with the quantized model (``keep_head``: a quantized head exists only in memory)."""
    generated, nonfinite = None, False
    if generate and sanity.generated_reference is not None:
        # A quantized head stays in memory, and the embeddings join it.
        if keep_head:
            store.load_outside(adapter)
        else:
            store.release_outside(adapter)
        generated, nonfinite = generate_with_store(
            model, adapter, held_back, options, store, output=True, swap_outside=not keep_head
        )
        log.info("quantized model's greedy continuation: %s", generated)
        store.load_head(adapter)
    prompt = prompt_of(held_back).tolist() if generated is not None else None
    _, norm = adapter.final_norm()
    _, head = adapter.lm_head()
    head_fn = logits_of(norm, head)
    weight = getattr(head, "weight", None)
    if isinstance(head, nn.Linear) and weight is not None and weight.device.type != "meta":
        dtype = options.arithmetic_dtype(weight.dtype, weight.device)
        if dtype != weight.dtype:
            head_fn = _upcast_head(norm, head, dtype)
    return sanity.report(head_fn, options.sanity, generated, nonfinite, prompt)


def _upcast_head(norm: nn.Module | None, head: nn.Linear, dtype: torch.dtype, budget: int = 64 * 2**20):
    """The head's logits computed in ``dtype``: the head cast once when that copy fits ``budget``
    bytes, else a slice of the vocabulary at a time (each slice within ``budget``) on every call.
    A 32k vocabulary at hidden 2048 is 0.25 GiB in float32: cast whole, it set a streaming run's
    peak; the few calls of the final check each cast it again in slices instead."""
    w, b = head.weight, head.bias
    whole = w.numel() * torch.empty((), dtype=dtype).element_size() <= budget
    cast = (w.to(dtype), None if b is None else b.to(dtype)) if whole else None

    def logits(h: torch.Tensor) -> torch.Tensor:
        x = (norm(h) if norm is not None else h).to(dtype)
        return F.linear(x, *cast) if cast is not None else linear_in(x, w, b, dtype, budget)

    return logits


def _top_share(preds: list[torch.Tensor]) -> float:
    if not preds:
        return 1.0
    p = torch.cat(preds)
    return float(torch.bincount(p).max()) / len(p)
