"""LoRA SFT with fastsft.SFTTrainer on one or more GPUs (or the CPU), launched by torchrun or accelerate.

    python examples/sft_multi_gpu.py                                   # one process: the demo model and data
    torchrun --nproc_per_node 2 examples/sft_multi_gpu.py --model llama-1b              # DDP
    accelerate launch --config_file examples/accelerate_ddp.yaml examples/sft_multi_gpu.py --model llama-1b
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/sft_multi_gpu.py --model llama-1b

``--model demo``: the shipped demo Llama and chat data. ``--model llama-1b``: a randomly initialized Llama in the
shape of Llama-3.2-1B (hidden 2048, 16 layers, vocab 128256, tied embeddings) on synthetic pre-tokenized chat rows
(loss on the assistant part); ``--qlora`` loads its decoder weights in NF4 (bitsandbytes) for QLoRA. LoRA r=16 on
q,k,v,o,gate,up,down, packing, bf16 on GPU, AdamW.
``average_tokens_across_devices=True`` (TRL's default), so N processes x batch B train like one process on N*B.

Prints the tokens/s (all ranks' non-padding input tokens, after the warm-up steps) and, with ``--json PATH``, writes
it with the per-step losses from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128_256, tie_word_embeddings=True, max_position_embeddings=8192,
                rope_theta=500_000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synthetic_rows(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    """Chat-shaped rows of random ids (user 26-390 tokens, assistant 65-1560), only the assistant part labelled."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = [1] + rng.integers(8, vocab, int(rng.integers(20, 301) * 1.3)).tolist() + [3]
        answer = rng.integers(8, vocab, int(rng.integers(50, 1201) * 1.3)).tolist() + [2]
        rows.append({"input_ids": (prompt + answer)[:max_length],
                     "assistant_masks": ([0] * len(prompt) + [1] * len(answer))[:max_length]})
    return rows


def word_tokenizer(vocab: int):
    """A tokenizer with the model's vocabulary size and special tokens (the data is pre-tokenized; no download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<sep>": 3} | {f"t{i}": i for i in range(4, vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build(name: str, rows: int, max_length: int, device: str, qlora: bool = False, workdir: str | None = None):
    import torch
    from datasets import Dataset

    from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name == "demo":
        return demo_model(dtype=dtype), demo_tokenizer(), demo_dataset()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_1B, attn_implementation="sdpa")
    torch.manual_seed(0)  # the same weights on every rank
    tokenizer = word_tokenizer(config.vocab_size)
    data = Dataset.from_list(synthetic_rows(rows, config.vocab_size, max_length))
    if qlora:
        # A random model has no checkpoint to quantize on load: save it (each rank its own copy) and load it back
        # the way users load QLoRA, NF4 with double quantization through bitsandbytes on this rank's GPU.
        from fastsft import load

        with torch.device(device):
            LlamaForCausalLM(config).to(dtype).save_pretrained(workdir)
        tokenizer.save_pretrained(workdir)
        torch.cuda.empty_cache()
        model, _ = load(workdir, dtype=dtype, load_in_4bit=True, patch=False)
        return model, tokenizer, data
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model, tokenizer, data


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "llama-1b"], default="demo")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps left out of the tokens/s (at least 1: the clock starts at a step's end)")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (packed sequences)")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--no-packing", dest="packing", action="store_false")
    parser.add_argument("--checkpointing", action="store_true", help="non-reentrant gradient checkpointing")
    parser.add_argument("--no-patch", dest="patch", action="store_false", help="plain TRL, for comparison")
    parser.add_argument("--qlora", action="store_true", help="llama-1b base weights in NF4 (bitsandbytes; needs CUDA)")
    parser.add_argument("--ddp-find-unused-parameters", choices=["true", "false"],
                        help="set SFTConfig.ddp_find_unused_parameters (unset: fastsft chooses DDP's settings for "
                             "LoRA-only training; set: transformers' settings, with this search choice)")
    parser.add_argument("--json", help="write the results here (rank 0)")
    a = parser.parse_args(argv)
    if not 1 <= a.warmup < a.steps:
        parser.error(f"--warmup must be at least 1 and below --steps ({a.steps}), got {a.warmup}")
    if a.qlora and a.model != "llama-1b":
        parser.error("--qlora needs --model llama-1b")

    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from fastsft import SFTConfig, SFTTrainer

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(local_rank)  # bitsandbytes quantizes onto the current device
    elif a.qlora:
        parser.error("--qlora needs a CUDA GPU (bitsandbytes 4-bit)")
    max_length = a.max_length if a.model == "llama-1b" else min(a.max_length, 512)
    rows = a.steps * a.batch * a.accumulation * world * (3 if a.packing else 1) + 16
    with tempfile.TemporaryDirectory() as workdir:
        model, tokenizer, dataset = build(a.model, rows, max_length, device, a.qlora, workdir)

    class Clock(TrainerCallback):
        marks: list = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                         gradient_accumulation_steps=a.accumulation, learning_rate=1e-4, optim="adamw_torch",
                         logging_steps=1, report_to="none", save_strategy="no", bf16=device != "cpu",
                         use_cpu=device == "cpu", packing=a.packing, max_length=max_length,
                         gradient_checkpointing=a.checkpointing,
                         gradient_checkpointing_kwargs={"use_reentrant": False} if a.checkpointing else None,
                         include_num_input_tokens_seen="non_padding", average_tokens_across_devices=True,
                         dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True,
                         ddp_find_unused_parameters=None if a.ddp_find_unused_parameters is None
                         else a.ddp_find_unused_parameters == "true")
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[clock], patch=a.patch)
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()

    warm = min(a.warmup, len(clock.marks) - 1)
    timed = clock.marks[warm - 1:]  # step-end marks from the last warm-up step on
    (t0, n0), (t1, n1) = timed[0], timed[-1]
    result = {
        "model": a.model, "processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "fsdp_version": getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", None)
        if trainer.is_fsdp_enabled else None,
        "device": torch.cuda.get_device_name(local_rank) if device != "cpu" else "cpu",
        "per_device_batch": a.batch, "accumulation": a.accumulation, "max_length": max_length,
        "packing": a.packing, "checkpointing": a.checkpointing, "patched": a.patch, "qlora": a.qlora,
        "steps_timed": len(clock.marks) - warm, "tokens_per_s": (n1 - n0) / (t1 - t0),
        # the median step is blind to one-off stalls (a kernel compiled for a new shape inside the timed steps)
        "median_step_tokens_per_s": statistics.median(
            (nb - na) / (tb - ta) for (ta, na), (tb, nb) in zip(timed, timed[1:])),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if device != "cpu":
        result["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    if trainer.accelerator.is_main_process:
        print(json.dumps(result))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
