import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lowbit.cli import INTERRUPTED, main
from lowbit.formats import Quantizer, make_format
from tests.conftest import build_family


@pytest.fixture
def tiny_dir(tmp_path):
    model = build_family("llama")
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("--version")
    assert exc.value.code == 0
    assert "lowbit 0.1.0" in capsys.readouterr().out


def test_quantize_saves_a_loadable_model_with_recipe_and_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        run_cli(
            "quantize",
            tiny_dir,
            "--method",
            "rtn",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--asymmetric",
            "--out",
            out,
            "--json",
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["layers_quantized"] == 14
    assert report["totals"]["avg_bits_per_weight"] == pytest.approx(5.0)
    # one shard per block plus one for the rest, with an index: a normal sharded HF checkpoint
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "lowbit_recipe.yaml",
        "lowbit_report.json",
        "model-block-00000.safetensors",
        "model-block-00001.safetensors",
        "model-rest-00.safetensors",
        "model.safetensors.index.json",
    ]
    assert "rtn" in (out / "lowbit_recipe.yaml").read_text()
    assert '"quant_method": "compressed-tensors"' in (out / "config.json").read_text()  # packed by default
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    # transformers 5.24 reads asymmetric compressed-tensors checkpoints through its dequantize path
    reloaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    w = reloaded.model.layers[0].self_attn.q_proj.weight.detach()
    original = load_file(tiny_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    q = Quantizer(make_format("int4", group_size=32, symmetric=False))
    assert torch.allclose(w, q.dequantize(q.quantize(original)), atol=1e-6)


def test_formats_and_recipe_file(tiny_dir, tmp_path):
    assert run_cli("quantize", tiny_dir, "--format", "nvfp4", "--out", tmp_path / "a", "--json") == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - hqq: {format: int3, group_size: 32}\n")
    assert run_cli("quantize", tiny_dir, "--recipe", recipe, "--out", tmp_path / "b", "--json") == 0
    report = json.loads((tmp_path / "b" / "lowbit_report.json").read_text())
    assert {layer["method"] for layer in report["layers"]} == {"hqq"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "9"], "bits must be between 1 and 8"),
        (["--bits", "x"], "argument --bits: invalid int value: 'x'"),
        (["--group-size", "48"], "group_size 48 does not divide the input dimension 64"),
        (["--format", "int5x"], "unknown format 'int5x'"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--recipe", "missing.yaml"], "recipe file missing.yaml does not exist"),
        (["--n-samples", "0", "--method", "gptq"], "--n-samples must be >= 1"),
        (["--sanity-max-kl", "0"], "--sanity-max-kl must be > 0, got 0.0"),
    ],
)
def test_bad_arguments_give_one_line_errors_and_exit_2(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    assert run_cli("quantize", tiny_dir, "--out", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err.replace("\n", " ")
    assert err.splitlines()[-1].startswith("lowbit: error:")
    assert not out.exists()


def test_missing_model_and_corrupt_checkpoint(tiny_dir, tmp_path, capsys):
    assert run_cli("quantize", tmp_path / "nowhere", "--out", tmp_path / "q") == 2
    assert "no such model directory" in capsys.readouterr().err
    (tiny_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    assert run_cli("quantize", tiny_dir, "--out", tmp_path / "q") == 2
    assert "model.safetensors is corrupt" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_existing_output_needs_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run_cli("quantize", tiny_dir, "--group-size", "32", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("quantize", tiny_dir, "--group-size", "32", "--out", out, "--overwrite", "--json") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_nonfinite_weights_are_refused_naming_the_layer(tiny_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    state = load_file(tiny_dir / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("inf")
    save_file(state, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    assert run_cli("quantize", tiny_dir, "--group-size", "32", "--out", tmp_path / "q") == 2
    assert "model.layers.1.self_attn.k_proj has 1 NaN/Inf" in capsys.readouterr().err
    assert (
        run_cli("quantize", tiny_dir, "--group-size", "32", "--out", tmp_path / "q", "--allow-nonfinite", "--json") == 0
    )


def test_a_crash_mid_run_leaves_no_output_and_the_rerun_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    from lowbit.export.shards import ShardWriter

    original = ShardWriter.write
    calls = []

    def crash_on_second_block(self, stem, tensors):
        calls.append(stem)
        if stem == "block-00001":
            raise RuntimeError("disk on fire")
        return original(self, stem, tensors)

    out = tmp_path / "q"
    monkeypatch.setattr(ShardWriter, "write", crash_on_second_block)
    assert run_cli("quantize", tiny_dir, "--group-size", "32", "--out", out) == 1
    assert "disk on fire" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(ShardWriter, "write", original)
    assert run_cli("quantize", tiny_dir, "--group-size", "32", "--out", out) == 0
    assert "resumed an interrupted run at block 1" in capsys.readouterr().out
    assert (out / "model-block-00001.safetensors").exists()
    assert not list(tmp_path.glob(".q.partial*"))


def test_interrupting_a_run_leaves_no_output_dir(tmp_path):
    """Ctrl-C (SIGINT) once the first block is done: one line, exit 130, no output directory; the
    progress directory stays for a rerun to resume. The test waits for that event (the progress
    file), not for a time."""
    out = tmp_path / "q"
    run_file = tmp_path / ".q.partial" / "lowbit_run.json"
    cmd = [sys.executable, "-m", "lowbit", "quantize", "reference-lm", "--method", "gptq", "--n-samples", "64"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        while not run_file.exists() and proc.poll() is None:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == INTERRUPTED
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".q.partial"]


def test_verbose_logging_prints_each_line_once(tiny_lm_dir, tmp_path):
    """-vv shows lowbit's debug and info lines, each once (no second handler on the way up)."""
    cmd = [sys.executable, "-m", "lowbit", "-vv", "quantize", str(tiny_lm_dir), "--method", "rtn"]
    cmd += ["--group-size", "32", "--n-samples", "4", "--seq-len", "16", "--out", str(tmp_path / "q")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "400"})
    assert res.returncode == 0, res.stderr
    for block in (0, 1):  # logged once per block, at INFO
        assert sum(f"model.layers.{block} done in" in line for line in res.stderr.splitlines()) == 1, res.stderr
    assert sum(" DEBUG " in line for line in res.stderr.splitlines()) > 0  # -vv reaches lowbit's debug lines


class _InterruptedImport:
    """A meta path finder that raises KeyboardInterrupt when ``name`` is imported: Ctrl-C while the
    heavy imports (torch, transformers) of a command are still running."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_during_the_imports_gives_one_line_and_exit_130(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "lowbit.api", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport("lowbit.api"), *sys.meta_path])
    assert run_cli("quantize", tiny_dir, "--out", tmp_path / "q") == 130
    assert capsys.readouterr().err.strip() == INTERRUPTED
    assert not (tmp_path / "q").exists()


def test_help_and_version_import_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from lowbit.cli import INTERRUPTED, main\n"
        "for argv in (['--help'], ['--version'], ['quantize', '--help'], ['eval', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'scipy') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert "rtn" in res.stdout and "gptq" in res.stdout  # the method list of quantize --help


def test_method_names_in_the_help_are_the_registered_steps():
    from lowbit.algorithms import STEPS
    from lowbit.cli.steps import builtin_step_names

    assert set(builtin_step_names()) == set(STEPS)


def test_bad_config_json_gives_one_line(tiny_dir, tmp_path, capsys):
    (tiny_dir / "config.json").write_text("{not json")
    for command in (["quantize", tiny_dir, "--out", tmp_path / "q"], ["eval", tiny_dir]):
        assert run_cli(*command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "config.json is not valid JSON" in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_unwritable_output_fails_before_any_work(tiny_dir, capsys, dry_run):
    args = ["quantize", tiny_dir, "--group-size", "32", "--out", "/sys/lowbit-test-out/q"]
    assert run_cli(*args, *(["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/sys is not writable" in err


def test_a_missing_relative_path_fails_at_once_when_no_hub_is_reachable(tmp_path, monkeypatch, capsys):
    from lowbit.models import hub

    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "huggingface.co cannot be reached")
    monkeypatch.setattr(hub, "download_model", lambda *a: pytest.fail("must not try to download"))
    monkeypatch.chdir(tmp_path)
    assert run_cli("quantize", "models/llama", "--out", tmp_path / "q") == 2
    err = capsys.readouterr().err.strip()
    assert "no such model directory: models/llama" in err and "cannot be reached" in err
    assert len(err.splitlines()) == 1


def test_quantize_takes_a_hub_id(tiny_dir, tmp_path, monkeypatch, capsys):
    from lowbit.models import hub

    fetched = []
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(hub, "download_model", lambda repo: fetched.append(repo) or tiny_dir)
    args = ["quantize", "some-org/tiny-llama", "--group-size", "32", "--out", tmp_path / "q", "--json"]
    assert run_cli(*args) == 0
    assert fetched == ["some-org/tiny-llama"]
    assert json.loads(capsys.readouterr().out)["totals"]["layers_quantized"] == 14


def test_binary_calibration_data_is_refused(tiny_lm_dir, tmp_path, capsys):
    binary = tmp_path / "calib.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    args = ["quantize", tiny_lm_dir, "--method", "gptq", "--group-size", "32", "--out", tmp_path / "q"]
    assert run_cli(*args, "--calibration", binary) == 2
    err = capsys.readouterr().err.strip()
    assert "does not look like UTF-8 text" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_lm_eval_tasks_without_their_data_give_one_line(tiny_lm_dir, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli("eval", tiny_lm_dir, "--tasks", "hellaswag", "--limit", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lowbit: error: lm-eval could not load the data of hellaswag")


def test_dry_run_prints_the_plan(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        run_cli("quantize", tiny_lm_dir, "--method", "gptq", "--group-size", "32", "--out", out, "--dry-run", "--json")
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["blocks"] == 2 and len(plan["layers"]) == 14
    assert {"estimated_peak_memory_bytes", "estimated_disk_bytes", "estimated_seconds"} <= set(plan)
    assert not out.exists()
    assert run_cli("quantize", tiny_lm_dir, "--method", "gptq", "--group-size", "32", "--out", out, "--dry-run") == 0
    assert "estimated peak memory" in capsys.readouterr().out


def test_eval_json_keys(tiny_lm_dir, capsys):
    assert (
        run_cli(
            "eval",
            tiny_lm_dir,
            "--reference",
            tiny_lm_dir,
            "--max-tokens",
            "600",
            "--context",
            "128",
            "--stride",
            "64",
            "--json",
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert {"ppl", "kl", "top1_agreement"} <= set(res)
    assert res["kl"] == pytest.approx(0.0, abs=1e-6) and res["top1_agreement"] == 1.0
    assert run_cli("eval", tiny_lm_dir, "--embeddings", "--reference", tiny_lm_dir) == 2
    assert "--embeddings needs an encoder" in capsys.readouterr().err
    assert run_cli("eval", tiny_lm_dir, "--kl") == 2
    assert "--kl needs --reference" in capsys.readouterr().err


def test_models_lists_the_builtins(capsys):
    assert run_cli("models", "--json") == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert names == {"reference-lm", "minilm"}


def test_eval_through_a_quantized_kv_cache(tiny_lm_dir, capsys):
    common = ["eval", tiny_lm_dir, "--reference", tiny_lm_dir, "--max-tokens", "600", "--context", "128", "--json"]
    assert run_cli(*common, "--kv-bits", "2", "--kv-residual", "0", "--kv-group-size", "16") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kl"] > 1e-4  # the same model, now reading 2-bit keys and values
    assert res["kv_bytes_per_token"] < res["kv_bytes_per_token_fp16"] / 3
    assert run_cli(*common, "--kv-bits", "5") == 2
    assert "bits must be 2, 3, 4, 8" in capsys.readouterr().err
