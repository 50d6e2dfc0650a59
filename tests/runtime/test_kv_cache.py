"""The quantized KV cache: what stays exact, the error bound of what is quantized, real memory savings,
and generate() running through it."""

from __future__ import annotations

import pytest
import torch

from lowbit.runtime.kv_cache import KVCacheScheme, QuantizedKVCache
from tests.conftest import build_family, random_ids


def _feed(cache, k, v, steps):
    """The prompt in one call, then one token per call (as generate() does); the last returned states."""
    out = cache.update(k[..., : steps[0], :], v[..., : steps[0], :], 0)
    pos = steps[0]
    while pos < k.shape[-2]:
        out = cache.update(k[..., pos : pos + 1, :], v[..., pos : pos + 1, :], 0)
        pos += 1
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sinks_and_window_exact_the_rest_within_half_a_step(bits):
    gen = torch.Generator().manual_seed(bits)
    k = torch.randn(2, 3, 150, 16, generator=gen)
    k[..., 5] *= 30  # an outlier channel, as keys have
    v = torch.randn(2, 3, 150, 16, generator=gen)
    scheme = KVCacheScheme(bits=bits, group_size=16, residual=20, sinks=4)
    keys, values = _feed(QuantizedKVCache(scheme), k, v, steps=[70])
    assert keys.shape == k.shape and values.shape == v.shape
    settled = (150 - 4 - 20) // 16 * 16  # whole groups older than the window
    exact = torch.cat([torch.arange(4), torch.arange(4 + settled, 150)])
    assert torch.equal(keys[..., exact, :], k[..., exact, :])
    assert torch.equal(values[..., exact, :], v[..., exact, :])
    levels = 2**bits - 1
    for group in range(settled // 16):
        sl = slice(4 + 16 * group, 4 + 16 * (group + 1))
        # keys: one range per channel over the group's tokens; values: one per token
        k_range = k[..., sl, :].amax(-2, keepdim=True).clamp(min=0) - k[..., sl, :].amin(-2, keepdim=True).clamp(max=0)
        v_range = v[..., sl, :].amax(-1, keepdim=True).clamp(min=0) - v[..., sl, :].amin(-1, keepdim=True).clamp(max=0)
        assert ((keys[..., sl, :] - k[..., sl, :]).abs() <= k_range / levels * 0.5 + 1e-3 * k_range).all()
        assert ((values[..., sl, :] - v[..., sl, :]).abs() <= v_range / levels * 0.5 + 1e-3 * v_range).all()
    if bits <= 4:
        assert not torch.equal(keys, k)


def test_packed_storage_is_smaller_by_the_bits():
    k = torch.randn(1, 2, 512, 64, dtype=torch.float16)
    cache = QuantizedKVCache(KVCacheScheme(bits=4, group_size=32, residual=0))
    cache.update(k, k.clone(), 0)
    fp16 = 2 * k.numel() * 2
    assert cache.nbytes() < 0.3 * fp16  # 4-bit codes plus fp16 scales and zero-points
    per_token = KVCacheScheme(bits=4, group_size=32, residual=0).bytes_per_token(1, 2, 64)
    assert cache.nbytes() == pytest.approx(per_token * 512, rel=0.01)


def test_generate_runs_through_the_cache():
    model = build_family("llama").float()
    ids = random_ids(1, 40, vocab=model.config.vocab_size)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=12, do_sample=False)
        cache = QuantizedKVCache(KVCacheScheme(bits=8, group_size=8, residual=8))
        quant = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == 40 + 12 - 1  # the last token is never fed back
    assert cache.layers[0]._key_groups, "nothing was quantized"
    assert torch.equal(quant, plain)  # 8-bit keys and values do not change a tiny model's greedy choices


def test_bad_schemes():
    with pytest.raises(ValueError, match="bits"):
        KVCacheScheme(bits=5)
    with pytest.raises(ValueError, match="value_group_size"):
        KVCacheScheme(value_group_size=0)
