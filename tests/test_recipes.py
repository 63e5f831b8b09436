"""The four classic Unsloth-notebook recipes, written as the notebooks write them, on a tiny local model.

Only the precision flags differ on the CPU (``fp16=False, bf16=False``, ``optim="adamw_torch"``); the
``@pytest.mark.gpu`` variants run the notebooks' own flags (``optim="adamw_8bit"``, bf16/fp16 by support).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import trl

from fastsft import FastLanguageModel, SFTConfig, SFTTrainer, is_bfloat16_supported
from fastsft.demo_assets import demo_dataset

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ON_GPU = torch.cuda.is_available()


def precision(gpu: bool) -> dict:
    """The only lines that differ between the CPU tests and the notebooks."""
    if gpu:
        return dict(fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(), optim="adamw_8bit")
    return dict(fp16=False, bf16=False, optim="adamw_torch")


def check_gpu_run(trainer):
    """The GPU variants really ran there, with the notebook's flags: the model on CUDA, the half precision the card
    supports, bitsandbytes' 8-bit AdamW."""
    args = trainer.args
    assert args.optim == "adamw_8bit" and (args.bf16, args.fp16) == (is_bfloat16_supported(),
                                                                      not is_bfloat16_supported())
    assert next(trainer.model.parameters()).device.type == "cuda"
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(optimizer).__module__.startswith("bitsandbytes"), type(optimizer)


def load_model(model_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir,
        max_seq_length=128,
        dtype=None,
        load_in_4bit=False,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=TARGETS,
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )
    return model, tokenizer


def text_dataset(tokenizer, rows):
    def formatting_prompts_func(examples):
        return {"text": [tokenizer.apply_chat_template(convo, tokenize=False) for convo in examples["messages"]]}

    return demo_dataset(rows).map(formatting_prompts_func, batched=True)


def losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def assert_trained(trainer, steps):
    values = losses(trainer)
    assert len(values) == steps and all(math.isfinite(v) for v in values)
    assert trainer.state.global_step == steps
    assert trainer.patch_report is not None and "fused_cross_entropy" in trainer.patch_report.patched
    moved = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert moved and all(p.abs().sum() > 0 for p in moved)  # B starts at zero: the adapter was trained


def basic(model_dir, tmp_path, gpu=False):
    model, tokenizer = load_model(model_dir)
    dataset = text_dataset(tokenizer, 64)
    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        dataset_text_field="text",
        max_seq_length=128,
        dataset_num_proc=1,
        packing=False,
        args=SFTConfig(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            warmup_steps=2,
            max_steps=6,
            learning_rate=1e-3,
            logging_steps=1,
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir=str(tmp_path / "outputs"),
            report_to="none",
            disable_tqdm=True,
            **precision(gpu),
        ),
    )
    trainer_stats = trainer.train()
    return trainer, trainer_stats


def test_recipe_basic(model_dir, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, stats = basic(model_dir, tmp_path)
    # one deprecation warning per old name, each mapped to TRL 1.16
    messages = [str(w.message) for w in record
                if issubclass(w.category, FutureWarning) and str(w.message).startswith("SFTTrainer(")]
    assert len(messages) == 5, messages
    for old in ("tokenizer", "dataset_text_field", "max_seq_length", "dataset_num_proc", "packing"):
        assert sum(f"SFTTrainer({old}=" in m for m in messages) == 1, (old, messages)
    assert isinstance(trainer.args, trl.SFTConfig)
    assert trainer.args.max_length == 128 and trainer.args.dataset_text_field == "text" and not trainer.args.packing
    assert trainer.processing_class is not None and trainer.processing_class.model_max_length == 128
    assert_trained(trainer, 6)
    assert stats.training_loss > 0
    values = losses(trainer)
    assert values[-1] < values[0]


def with_evaluation(model_dir, tmp_path, gpu=False):
    model, tokenizer = load_model(model_dir)
    dataset = text_dataset(tokenizer, 48)
    split = dataset.train_test_split(test_size=8, seed=3407)
    with pytest.warns(FutureWarning, match="evaluation_strategy"):
        args = SFTConfig(
            per_device_train_batch_size=2,
            per_device_eval_batch_size=4,
            gradient_accumulation_steps=2,
            warmup_steps=1,
            max_steps=6,
            learning_rate=1e-3,
            logging_steps=1,
            evaluation_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            max_seq_length=128,
            dataset_text_field="text",
            seed=3407,
            output_dir=str(tmp_path / "outputs"),
            report_to="none",
            disable_tqdm=True,
            **precision(gpu),
        )
    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=split["train"],
                         eval_dataset=split["test"], args=args)
    trainer.train()
    return trainer


def check_evaluation(trainer):
    """Evaluated every 2 of 6 steps, finite eval losses, the best checkpoint kept and loaded at the end."""
    args = trainer.args
    assert args.eval_strategy == "steps" and args.max_length == 128
    eval_losses = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert len(eval_losses) == 3 and all(math.isfinite(v) for v in eval_losses)
    assert trainer.state.best_metric == min(eval_losses)
    best_step = 2 * (eval_losses.index(min(eval_losses)) + 1)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert_trained(trainer, 6)
    # load_best_model_at_end: the adapter in memory is the best checkpoint's, not the last step's
    from safetensors.torch import load_file

    saved = load_file(f"{trainer.state.best_model_checkpoint}/adapter_model.safetensors")
    live = dict(trainer.model.named_parameters())
    assert saved and all("lora_" in name for name in saved)
    for name, tensor in saved.items():
        param = live[name.replace(".weight", ".default.weight")]
        assert torch.equal(param.detach().cpu().to(tensor.dtype), tensor), name


def test_recipe_with_evaluation(model_dir, tmp_path):
    check_evaluation(with_evaluation(model_dir, tmp_path))


def with_packing(model_dir, tmp_path, gpu=False):
    model, tokenizer = load_model(model_dir)
    dataset = text_dataset(tokenizer, 64)
    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        args=SFTConfig(
            dataset_text_field="text",
            max_seq_length=128,
            packing=True,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=1,
            warmup_steps=1,
            max_steps=4,
            learning_rate=1e-3,
            logging_steps=1,
            seed=3407,
            output_dir=str(tmp_path / "outputs"),
            report_to="none",
            disable_tqdm=True,
            **precision(gpu),
        ),
    )
    # packed: fewer rows than conversations, each at most max_length tokens, the documents' lengths recorded
    packed = trainer.train_dataset
    assert len(packed) < len(dataset) and "seq_lengths" in packed.column_names
    assert max(len(ids) for ids in packed["input_ids"]) <= 128
    assert sum(len(ids) for ids in packed["input_ids"]) > len(packed) * 64  # rows are well filled (> half)
    assert max(len(lengths) for lengths in packed["seq_lengths"]) > 1  # some row holds several conversations
    trainer.train()
    return trainer


def test_recipe_with_packing(model_dir, tmp_path):
    assert_trained(with_packing(model_dir, tmp_path), 4)


def with_monitoring(model_dir, tmp_path, monkeypatch, gpu=False):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model, tokenizer = load_model(model_dir)
    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=text_dataset(tokenizer, 32),
        args=SFTConfig(
            dataset_text_field="text",
            max_seq_length=128,
            per_device_train_batch_size=2,
            max_steps=3,
            learning_rate=1e-3,
            logging_steps=1,
            seed=3407,
            output_dir=str(tmp_path / "outputs"),
            report_to=["tensorboard", "wandb"],
            run_name="recipe-monitoring",
            disable_tqdm=True,
            **precision(gpu),
        ),
    )
    trainer.train()
    return trainer


def check_monitoring(trainer, tmp_path):
    """Throughput and peak memory in every log; the same scalars in TensorBoard's event file; a wandb offline run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert_trained(trainer, 3)
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert all(log["tokens_per_second"] > 0 and log["peak_memory_gb"] > 0 for log in logged)

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {tmp_path / 'tb'}"
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    scalars = accumulator.Tags()["scalars"]
    for tag in ("train/loss", "train/learning_rate", "train/tokens_per_second", "train/peak_memory_gb"):
        assert tag in scalars, (tag, scalars)
        assert len(accumulator.Scalars(tag)) == 3
    assert [e.value for e in accumulator.Scalars("train/loss")] == pytest.approx([log["loss"] for log in logged])

    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir()) if (tmp_path / "wandb").exists() else tmp_path
    assert list(runs[0].glob("run-*.wandb")), list(runs[0].iterdir())


def test_recipe_with_monitoring(model_dir, tmp_path, monkeypatch):
    check_monitoring(with_monitoring(model_dir, tmp_path, monkeypatch), tmp_path)


# --- the same recipes with the notebooks' own flags (bf16 or fp16 by support, 8-bit AdamW from bitsandbytes) ------

@pytest.mark.gpu
def test_recipe_basic_gpu_notebook_flags(model_dir, tmp_path):
    """The notebook's own precision flags and 8-bit AdamW (bitsandbytes, CUDA)."""
    pytest.importorskip("bitsandbytes")
    trainer, _ = basic(model_dir, tmp_path, gpu=True)
    check_gpu_run(trainer)
    assert_trained(trainer, 6)
    # the three last steps against the three first: the CPU run drops 0.015 this way, and half-precision noise
    # on a single step's loss (a few 1e-3) would blur a first-against-last comparison
    values = losses(trainer)
    assert sum(values[3:]) < sum(values[:3]), values


@pytest.mark.gpu
def test_recipe_with_evaluation_gpu_notebook_flags(model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = with_evaluation(model_dir, tmp_path, gpu=True)
    check_gpu_run(trainer)
    check_evaluation(trainer)


@pytest.mark.gpu
def test_recipe_with_packing_gpu_notebook_flags(model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = with_packing(model_dir, tmp_path, gpu=True)
    check_gpu_run(trainer)
    assert_trained(trainer, 4)


@pytest.mark.gpu
def test_recipe_with_monitoring_gpu_notebook_flags(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    trainer = with_monitoring(model_dir, tmp_path, monkeypatch, gpu=True)
    check_gpu_run(trainer)
    check_monitoring(trainer, tmp_path)
