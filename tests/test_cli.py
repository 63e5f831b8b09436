"""The fastsft CLI end to end: check, demo, train (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from fastsft import cli
from fastsft.demo_assets import DEMO_DATASET, demo_model, demo_tokenizer



def test_check_prints_a_passing_table(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("linear_cross_entropy")]
    assert {row[1] for row in rows} >= {"reference", "cuda"}  # every registered backend is listed
    assert all(row[3] in ("PASS", "SKIP") for row in rows) and any(row[3] == "PASS" for row in rows)


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
    assert "speedup" in capsys.readouterr().out


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


def test_train_rejects_unknown_settings(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: x\ndataset: y\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        cli.main(["train", str(config)])


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastsft", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "demo" in result.stdout and "check" in result.stdout
