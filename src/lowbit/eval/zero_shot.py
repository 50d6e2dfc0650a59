"""Zero-shot tasks through EleutherAI's lm-evaluation-harness (optional extra ``lowbit[lm-eval]``).

lowbit does not ship task data: users point ``include_path`` at their own task YAML files (or use
lm-eval's registered tasks where they have the datasets). The model is passed in memory, so a
fake-quantized model is evaluated exactly as lowbit produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


class LMEvalUnavailable(RuntimeError):
    """lm-eval is not installed."""


class LMEvalDataUnavailable(OSError):
    """A task's dataset cannot be loaded (e.g. no network to reach the hub)."""


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | Path | None = None,
    num_fewshot: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Run ``tasks`` and return ``{task: {metric: value}}``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise LMEvalUnavailable("zero-shot tasks need the optional extra: pip install 'lowbit[lm-eval]'") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    except (OSError, ConnectionError) as exc:  # the datasets hub client's errors are OSErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LMEvalDataUnavailable(
            f"lm-eval could not load the data of {', '.join(tasks)}: {first}. Without network, point "
            "--tasks-path (include_path) at task YAML files whose datasets are on this machine"
        ) from None
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("alias")
        }
    return results
