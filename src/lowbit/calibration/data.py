"""Calibration data: N token sequences of a fixed length, seeded, tokenised with the model's tokenizer."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """Calibration data is missing, too short or malformed."""


@dataclass
class CalibrationData:
    """``input_ids`` ``[N, T]`` (plus an attention mask where sequences are padded)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape[0] == 0:
            raise CalibrationError(
                f"calibration input_ids must be [samples, tokens] with samples > 0, got {tuple(self.input_ids.shape)}"
            )

    @property
    def n_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def describe(self) -> str:
        return f"{self.source}: {self.n_samples} x {self.seq_len} tokens"

    def tokens(self) -> int:
        if self.attention_mask is not None:
            return int(self.attention_mask.sum())
        return self.input_ids.numel()

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, self.n_samples, batch_size):
            batch = {"input_ids": self.input_ids[i : i + batch_size]}
            if self.attention_mask is not None:
                batch["attention_mask"] = self.attention_mask[i : i + batch_size]
            yield batch

    def split(self, n_holdout: int) -> tuple[CalibrationData, CalibrationData]:
        """The last ``n_holdout`` samples apart (e.g. for a sanity check), the rest for calibration."""
        if not 0 < n_holdout < self.n_samples:
            raise CalibrationError(f"cannot hold back {n_holdout} of {self.n_samples} samples")
        cut = self.n_samples - n_holdout
        mask = self.attention_mask
        return (
            CalibrationData(self.input_ids[:cut], None if mask is None else mask[:cut], self.source),
            CalibrationData(self.input_ids[cut:], None if mask is None else mask[cut:], self.source + ", held back"),
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes())
        if self.attention_mask is not None:
            h.update(self.attention_mask.to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]


def builtin_text_path(name: str = "calibration") -> Path:
    """Path of a text shipped with lowbit: ``calibration`` or ``heldout`` (Shakespeare, public domain)."""
    path = Path(str(resources.files("lowbit") / "data" / "text" / f"{name}.txt"))
    if not path.exists():
        raise CalibrationError(f"built-in text {name!r} is missing from the installation ({path})")
    return path


def from_text(
    text: str,
    tokenizer,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    source: str = "text",
    mode: str = "windows",
) -> CalibrationData:
    """Sample ``n_samples`` sequences of ``seq_len`` tokens from ``text``.

    ``mode="windows"`` (causal LMs): random windows of the whole token stream, seeded.
    ``mode="lines"`` (encoders): consecutive lines packed into sequences of at most ``seq_len``
    tokens with the tokenizer's special tokens, padded, then ``n_samples`` of them drawn, seeded.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    if mode == "lines":
        return _from_lines(text, tokenizer, n_samples, seq_len, gen, source)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if len(ids) < seq_len:
        raise CalibrationError(f"calibration text {source} has only {len(ids)} tokens; need at least seq_len={seq_len}")
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=gen)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return CalibrationData(windows, None, f"{source} (seed {seed})")


def _from_lines(
    text: str, tokenizer, n_samples: int, seq_len: int, gen: torch.Generator, source: str
) -> CalibrationData:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CalibrationError(f"calibration text {source} is empty")
    budget = seq_len - 2  # room for the special tokens
    chunks, current, used = [], [], 0
    for line in lines:
        n = len(tokenizer(line, add_special_tokens=False)["input_ids"])
        if current and used + n > budget:
            chunks.append(" ".join(current))
            current, used = [], 0
        current.append(line)
        used += n
    if current:
        chunks.append(" ".join(current))
    order = torch.randperm(len(chunks), generator=gen).tolist()
    picked = [chunks[i] for i in order[:n_samples]]
    if len(picked) < n_samples:
        log.warning("calibration text %s yields only %d sequences (asked for %d)", source, len(picked), n_samples)
    enc = tokenizer(picked, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return CalibrationData(enc["input_ids"], enc["attention_mask"], f"{source} (lines, padded)")


def from_file(path: str | Path, tokenizer, **kwargs) -> CalibrationData:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file {p} does not exist")
    return from_text(read_text_file(p, "calibration"), tokenizer, source=str(p), **kwargs)


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file; one that is not text (a binary file, another encoding) is refused: decoded
    with replacement characters it would still "calibrate", on garbage."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    share = bad / max(1, len(text))
    if share > 0.01:
        raise CalibrationError(
            f"{what} file {path} does not look like UTF-8 text ({share:.0%} of it is undecodable or NUL bytes)"
        )
    if bad:
        log.warning("%s file %s: %d undecodable characters replaced", what, path, bad)
    return text


def from_hf_dataset(
    name: str,
    tokenizer,
    split: str = "train",
    text_field: str = "text",
    config_name: str | None = None,
    max_chars: int = 20_000_000,
    **kwargs,
) -> CalibrationData:
    """Calibration from a Hugging Face dataset (needs the ``datasets`` package and access to it)."""
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError("calibration from a Hugging Face dataset needs `pip install datasets`") from exc
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # datasets raises many types for missing/unreachable data
        raise CalibrationError(f"could not load dataset {name!r} (split {split!r}): {exc}") from exc
    if text_field not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no field {text_field!r}; fields: {ds.column_names}")
    parts, size = [], 0
    for row in ds:
        parts.append(row[text_field])
        size += len(row[text_field])
        if size >= max_chars:
            break
    return from_text("\n\n".join(parts), tokenizer, source=f"dataset {name}", **kwargs)


def as_calibration(
    data,
    tokenizer=None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    mode: str = "windows",
) -> CalibrationData | None:
    """Turn what a user passes as calibration into :class:`CalibrationData`.

    Accepts ``None``, :class:`CalibrationData`, a ``[N, T]`` tensor of token ids, ``"builtin"``
    (the shipped calibration text), a path to a text file, ``"hf:NAME"`` or ``"hf:NAME:SPLIT"``
    for a Hugging Face dataset, or a list of strings.
    """
    if data is None or isinstance(data, CalibrationData):
        return data
    if isinstance(data, torch.Tensor):
        return CalibrationData(data.long(), None, "token tensor")
    kw = dict(n_samples=n_samples, seq_len=seq_len, seed=seed, mode=mode)
    if tokenizer is None:
        raise CalibrationError("text calibration data needs the model's tokenizer")
    if isinstance(data, (str, Path)):
        key = str(data)
        if key == "builtin":
            text = builtin_text_path("calibration").read_text(encoding="utf-8")
            return from_text(text, tokenizer, source="built-in calibration text (Macbeth, Much Ado)", **kw)
        if key.startswith("hf:"):
            parts = key[3:].split(":")
            return from_hf_dataset(parts[0], tokenizer, split=parts[1] if len(parts) > 1 else "train", **kw)
        return from_file(key, tokenizer, **kw)
    if isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        return from_text("\n".join(data), tokenizer, source="strings", **kw)
    raise CalibrationError(f"cannot use {type(data).__name__} as calibration data")
