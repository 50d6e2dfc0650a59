import json

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


def test_vq_train_table_output(capsys):
    assert main(["vq-train", "--quantizer", "pq", "--steps", "3", "--batch-size", "16"]) == 0
    assert "utilization" in capsys.readouterr().out


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
