"""Reading tensors from safetensors checkpoints without memory-mapping them."""

import pytest
import torch
from safetensors.torch import save_file

from lowbit.models.lazy import SafetensorsCheckpoint
from lowbit.models.loading import ModelLoadError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(5, 7, generator=g).bfloat16(),
        "a.f32": torch.randn(3, generator=g),
        "b.f16": torch.randn(2, 2, 2, generator=g).half(),
        "b.i64": torch.arange(6).reshape(2, 3),
        "b.u8": torch.arange(10, dtype=torch.uint8),
        "c.bool": torch.tensor([True, False, True]),
        "c.f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "c.scalar": torch.tensor(2.5),
        "c.empty": torch.zeros(0, 4),
    }


def test_every_dtype_reads_back_bit_exact(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = SafetensorsCheckpoint(tmp_path).get_many(list(tensors))
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_a_truncated_shard_is_a_clear_error(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ModelLoadError, match="truncated"):
        ckpt.get_many(ckpt.keys())


def test_lowbit_writer_output_is_standard_safetensors(tmp_path):
    from safetensors.torch import load_file

    from lowbit.export.shards import write_safetensors

    tensors = _tensors()
    tensors["strided"] = torch.arange(12.0).reshape(3, 4).T  # not contiguous
    write_safetensors(tmp_path / "model.safetensors", tensors, metadata={"format": "pt"})
    for loaded in (
        load_file(str(tmp_path / "model.safetensors")),
        SafetensorsCheckpoint(tmp_path).get_many(list(tensors)),
    ):
        for name, t in tensors.items():
            assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
            assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
