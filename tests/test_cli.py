"""The fastsft CLI end to end: check, demo, train (CPU)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
import yaml

from fastsft import cli
from fastsft.demo_assets import DEMO_DATASET, DEMO_MODEL_DIR, demo_model, demo_tokenizer


def test_check_prints_a_passing_table(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("linear_cross_entropy")]
    assert {row[1] for row in rows} >= {"reference", "cuda"}  # every registered backend is listed
    assert all(row[3] in ("PASS", "SKIP") for row in rows) and any(row[3] == "PASS" for row in rows)


def test_check_inputs_are_all_on_the_device_checked():
    """Every tensor of a check case's inputs, nested ones included, on the device under test (the NF4 case left its
    double-quantized absmax on the CPU, which failed ``fastsft check`` on a GPU)."""
    from fastsft.commands import check

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)

    for op, case in check.CHECK_CASES.items():
        args, kwargs = case.make_inputs(torch.device("meta"), torch.float32)
        found = list(tensors([args, kwargs]))
        assert found and all(t.device.type == "meta" for t in found), op


def test_check_catches_a_wrong_backend(monkeypatch):
    from fastsft.commands import check

    case = check.CHECK_CASES["linear_cross_entropy"]
    broken = check.CheckCase(case.make_inputs, lambda backend, h, w, **kw: 1.01 * case.run(backend, h, w, **kw),
                             case.reference)
    result = check.check_backend("linear_cross_entropy", "reference", check.torch.device("cpu"), broken)
    assert result.status == "FAIL" and result.error > 1e-3


def test_demo_three_steps_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert cli.main(["demo", "--steps", "3", "--batch-size", "2", "--device", "cpu", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert len(result["fastsft"]["losses"]) == len(result["trl"]["losses"]) == 3
    assert result["fastsft"]["losses"] == pytest.approx(result["trl"]["losses"], rel=1e-4)
    assert result["speedup"] > 0
    out = capsys.readouterr().out
    assert "speedup" in out
    plot = tmp_path / "demo.png"  # beside the JSON, and its path printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {plot}" in out


def test_demo_plot_draws_the_losses_speed_and_memory(tmp_path):
    from fastsft.commands import plots

    run = {"losses": [2.0, 1.5, 1.2], "tokens_per_second": 1000.0, "peak_memory_bytes": 2**30}
    result = {"device": "NVIDIA H200", "steps": 3, "batch_size": 2, "lora": True, "speedup": 2.0,
              "fastsft": run, "trl": {**run, "tokens_per_second": 500.0, "peak_memory_bytes": 2**31}}
    assert plots.demo_plot(result, tmp_path / "d.png") == tmp_path / "d.png"
    assert (tmp_path / "d.png").stat().st_size > 10_000


def test_train_from_yaml_saves_adapter(tmp_path):
    model_dir = tmp_path / "model"
    demo_model(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2).save_pretrained(model_dir)
    demo_tokenizer().save_pretrained(model_dir)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": str(model_dir), "dataset": str(DEMO_DATASET), "max_steps": 2,
                                      "lora": {"r": 4}, "max_seq_length": 64,
                                      "sft": {"use_cpu": True, "disable_tqdm": True}}))
    out = tmp_path / "out"
    assert cli.main(["train", str(config), "--output-dir", str(out), "--batch-size", "2"]) == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()


def _usage_error(capsys, argv) -> str:
    """Runs the CLI, which must exit with code 2 and one line on stderr (no traceback); returns that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_rejects_unknown_settings(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\ndataset: y\nlearning_rat: 0.1\n")
    assert "learning_rat" in _usage_error(capsys, ["train", str(config)])


def test_train_user_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    assert "bad.yaml is not valid YAML" in _usage_error(capsys, ["train", str(bad_yaml)])
    assert "does not exist" in _usage_error(capsys, ["train", str(tmp_path / "missing.yaml")])
    missing_model = str(tmp_path / "no-such-model")
    assert f"model path {missing_model} does not exist" in _usage_error(
        capsys, ["train", "--model", missing_model, "--dataset", str(DEMO_DATASET)])
    assert "model path ./no-such-model does not exist" in _usage_error(
        capsys, ["train", "--model", "./no-such-model", "--dataset", str(DEMO_DATASET)])
    assert f"dataset file {tmp_path / 'none.jsonl'} does not exist" in _usage_error(
        capsys, ["train", "--model", "demo", "--dataset", str(tmp_path / "none.jsonl")])


def test_train_user_error_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastsft", "train", "--model", str(tmp_path / "nope"), "--dataset",
                             "demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and f"model path {tmp_path / 'nope'} does not exist" in result.stderr


def test_train_rejects_unknown_and_doubly_set_sft_arguments(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": "demo", "dataset": "demo", "sft": {"lerning_rate": 0.1}}))
    err = _usage_error(capsys, ["train", str(config)])
    assert "unknown SFTConfig argument under 'sft:': lerning_rate" in err
    config.write_text(yaml.safe_dump({"model": "demo", "dataset": "demo", "sft": {"max_length": 64}}))
    assert "'sft: max_length' is the top-level setting 'max_seq_length'" in _usage_error(capsys, ["train", str(config)])
    config.write_text(yaml.safe_dump({"model": "demo", "dataset": "demo", "sft": {"lr_scheduler_type": "nope"}}))
    assert "invalid SFTConfig settings" in _usage_error(capsys, ["train", str(config)])


def _tiny_run(model_dir, out, sft=None, **settings):
    """One `fastsft train` run of the small demo model on the CPU, through the command's own functions."""
    from fastsft.commands import train

    values = {"model": model_dir, "dataset": str(DEMO_DATASET), "output_dir": str(out), "max_steps": 2,
              "per_device_train_batch_size": 2, "max_seq_length": 64, "lora": {"r": 4},
              "sft": {"disable_tqdm": True, "use_cpu": True} if sft is None else sft, **settings}
    return train.run(train.load_settings(None, values))


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_train_same_seed_same_adapter_and_losses(model_dir, tmp_path):
    first = _tiny_run(model_dir, tmp_path / "a", seed=0)
    second = _tiny_run(model_dir, tmp_path / "b", seed=0)
    other = _tiny_run(model_dir, tmp_path / "c", seed=1)
    a, b, c = _adapter(tmp_path / "a"), _adapter(tmp_path / "b"), _adapter(tmp_path / "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["losses"] == second["losses"]
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed is what decides


def test_train_on_cpu_needs_no_use_cpu(model_dir, tmp_path, caplog):
    if torch.accelerator.is_available():
        pytest.skip("checks the machine without a GPU")
    with caplog.at_level(logging.INFO, logger="fastsft"):
        result = _tiny_run(model_dir, tmp_path / "out", sft={"disable_tqdm": True})
    assert len(result["losses"]) == 2
    assert [r.message for r in caplog.records if "no GPU here" in r.message] == [
        "no GPU here: training on the CPU (use_cpu=True, bf16=False)"]


def test_train_sft_entries_override_fastsft_defaults(model_dir, tmp_path, monkeypatch):
    """TensorBoard, checkpoints and resuming from one, all from `sft:` (fastsft's defaults would turn them off)."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    out = tmp_path / "out"
    sft = {"report_to": "tensorboard", "save_strategy": "steps", "save_steps": 1, "logging_steps": 1,
           "lr_scheduler_type": "constant", "disable_tqdm": True, "use_cpu": True}
    full = _tiny_run(model_dir, out, max_steps=3, sft=sft)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    resumed = _tiny_run(model_dir, tmp_path / "resumed", max_steps=3, sft=sft,
                        resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed["losses"] == pytest.approx(full["losses"][2:], rel=1e-5)  # only step 3, as it went the first time
    part = tmp_path / "part"
    _tiny_run(model_dir, part, max_steps=2, sft=sft)
    again = _tiny_run(model_dir, part, max_steps=3, sft={**sft, "resume_from_checkpoint": True})  # the last one
    assert again["losses"] == pytest.approx(full["losses"][2:], rel=1e-5)


def test_train_demo_model_and_data_by_name(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "--model", "demo", "--dataset", "demo", "--output-dir", str(out), "--max-steps", "1",
                     "--batch-size", "2", "--max-seq-length", "64"]) == 0
    assert (out / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None  # not a tmp dir
    err = _usage_error(capsys, ["train", "--model", str(DEMO_MODEL_DIR), "--dataset", "demo"])
    assert "--model demo builds the model" in err


def test_version(capsys):
    import fastsft

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fastsft {fastsft.__version__}"


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastsft", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "check" in result.stdout
