"""fastsft.memory: the persistent tensors counted by category, each storage once, and the trainer's report."""

from __future__ import annotations

import logging

import pytest
import torch

import fastsft
from fastsft.memory import memory_breakdown
from helpers import tiny_model


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_categories_count_each_storage_once_and_follow_the_training():
    model = lora(tiny_model("llama", tie_word_embeddings=True))
    frozen = {p.data_ptr(): p for p in model.parameters() if not p.requires_grad}  # tied: one entry
    trainable = [p for p in model.parameters() if p.requires_grad]
    buffers = {b.data_ptr(): b for b in model.buffers()}
    report = memory_breakdown(model)
    assert report.weights == nbytes(frozen.values()) + nbytes(buffers.values())
    assert report.adapters == nbytes(trainable) and report.gradients == report.optimizer_state == 0
    assert report.peak_allocated is None and report.step is None and "memory on cpu" in report.summary()

    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 96, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    report = memory_breakdown(model, opt)
    assert report.gradients == nbytes(trainable)
    # AdamW: two moments per parameter and a step counter each
    steps = [s["step"] for s in opt.state.values()]
    assert report.optimizer_state == 2 * nbytes(trainable) + nbytes(steps)


def test_a_tensor_on_another_device_is_not_counted():
    model = lora(tiny_model("llama"))
    report = memory_breakdown(model, device="meta")
    assert report.persistent == 0


def test_sft_trainer_logs_the_breakdown_at_the_end_of_training(tmp_path, caplog):
    import trl
    from peft import LoraConfig

    from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
    from helpers import SMALL_DEMO

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_length=64,
                         save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = fastsft.SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, train_dataset=demo_dataset(8),
                                 processing_class=demo_tokenizer(), peft_config=LoraConfig(r=8))
    assert trainer.memory_report is None
    with caplog.at_level(logging.INFO, logger="fastsft.trainer.sft_trainer"):
        trainer.train()
    report = trainer.memory_report
    assert report.adapters > 0 and report.gradients == 0  # the trainer zeroes gradients with set_to_none
    assert report.optimizer_state == pytest.approx(2 * report.adapters, rel=0.05)
    assert any("weights" in r.message and "optimizer state" in r.message for r in caplog.records)


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        memory_breakdown("llama")
    with pytest.raises(TypeError, match="optimizer must be a torch optimizer"):
        memory_breakdown(torch.nn.Linear(2, 2), optimizer=[1, 2])
    with pytest.raises(RuntimeError):
        memory_breakdown(torch.nn.Linear(2, 2), device="nowhere")
