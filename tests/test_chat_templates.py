"""fastsft.chat_templates: generation-marked standard templates and train_on_responses_only."""

from __future__ import annotations

import pytest
import trl

from fastsft import SFTTrainer
from fastsft.chat_templates import CHAT_TEMPLATES, get_chat_template, train_on_responses_only
from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
from helpers import SMALL_DEMO

END = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>", "qwen": "<|im_end|>", "mistral": "</s>", "gemma": "<end_of_turn>"}


def templated(name, **kwargs):
    tokenizer = demo_tokenizer()
    with pytest.warns(UserWarning, match="added"):
        get_chat_template(tokenizer, name, **kwargs)
    return tokenizer


def spans(ids, mask):
    """The masked tokens as contiguous runs of token ids."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", list(END))
def test_assistant_mask_covers_exactly_the_replies(name):
    tokenizer = templated(name)
    for row in demo_dataset(12):
        messages = row["messages"]
        out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = spans(out["input_ids"], out["assistant_masks"])
        # one run per reply, each exactly the reply's text and the end-of-turn token
        assert [tokenizer.decode(run) for run in runs] == [reply + END[name] for reply in replies]
        # and nothing else: the masked tokens are all of the reply tokens, not a superset
        assert sum(out["assistant_masks"]) == sum(len(run) for run in runs)
    assert tokenizer.eos_token == END[name]


@pytest.mark.parametrize("name", ["gemma", "mistral"])
def test_system_message_opens_the_first_user_turn(name):
    tokenizer = templated(name, system_message="Be brief.")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                         tokenize=False)
    assert "Be brief.\n\nHi" in text


def test_default_system_message_and_generation_prompt():
    tokenizer = templated("chatml", system_message="You are terse.")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    own = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                                        tokenize=False)
    assert "You are terse." not in own and own.startswith("<|im_start|>system\nS<|im_end|>")


def test_special_tokens_added_once_and_model_resized():
    tokenizer, model = demo_tokenizer(), demo_model(**SMALL_DEMO, vocab_size=778)
    get_chat_template(tokenizer, "llama-3", model=model)  # four new tokens: 781 > 778
    assert len(tokenizer) == 781 and model.get_input_embeddings().num_embeddings >= 781
    assert len(tokenizer.tokenize("<|start_header_id|>")) == 1
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    get_chat_template(tokenizer, "llama-3")  # nothing missing now: no new tokens, no warning
    assert len(tokenizer) == 781


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        get_chat_template(demo_tokenizer(), "vicuna")
    assert {"llama-3", "chatml", "qwen", "mistral", "gemma"} <= set(CHAT_TEMPLATES)


def trainer_for(tokenizer, tmp_path, **config):
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=128, **config)
    return SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, train_dataset=demo_dataset(16), processing_class=tokenizer)


def trained_text(trainer, tokenizer):
    return [tokenizer.decode([t for t in labels if t != -100]) for labels in trainer.train_dataset["labels"]]


def test_trl_assistant_only_loss_with_our_template(tmp_path):
    tokenizer = templated("chatml")
    trainer = trainer_for(tokenizer, tmp_path, assistant_only_loss=True)
    expected = ["".join(m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant")
                for row in demo_dataset(16)]
    assert trained_text(trainer, tokenizer) == expected


def test_train_on_responses_only_for_a_template_without_markers(tmp_path):
    tokenizer = templated("chatml")
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    trainer = trainer_for(tokenizer, tmp_path)
    assert all(-100 not in labels for labels in trainer.train_dataset["labels"])  # TRL alone trains on everything
    assert train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n") is trainer
    expected = ["".join(m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant")
                for row in demo_dataset(16)]
    assert trained_text(trainer, tokenizer) == expected
    trainer.train_dataset = trainer.train_dataset.select(range(4))
    trainer.args.max_steps = 1
    trainer.train()  # the collator takes the masked labels
    assert trainer.state.log_history[-1]["train_loss"] > 0


def test_train_on_responses_only_on_a_dataset_and_errors():
    tokenizer = templated("chatml")
    dataset = demo_dataset(6).map(lambda row: dict(tokenizer.apply_chat_template(row["messages"], return_dict=True)))
    masked = train_on_responses_only(dataset, "<|im_start|>user\n", "<|im_start|>assistant\n", tokenizer=tokenizer)
    assert all(-100 in labels and any(t != -100 for t in labels) for labels in masked["labels"])
    with pytest.raises(ValueError, match="found in no row"):
        train_on_responses_only(dataset, "<|im_start|>user\n", "### Response:", tokenizer=tokenizer)
    with pytest.raises(TypeError, match="tokenizer="):
        train_on_responses_only(dataset, "<|im_start|>user\n", "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="input_ids"):
        train_on_responses_only(demo_dataset(4), "a", "b", tokenizer=tokenizer)
