"""The benchmark script runs end to end (a few steps), with the peer when installed and without it."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vq" / "bench_vq.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vq", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_skips_a_missing_peer_with_a_note(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "_peer_module", lambda: None)
    out = tmp_path / "r.json"
    assert bench.main(["--steps", "3", "--quantizers", "fsq", "pq", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "peer columns skipped" in printed and "MSE peer" not in printed
    result = json.loads(out.read_text())
    assert [r["quantizer"] for r in result["rows"]] == ["fsq", "pq"]
    assert all(r["bits_per_token"] == 8.0 and "peer_step_ms" not in r for r in result["rows"])


def test_benchmark_with_the_peer(bench, capsys):
    pytest.importorskip("vector_quantize_pytorch")
    assert bench.main(["--steps", "3", "--quantizers", "grvq", "bsq"]) == 0
    printed = capsys.readouterr().out
    assert "MSE peer" in printed and "| grvq | 8 |" in printed and "| bsq | 8 |" in printed


def test_benchmark_fsq_entropy_row_uses_the_peers_plain_fsq(bench, capsys):
    pytest.importorskip("vector_quantize_pytorch")
    assert bench.main(["--steps", "3", "--quantizers", "fsq+entropy"]) == 0
    assert "| fsq+entropy | 8 |" in capsys.readouterr().out
    layer = bench.peer_factory("fsq+entropy")().layer  # the peer has no entropy loss: its plain FSQ
    assert type(layer).__name__ == "FSQ" and layer._levels.tolist() == [4, 4, 4, 4]
