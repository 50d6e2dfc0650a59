"""Evaluation that works on any model, quantized or not: perplexity, KL, embeddings, zero-shot."""

from .embeddings import EmbeddingFidelity, builtin_sentences, embedding_fidelity, encode, retrieval_overlap
from .language import LanguageEval, evaluate_language, tokenize_text
from .windows import sliding_windows
from .zero_shot import LMEvalUnavailable, run_lm_eval

__all__ = [
    "EmbeddingFidelity",
    "LMEvalUnavailable",
    "LanguageEval",
    "builtin_sentences",
    "embedding_fidelity",
    "encode",
    "evaluate_language",
    "retrieval_overlap",
    "run_lm_eval",
    "sliding_windows",
    "tokenize_text",
]
