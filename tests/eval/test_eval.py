import math

import pytest
import torch

from lowbit.eval import embedding_fidelity, evaluate_language, retrieval_overlap, sliding_windows
from tests.conftest import build_family


@pytest.mark.parametrize("n,context,stride", [(100, 16, 16), (100, 16, 5), (37, 10, 3), (10, 32, 8), (65, 16, 16)])
def test_sliding_windows_score_every_token_once(n, context, stride):
    ids = torch.arange(n)
    scored = []
    for w in sliding_windows(ids, context, stride, batch_size=3):
        assert w.input_ids.shape[1] <= context
        targets = w.input_ids[:, 1:][w.score_mask[:, :-1]]
        scored.extend(targets.tolist())
    assert sorted(scored) == list(range(1, n))


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride"):
        list(sliding_windows(torch.arange(10), 4, 5, 1))
    with pytest.raises(ValueError, match="context"):
        list(sliding_windows(torch.arange(10), 1, 1, 1))


def test_perplexity_matches_a_direct_computation():
    model = build_family("llama")
    ids = torch.randint(3, 128, (64,), generator=torch.Generator().manual_seed(0))
    res = evaluate_language(model, ids, context=64, stride=32, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits
    nll = -torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[1:, None]).mean()
    assert res.tokens == 63
    assert res.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    strided = evaluate_language(model, ids, context=16, stride=8, batch_size=3)
    assert strided.tokens == 63 and strided.ppl != res.ppl


def test_kl_and_agreement():
    model = build_family("llama", seed=0)
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(1))
    same = evaluate_language(model, ids, reference=model, context=64, stride=32)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.ppl == pytest.approx(same.ppl_reference)
    other = build_family("llama", seed=1)
    diff = evaluate_language(other, ids, reference=model, context=64, stride=32)
    assert diff.kl > 0.01 and diff.top1_agreement < 1.0


def test_retrieval_overlap():
    a = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    assert retrieval_overlap(a, a) == 1.0
    b = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    assert retrieval_overlap(a, b) < 0.5


def test_embedding_fidelity_of_a_model_with_itself_and_a_perturbed_copy():
    from transformers import AutoTokenizer

    from lowbit.models import resolve_model_path

    model = build_family("bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    sentences = ["the cat sat", "a dog ran far away", "numbers are fun", "quantization keeps models small"]
    model.config.vocab_size = tokenizer.vocab_size
    model.resize_token_embeddings(tokenizer.vocab_size)
    same = embedding_fidelity(model, model, tokenizer, sentences)
    assert same.cosine_min == pytest.approx(1.0, abs=1e-5)
    import copy

    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    res = embedding_fidelity(noisy, model, tokenizer, sentences)
    assert res.cosine_min < 1.0 and res.cosine_min <= res.cosine_mean


def test_builtin_sentence_set_is_large_and_varied():
    from lowbit.eval import builtin_sentences

    s = builtin_sentences()
    assert len(s) >= 500 and len(set(s)) == len(s)


class _Bigram(torch.nn.Module):
    """A "language model" whose next-token distribution depends only on the current token: a table of
    hand-made probabilities (so KL and perplexity can be computed by hand)."""

    def __init__(self, probs):
        super().__init__()
        self.log_table = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log(), requires_grad=False)
        self.config = type("Config", (), {"max_position_embeddings": 64})()

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.log_table[input_ids]})()


def test_kl_perplexity_and_agreement_equal_their_formulas_on_hand_made_distributions():
    ref_probs = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]
    q_probs = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.4, 0.35, 0.25]]
    ids = torch.tensor([0, 1, 2, 2, 0, 1, 1, 0, 2, 1, 0, 0])
    res = evaluate_language(_Bigram(q_probs), ids, reference=_Bigram(ref_probs), context=12, stride=6)

    pairs = list(zip(ids[:-1].tolist(), ids[1:].tolist()))
    kl = sum(p * math.log(p / q) for a, _ in pairs for p, q in zip(ref_probs[a], q_probs[a])) / len(pairs)
    nll = -sum(math.log(q_probs[a][b]) for a, b in pairs) / len(pairs)
    nll_ref = -sum(math.log(ref_probs[a][b]) for a, b in pairs) / len(pairs)
    agree = sum(
        max(range(3), key=ref_probs[a].__getitem__) == max(range(3), key=q_probs[a].__getitem__) for a, _ in pairs
    ) / len(pairs)
    assert res.tokens == len(pairs)
    assert res.kl == pytest.approx(kl, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-6)
    assert res.ppl_reference == pytest.approx(math.exp(nll_ref), rel=1e-6)
    assert res.top1_agreement == pytest.approx(agree)
