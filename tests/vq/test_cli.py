import json
from pathlib import Path

import pytest

import lowbit.vq.digits
from lowbit.cli import main


def test_vq_train_writes_png_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["vq-train", "--quantizer", "bsq", "--steps", "15", "--batch-size", "32", "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "metrics.json").read_text())
    assert printed == written
    assert written["quantizer"] == "bsq" and written["steps"] == 15 and written["bits_per_token"] == 8.0
    assert 0.0 < written["test_mse"] < 1.0 and 0.0 < written["utilization"] <= 1.0
    assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "reconstructions.png"]


@pytest.mark.parametrize("as_json", [False, True])
def test_vq_train_without_out_writes_to_the_default_directory(tmp_path, monkeypatch, capsys, as_json):
    monkeypatch.chdir(tmp_path)
    argv = ["vq-train", "--quantizer", "fsq+entropy", "--steps", "3", "--batch-size", "16"]
    assert main(argv + ["--json"] * as_json) == 0
    out = Path("runs") / "vq-train-fsq+entropy"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "reconstructions.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantizer"] == "fsq+entropy" and metrics["png"] == str(out / "reconstructions.png")
    assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    # Where the files went is printed: after the table, or on stderr so that stdout stays pure JSON.
    told = captured.err if as_json else captured.out
    assert f"wrote {out / 'reconstructions.png'} and {out / 'metrics.json'}" in " ".join(told.split())
    if as_json:
        assert json.loads(captured.out) == metrics
    else:
        assert "utilization" in captured.out


def test_vq_train_replaces_its_files_and_leaves_others(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text('{"stale": true}')
    assert main(["vq-train", "--quantizer", "vq", "--steps", "3", "--batch-size", "16", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt", "reconstructions.png"]
    assert json.loads((out / "metrics.json").read_text())["quantizer"] == "vq"
    assert (out / "notes.txt").read_text() == "mine"


def test_vq_train_crash_while_writing_leaves_no_metrics(tmp_path, monkeypatch, capsys):
    # A failure after training, while the PNG is written: no metrics.json is left that could be taken for this
    # run's (the previous run's is gone too, as its PNG may already have been replaced), and no temp files.
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"previous": true}')

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(lowbit.vq.digits, "save_reconstructions", fail)
    assert main(["vq-train", "--quantizer", "vq", "--steps", "2", "--batch-size", "16", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_vq_train_checks_out_before_training(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("trained although --out is unusable")

    monkeypatch.setattr(lowbit.vq.digits, "train_digits", never)
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["vq-train", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: --out") and "not a directory" in err and "\n" not in err


def test_vq_train_bad_arguments_exit_2_with_one_line(capsys):
    assert main(["vq-train", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: --steps") and "\n" not in err
    assert main(["vq-train", "--quantizer", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice" in err and "\n" not in err
    assert main(["vq-train", "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("lowbit: error: --batch-size")


def test_cli_offers_every_benchmark_quantizer():
    from lowbit.cli.vq_cmd import QUANTIZER_CHOICES
    from lowbit.vq.digits import QUANTIZERS

    assert set(QUANTIZER_CHOICES) == set(QUANTIZERS)
