"""Resuming an interrupted run from the last finished block.

After each block the run directory records which block is next, the activations that feed it
and the per-layer results so far. A run started again with the same command continues from
there; the fingerprint (model files, recipe, calibration data, options) must match, so that the
result is the same as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..export.shards import write_safetensors
from .unit import LayerResult

log = logging.getLogger(__name__)

RUN_FILE = "lowbit_run.json"
ACTIVATIONS_FILE = "lowbit_activations.safetensors"
VERSION = 1


class ResumeMismatch(ValueError):
    """The interrupted run was made with different inputs; resuming would mix two runs."""


@dataclass
class ResumePoint:
    next_block: int
    activations: dict[str, list[torch.Tensor]]
    results: dict[str, LayerResult]
    tokens_per_expert: dict[str, list[int]]


class RunDirectory:
    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._loaded: ResumePoint | None = None

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def load(self) -> ResumePoint | None:
        """The recorded progress (read once; later calls return the same point)."""
        if self._loaded is None:
            self._loaded = self._read()
        return self._loaded

    def _read(self) -> ResumePoint | None:
        if not self.run_file.exists():
            return None
        try:
            saved = json.loads(self.run_file.read_text())
        except json.JSONDecodeError:
            log.warning("%s is unreadable; starting over", self.run_file)
            return None
        changed = [
            k
            for k in sorted(set(saved.get("fingerprint", {})) | set(self.fingerprint))
            if saved.get("fingerprint", {}).get(k) != self.fingerprint.get(k)
        ]
        if changed:
            raise ResumeMismatch(
                f"cannot resume the interrupted run in {self.path}: {', '.join(changed)} changed since it started; "
                "delete that directory or pass --restart to start over"
            )
        tensors = load_file(str(self.path / ACTIVATIONS_FILE))
        activations: dict[str, list[torch.Tensor]] = {}
        for key in sorted(tensors, key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1]))):
            stream, _ = key.rsplit(".", 1)
            activations.setdefault(stream, []).append(tensors[key])
        results = {r["name"]: LayerResult(**{**r, "shape": tuple(r["shape"])}) for r in saved["results"]}
        log.info("resuming at block %d of the interrupted run in %s", saved["next_block"], self.path)
        return ResumePoint(saved["next_block"], activations, results, saved.get("tokens_per_expert", {}))

    def save(
        self,
        next_block: int,
        activations: dict[str, list[torch.Tensor]],
        results: dict[str, LayerResult],
        tokens_per_expert: dict[str, list[int]] | None = None,
    ) -> None:
        """Record progress; the activations file is replaced before the run file names it."""
        self.path.mkdir(parents=True, exist_ok=True)
        tensors = {f"{stream}.{i}": t.contiguous() for stream, ts in activations.items() for i, t in enumerate(ts)}
        tmp = self.path / (ACTIVATIONS_FILE + ".tmp")
        write_safetensors(tmp, tensors)
        os.replace(tmp, self.path / ACTIVATIONS_FILE)
        state = {
            "version": VERSION,
            "next_block": next_block,
            "fingerprint": self.fingerprint,
            "results": [asdict(r) for r in results.values()],
            "tokens_per_expert": tokens_per_expert or {},
        }
        tmp = self.run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.run_file)

    def cleanup(self) -> None:
        for name in (RUN_FILE, ACTIVATIONS_FILE):
            (self.path / name).unlink(missing_ok=True)
