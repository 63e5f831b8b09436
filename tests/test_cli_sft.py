"""``fastsft sft``: TRL's ``trl sft`` arguments and flat YAML configs, trained by fastsft.SFTTrainer (CPU)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from fastsft import cli
from fastsft.commands import plots, sft

FLAT_YAML = """
model_name_or_path: demo
dataset_name: demo
output_dir: {out}
learning_rate: 0.0003
max_steps: 4
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
max_length: 128
packing: true
logging_steps: 1
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
seed: 3
use_cpu: true
bf16: false
report_to: none
"""


def test_the_same_yaml_gives_the_config_trl_sft_gives(tmp_path):
    """Every field of SFTConfig, ModelConfig and the script arguments as `trl sft --config` parses them."""
    from trl.scripts import sft as trl_sft

    config = tmp_path / "sft.yaml"
    config.write_text(FLAT_YAML.format(out=tmp_path / "out"))
    flags = ["--config", str(config), "--lora_dropout", "0.0", "--warmup_steps", "2"]  # flags over the file
    ours = sft.parse(flags)
    theirs = trl_sft.make_parser().parse_args_and_config(args=flags)
    for mine, stock in zip(ours[:4], theirs):
        assert dataclasses.asdict(mine) == dataclasses.asdict(stock), type(stock).__name__
    assert ours[1].learning_rate == 3e-4 and ours[1].warmup_steps == 2 and ours[2].lora_target_modules == [
        "q_proj", "v_proj"]
    assert isinstance(ours[4], sft.FastsftArguments) and ours[4].fastsft_patch


def _run(capsys, argv) -> int:
    del capsys  # the output goes to the test's captured streams
    return cli.main(["sft", *argv])


def _args(out, *extra):
    return ["--model_name_or_path", "demo", "--dataset_name", "demo", "--output_dir", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--max_length", "128", "--logging_steps", "1", "--use_peft",
            "--lora_r", "8", "--lora_target_modules", "all-linear", "--seed", "0", *extra]


def test_sft_on_the_builtin_model_writes_checkpoints_events_the_plot_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, _args(out, "--save_strategy", "steps", "--save_steps", "2", "--report_to",
                               "tensorboard")) == 0
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert list(out.glob("runs/**/events.out.tfevents.*")), "no TensorBoard events"
    plot = out / "loss.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and len([log for log in state["log_history"] if "loss" in log]) == 4

    # two more steps from the last checkpoint
    assert _run(capsys, _args(out, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
                               "--resume_from_checkpoint", str(out / "checkpoint-4"))) == 0
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    steps = [log["step"] for log in state["log_history"] if "loss" in log]
    assert steps == [1, 2, 3, 4, 5, 6]  # the resumed run went on from step 4


def test_fastsft_options_reach_the_trainer(tmp_path, capsys, monkeypatch):
    import fastsft

    seen = {}
    real = fastsft.SFTTrainer.__init__

    def spy(self, *args, **kwargs):
        seen.update(patch=kwargs.get("patch"), capture_layers=kwargs.get("capture_layers"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(fastsft.SFTTrainer, "__init__", spy)
    argv = _args(tmp_path / "out", "--max_steps", "1", "--fastsft_disable", "rope,attention", "--fastsft_backend",
                 "reference", "--no_fastsft_capture_layers", "--no_fastsft_plot")
    assert _run(capsys, argv) == 0
    assert seen == {"patch": {"rope": False, "attention": False, "backend": "reference"}, "capture_layers": False}
    assert not (tmp_path / "out" / "loss.png").exists()


def test_a_jsonl_file_with_an_eval_split_named_by_flags(tmp_path, capsys):
    from fastsft.demo_assets import DEMO_DATASET

    rows = DEMO_DATASET.read_text().splitlines()
    (tmp_path / "chat.jsonl").write_text("\n".join(rows[:40]) + "\n")
    out = tmp_path / "out"
    assert _run(capsys, _args(out, "--dataset_name", str(tmp_path / "chat.jsonl"), "--max_steps", "2",
                              "--eval_strategy", "steps", "--eval_steps", "2", "--dataset_test_split", "train",
                              "--save_strategy", "steps", "--save_steps", "2")) == 0
    logs = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in log for log in logs) and (out / "loss.png").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing file", "dataset file"),
    ("missing split", "no evaluation split 'test'"),
    ("bad kernel", "unknown kernel"),
    ("no model", "--model_name_or_path"),
])
def test_user_errors_are_one_line_and_exit_code_2(tmp_path, capsys, case, message):
    argv = {"missing file": _args(tmp_path / "o", "--dataset_name", str(tmp_path / "none.jsonl")),
            "missing split": _args(tmp_path / "o", "--eval_strategy", "steps", "--eval_steps", "1"),
            "bad kernel": _args(tmp_path / "o", "--fastsft_disable", "ropes"),
            "no model": ["--dataset_name", "demo", "--output_dir", str(tmp_path / "o")]}[case]
    assert cli.main(["sft", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastsft sft: error:") and message in err[0], err


def test_help_lists_trls_and_fastsfts_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sft", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--dataset_name", "--use_peft", "--lora_r", "--packing",
                 "--fastsft_disable", "--fastsft_offload"):
        assert flag in out, flag


def test_plot_without_losses_writes_nothing(tmp_path):
    assert plots.loss_plot([{"train_runtime": 1.0}], tmp_path / "loss.png", "x") is None
    assert not (tmp_path / "loss.png").exists()


def test_fastsft_train_runs_a_flat_config_and_warns_about_the_nested_one(tmp_path, capsys):
    config = tmp_path / "flat.yaml"
    config.write_text(FLAT_YAML.format(out=tmp_path / "flat").replace("max_steps: 4", "max_steps: 1"))
    assert cli.main(["train", str(config)]) == 0
    assert (tmp_path / "flat" / "adapter_config.json").is_file() and (tmp_path / "flat" / "loss.png").is_file()
    assert cli.main(["train", str(config), "--max-steps", "2"]) == 2  # flat configs take fastsft sft's flags
    assert "--max-steps as fastsft sft's flags" in capsys.readouterr().err

    nested = tmp_path / "nested.yaml"
    nested.write_text(f"model: demo\ndataset: demo\noutput_dir: {tmp_path / 'nested'}\nmax_steps: 1\n"
                      f"per_device_train_batch_size: 2\nmax_seq_length: 128\n")
    with pytest.warns(FutureWarning, match="nested YAML .* is deprecated"):
        assert cli.main(["train", str(nested)]) == 0


def test_merge_round_trip_gives_the_logits_of_base_and_adapter(tmp_path, capsys):
    """An adapter trained by fastsft sft, merged by fastsft merge, loaded back by plain transformers: the logits of
    base + adapter (PEFT) to float32 rounding."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastsft.demo_assets import demo_model, demo_tokenizer

    base = tmp_path / "base"
    demo_model(seed=0).save_pretrained(base)
    demo_tokenizer().save_pretrained(base)
    adapter = tmp_path / "adapter"
    argv = _args(adapter, "--max_steps", "2", "--learning_rate", "0.01", "--no_fastsft_plot")
    argv[argv.index("demo")] = str(base)  # the model, not the dataset
    assert _run(capsys, argv) == 0
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists() and (merged / "config.json").is_file()
    assert (merged / "tokenizer_config.json").is_file()

    probe = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)(probe).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(probe).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(probe).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # the adapter changed the model: the check is not vacuous

    assert cli.main(["merge", "--base", str(base), "--adapter", str(adapter), "--output", str(merged)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["merge", "--base", str(base), "--adapter", str(base), "--output", str(tmp_path / "m2")]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err


def test_bench_runs_the_harness_from_the_command_line(tmp_path, capsys, monkeypatch):
    """fastsft bench e2e is bench_sft (here its CPU smoke run), from any folder, children included."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after: the command extends it
    argv = ["bench", "e2e", "--model", "tiny", "--providers", "fastsft", "--warmup", "1", "--steps", "1", "--batch",
            "2", "--out", str(tmp_path / "results")]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "results" / "sft_tiny.json").read_text())["rows"]
    assert rows[0]["provider"] == "fastsft" and rows[0]["tokens_per_s"] > 0
    assert cli.main(["bench", "nothing"]) == 2
    assert "takes one of e2e, suite, report" in capsys.readouterr().err


def test_parquet_data(tmp_path, capsys):
    # (W&B through --report_to is TRL's reporting, tested offline with fastsft.SFTTrainer in test_recipes: a second
    # offline run here would share wandb's process-wide settings with that one)
    from datasets import load_dataset

    from fastsft.demo_assets import DEMO_DATASET

    load_dataset("json", data_files=str(DEMO_DATASET), split="train").select(range(16)).to_parquet(
        str(tmp_path / "chat.parquet"))
    assert _run(capsys, _args(tmp_path / "out", "--dataset_name", str(tmp_path / "chat.parquet"), "--max_steps",
                              "1")) == 0
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_qlora_flags_give_the_trainer_a_4bit_quantization_config(tmp_path, monkeypatch):
    """--load_in_4bit reaches TRL's loading as trl sft passes it (bitsandbytes' 4-bit layers need a GPU: the run
    stops at the trainer here)."""
    import fastsft

    seen = {}

    def stop(self, *args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(fastsft.SFTTrainer, "__init__", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["sft", *_args(tmp_path / "out", "--load_in_4bit", "--bnb_4bit_quant_type", "nf4")])
    config = seen["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert seen["peft_config"].r == 8
