"""Pack b-bit codes (1 <= b <= 8) densely into uint8 or int32 words, and back.

Codes are laid out little-endian: code ``i`` of a row occupies stream bits ``[i*b, (i+1)*b)``,
and stream bit ``k`` is bit ``k % W`` of word ``k // W`` (``W`` = 8 or 32). For 4-bit codes in
int32 this is the layout GPTQ and compressed-tensors use (eight codes per word, first code in the
lowest nibble). When ``b`` divides ``W`` codes are shifted in whole; otherwise (3, 5, 6, 7 bits)
the row is expanded to a bit stream. Both paths are vectorised over a chunk of rows at a time.
"""

from __future__ import annotations

import math
import sys

import torch

_WORD_BITS = {torch.uint8: 8, torch.int32: 32}


def packed_length(n_codes: int, bits: int, storage: torch.dtype = torch.uint8) -> int:
    """Words needed for ``n_codes`` codes of ``bits`` bits (the last word zero-padded)."""
    return math.ceil(n_codes * bits / _word_bits(storage))


def _word_bits(storage: torch.dtype) -> int:
    if storage not in _WORD_BITS:
        raise ValueError(f"storage must be torch.uint8 or torch.int32, got {storage}")
    return _WORD_BITS[storage]


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")


#: bytes of int64 temporaries one chunk of rows may take while packing or unpacking (a 1.1B
#: model's down_proj as int64 codes is 92 MB, and the shifts take two more copies)
_CHUNK_BYTES = 16 * 2**20


def _row_chunks(rows: int, temporaries_per_row: int) -> range:
    step = max(1, _CHUNK_BYTES // max(temporaries_per_row, 1))
    return range(0, rows, step) if rows else range(0)


def pack(codes: torch.Tensor, bits: int, storage: torch.dtype = torch.uint8) -> torch.Tensor:
    """Pack the last dimension of ``codes`` (values in ``[0, 2**bits)``) into words.

    Returns a tensor of shape ``codes.shape[:-1] + (packed_length(n, bits, storage),)``. Rows are
    packed a chunk at a time, so the temporaries stay small whatever the tensor's size.
    """
    _check_bits(bits)
    width = _word_bits(storage)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    rows = codes.reshape(-1, n)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    words = packed_length(n, bits, storage)
    out = torch.empty(rows.shape[0], words, dtype=storage, device=codes.device)
    per_row = 8 * 3 * (n + width) * (1 if width % bits == 0 else bits)
    chunks = _row_chunks(rows.shape[0], per_row)
    for start in chunks:
        c = rows[start : start + chunks.step].to(torch.int64)
        if width % bits == 0:
            per_word = width // bits
            c = torch.nn.functional.pad(c, (0, words * per_word - n))
            shifts = torch.arange(per_word, device=c.device, dtype=torch.int64) * bits
            packed = (c.view(-1, words, per_word) << shifts).sum(-1)
        else:
            stream = (c.unsqueeze(-1) >> torch.arange(bits, device=c.device)) & 1  # [rows, n, bits]
            stream = stream.reshape(c.shape[0], n * bits)
            stream = torch.nn.functional.pad(stream, (0, words * width - n * bits))
            shifts = torch.arange(width, device=c.device, dtype=torch.int64)
            packed = (stream.view(-1, words, width) << shifts).sum(-1)
        out[start : start + chunks.step] = _to_storage(packed, storage)
    return out.reshape(*lead, words)


def unpack(packed: torch.Tensor, bits: int, n_codes: int, storage: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n_codes`` codes of each row, as uint8."""
    _check_bits(bits)
    storage = storage or packed.dtype
    width = _word_bits(storage)
    words = packed.shape[-1]
    if words != packed_length(n_codes, bits, storage):
        raise ValueError(f"{words} words cannot hold exactly {n_codes} codes of {bits} bits")
    lead = packed.shape[:-1]
    if 8 % bits == 0 and packed.dtype == storage and sys.byteorder == "little":
        # Codes never straddle a byte: read the words' bytes (low byte first, as the codes are laid out)
        # with uint8 temporaries, an eighth of the int64 path's memory traffic.
        per_byte = 8 // bits
        b = packed.reshape(-1, words).contiguous().view(torch.uint8)
        shifts = torch.arange(per_byte, device=b.device, dtype=torch.uint8) * bits
        codes = (b.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(b.shape[0], -1)[:, :n_codes].reshape(*lead, n_codes)
    all_words = packed.reshape(-1, words)
    out = torch.empty(all_words.shape[0], n_codes, dtype=torch.uint8, device=packed.device)
    chunks = _row_chunks(all_words.shape[0], 8 * 2 * words * width)
    for start in chunks:
        w = _from_storage(all_words[start : start + chunks.step], storage)
        if width % bits == 0:
            per_word = width // bits
            shifts = torch.arange(per_word, device=w.device, dtype=torch.int64) * bits
            codes = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
            codes = codes.reshape(w.shape[0], words * per_word)[:, :n_codes]
        else:
            stream = (w.unsqueeze(-1) >> torch.arange(width, device=w.device)) & 1
            stream = stream.reshape(w.shape[0], words * width)[:, : n_codes * bits].view(-1, n_codes, bits)
            codes = (stream << torch.arange(bits, device=w.device)).sum(-1)
        out[start : start + chunks.step] = codes
    return out.reshape(*lead, n_codes)


def _to_storage(words: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    if storage == torch.int32:
        # Reinterpret the unsigned 32-bit value as a signed int32 (two's complement).
        words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(storage)


def _from_storage(words: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    w = words.to(torch.int64)
    if storage == torch.int32:
        w = w & 0xFFFFFFFF
    return w
