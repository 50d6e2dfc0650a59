"""The lm-eval adapter, on a tiny local multiple-choice task (no download)."""

import json

import pytest
import torch
import transformers

lm_eval = pytest.importorskip("lm_eval")

from lowbit.eval import run_lm_eval  # noqa: E402
from lowbit.models import resolve_model_path  # noqa: E402

QUESTIONS = [
    ("The cat sat on the", ["mat", "moon", "ocean"], 0),
    ("One, two, three,", ["four", "blue", "apple"], 0),
    ("Good morning, my", ["lord", "stone", "seven"], 1),
    ("To be or not to", ["be", "fish", "run"], 2),
]


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "answer": a}) for q, c, a in QUESTIONS) + "\n")
    (tmp_path / "tiny_choice.yaml").write_text(
        f"""task: lowbit_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
    )
    return tmp_path


def test_lm_eval_scores_the_in_memory_model(task_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path("reference-lm"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    results = run_lm_eval(model, tokenizer, ["lowbit_tiny_choice"], include_path=task_dir, batch_size=2)
    acc = results["lowbit_tiny_choice"]["acc"]
    # the same choice rule computed directly from the model: highest total log-likelihood of the continuation
    correct = 0
    for question, choices, answer in QUESTIONS:
        scores = []
        ctx = tokenizer(question, add_special_tokens=False)["input_ids"]
        for choice in choices:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    assert acc == pytest.approx(correct / len(QUESTIONS))
