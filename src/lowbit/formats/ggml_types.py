"""llama.cpp's block formats (ggml types) as lowbit format fields.

Pure data (no torch, no gguf): the spec validator, the presets and the block packer all read it.
Each type is identified by the fields that fix its grid; a spec with exactly those fields *is*
that type, whatever it is called, so it can be packed into ggml blocks losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The fields that decide the grid (and so the ggml type); the rest (clip rule, name) only
# decide how parameters are chosen or shown.
STRUCTURE_FIELDS = (
    "kind",
    "bits",
    "symmetric",
    "granularity",
    "group_size",
    "scale_dtype",
    "zero_dtype",
    "zero_style",
    "super_block",
    "global_scale",
)

_DEFAULTS = {
    "kind": "int",
    "symmetric": True,
    "granularity": "group",
    "scale_dtype": "float16",
    "zero_dtype": "float16",
    "zero_style": "code",
    "super_block": None,
    "global_scale": False,
}


@dataclass(frozen=True)
class GGMLType:
    """One ggml block type.

    Attributes:
        name: lowbit's preset name (``q4_k``); ggml's is the upper-case form.
        type_id: ggml's ``enum ggml_type`` value (``gguf.GGMLQuantizationType``).
        block: elements per block along a row (32, or 256 for the K-quants).
        block_bytes: bytes per block.
        fields: the :class:`FormatSpec` fields of its grid.
    """

    name: str
    type_id: int
    block: int
    block_bytes: int
    fields: dict[str, Any]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


def _t(name: str, type_id: int, block: int, block_bytes: int, **fields: Any) -> GGMLType:
    return GGMLType(name, type_id, block, block_bytes, {**_DEFAULTS, **fields})


_ASYM_MIN = {"symmetric": False, "zero_style": "min"}

GGML_TYPES: dict[str, GGMLType] = {
    t.name: t
    for t in (
        # legacy types: one fp16 scale (and fp16 min) per 32 elements
        _t("q4_0", 2, 32, 18, bits=4, group_size=32),
        _t("q4_1", 3, 32, 20, bits=4, group_size=32, **_ASYM_MIN),
        _t("q5_0", 6, 32, 22, bits=5, group_size=32),
        _t("q5_1", 7, 32, 24, bits=5, group_size=32, **_ASYM_MIN),
        _t("q8_0", 8, 32, 34, bits=8, group_size=32),
        # K-quants: integer sub-block scales (and mins) times an fp16 super-scale per 256 elements
        _t(
            "q2_k",
            10,
            256,
            84,
            bits=2,
            group_size=16,
            super_block=256,
            scale_dtype="uint4",
            zero_dtype="uint4",
            **_ASYM_MIN,
        ),
        _t("q3_k", 11, 256, 110, bits=3, group_size=16, super_block=256, scale_dtype="int6"),
        _t(
            "q4_k",
            12,
            256,
            144,
            bits=4,
            group_size=32,
            super_block=256,
            scale_dtype="uint6",
            zero_dtype="uint6",
            **_ASYM_MIN,
        ),
        _t(
            "q5_k",
            13,
            256,
            176,
            bits=5,
            group_size=32,
            super_block=256,
            scale_dtype="uint6",
            zero_dtype="uint6",
            **_ASYM_MIN,
        ),
        _t("q6_k", 14, 256, 210, bits=6, group_size=16, super_block=256, scale_dtype="int8"),
    )
}


def ggml_type_of(fields: dict[str, Any]) -> GGMLType | None:
    """The ggml type whose grid a spec's fields (``FormatSpec.model_dump()``) describe, if any."""
    for t in GGML_TYPES.values():
        want = t.fields
        if all(
            fields.get(k) == want[k]
            for k in STRUCTURE_FIELDS
            # zero-points of symmetric formats are never stored
            if not (k == "zero_dtype" and want["symmetric"])
        ):
            return t
    return None
