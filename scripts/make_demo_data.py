"""Generate the demo data shipped in ``fastsft/data/``: a chat dataset, a tokenizer and a model config.

Everything is produced here from fixed word lists and templates written for fastsft, with a fixed seed, so the
shipped files are ours to distribute and re-running this script reproduces them byte for byte:

- ``demo_chat.jsonl``: synthetic conversations (``{"messages": [...]}``) about arithmetic, sorting, counting,
  reversing and recalling small made-up facts; the answers are computed, so they are correct.
- ``demo_model/``: a byte-level BPE tokenizer trained on that data (``tokenizer.json``) with a chat template
  carrying ``{% generation %}`` markers (for TRL's ``assistant_only_loss``), and a small Llama config
  (random initialization; there are no weights).

Run from the repository root: ``python scripts/make_demo_data.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "fastsft" / "data"
ROWS = 400
SEED = 1234
VOCAB_SIZE = 2048

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "brown"]
ANIMALS = ["cat", "dog", "otter", "heron", "badger", "lizard", "rabbit", "falcon", "turtle", "fox"]
OBJECTS = ["lamp", "kettle", "bicycle", "pencil", "window", "basket", "ladder", "teapot", "compass", "drum"]
NAMES = ["Ada", "Bram", "Cleo", "Dmitri", "Esme", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly and correctly.", "You are a patient tutor."]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>\n{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n{%- endif -%}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _arithmetic(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _sorting(rng):
    numbers = rng.sample(range(100), rng.randint(3, 6))
    return (f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
            f"In order: {', '.join(map(str, sorted(numbers)))}.")


def _counting(rng):
    word = rng.choice(COLORS + ANIMALS + OBJECTS)
    return f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."


def _reversing(rng):
    words = rng.sample(COLORS + ANIMALS + OBJECTS, rng.randint(2, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _facts(rng):
    name, animal, color = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(COLORS)
    count = rng.randint(1, 10)
    animals = _plural(animal) if count > 1 else animal
    story = f"{name} has {NUMBER_WORDS[count]} {color} {animals}."
    if rng.random() < 0.5:
        return f"{story} How many {_plural(animal)} does {name} have?", f"{name} has {count} {animals}."
    return f"{story} What color {'are they' if count > 1 else 'is it'}?", f"{'They are' if count > 1 else 'It is'} {color}."


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("x", "s", "sh", "ch")) else "s")


TASKS = [_arithmetic, _sorting, _counting, _reversing, _facts]


def make_rows(rows: int = ROWS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.choice([1, 1, 2])):  # some two-turn conversations
            question, answer = rng.choice(TASKS)(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def build_tokenizer(rows: list[dict]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for row in rows for m in row["messages"]]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=512)


def model_config(tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": (len(tokenizer) + 63) // 64 * 64, "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
    }


def main():
    rows = make_rows()
    with open(DATA_DIR / "demo_chat.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    model_dir = DATA_DIR / "demo_model"
    model_dir.mkdir(exist_ok=True)
    tokenizer = build_tokenizer(rows)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "config.json").write_text(json.dumps(model_config(tokenizer), indent=2) + "\n")
    print(f"wrote {len(rows)} rows, a {len(tokenizer)}-token tokenizer and a config to {DATA_DIR}")


if __name__ == "__main__":
    main()
