"""The demo assets shipped in ``fastsft/data/`` (made by ``scripts/make_demo_data.py``; see its docstring for
their origin): a small Llama config, its tokenizer and a synthetic chat dataset."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")
DEMO_MODEL_DIR = DATA_DIR / "demo_model"
DEMO_DATASET = DATA_DIR / "demo_chat.jsonl"


def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def demo_dataset(rows: int | None = None):
    """The demo chat dataset (``messages`` column), optionally only its first ``rows`` rows."""
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(DEMO_DATASET), split="train")
    return dataset.select(range(min(rows, len(dataset)))) if rows else dataset


def demo_model(seed: int = 0, dtype=None, **config_overrides):
    """A randomly initialized Llama from the shipped config (``config_overrides`` shrink it for tests)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(DEMO_MODEL_DIR, **config_overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
