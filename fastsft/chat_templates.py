"""Chat templates for training on assistant replies only.

:func:`get_chat_template` puts a standard template (Llama 3, ChatML/Qwen, Mistral, Gemma) on a tokenizer. Each
wraps every assistant reply, with its end-of-turn token, in ``{% generation %}`` markers, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` and TRL's ``SFTConfig(assistant_only_loss=True)``
see which tokens are the assistant's. :func:`train_on_responses_only` does the same for any template, markers or
not, by masking the labels of already tokenized data between an instruction marker and a response marker.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

__all__ = ["CHAT_TEMPLATES", "get_chat_template", "train_on_responses_only"]

# Optional default system message (`system_message=`): prepended when a conversation has none
_SYSTEM = ("{%- if default_system_message and messages[0]['role'] != 'system' -%}"
           "{%- set messages = [{'role': 'system', 'content': default_system_message}] + messages -%}"
           "{%- endif -%}")
# Gemma and Mistral have no system turn: the system message opens the first user turn
_FOLD_SYSTEM = ("{%- if messages[0]['role'] == 'system' -%}"
                "{%- set system_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set messages = messages[1:] -%}"
                "{%- else -%}{%- set system_prefix = '' -%}{%- endif -%}")

_LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
_MISTRAL = (
    _FOLD_SYSTEM + "{{ '<s>' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' + (system_prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '</s>' }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('mistral template: roles are user and assistant (and a first system)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
_GEMMA = (
    _FOLD_SYSTEM + "{{ '<bos>' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\\n' }}{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<start_of_turn>user\\n' + (system_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- else -%}{{ raise_exception('gemma template: roles are user and assistant (and a first system)') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ChatTemplate:
    template: str
    special_tokens: tuple[str, ...]  # added to the tokenizer when it lacks them
    end_of_turn: str  # becomes the tokenizer's eos_token with map_eos_token=True
    instruction_part: str  # markers for train_on_responses_only with this template
    response_part: str


_LLAMA3_T = ChatTemplate(_LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                         "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n",
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
_CHATML_T = ChatTemplate(_CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|im_start|>user\n",
                         "<|im_start|>assistant\n")
_MISTRAL_T = ChatTemplate(_MISTRAL, ("<s>", "</s>"), "</s>", "[INST]", "[/INST]")
_GEMMA_T = ChatTemplate(_GEMMA, ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>",
                        "<start_of_turn>user\n", "<start_of_turn>model\n")
CHAT_TEMPLATES = {"llama-3": _LLAMA3_T, "llama3": _LLAMA3_T, "chatml": _CHATML_T, "qwen": _CHATML_T,
                  "qwen-2.5": _CHATML_T, "qwen2.5": _CHATML_T, "mistral": _MISTRAL_T, "gemma": _GEMMA_T,
                  "gemma-2": _GEMMA_T, "gemma2": _GEMMA_T, "gemma-3": _GEMMA_T, "gemma3": _GEMMA_T}


def get_chat_template(tokenizer, chat_template: str = "chatml", *, system_message: str | None = None,
                      map_eos_token: bool = True, model=None):
    """Put the standard ``chat_template`` on ``tokenizer`` (in place) and return it.

    Args:
        chat_template: ``"llama-3"``, ``"chatml"`` (= ``"qwen"``), ``"mistral"`` or ``"gemma"`` (aliases in
            ``CHAT_TEMPLATES``).
        system_message: a default system message, used when a conversation has none.
        map_eos_token: make the template's end-of-turn token (``<|eot_id|>``, ``<|im_end|>``, ``</s>``,
            ``<end_of_turn>``) the tokenizer's ``eos_token``, so generation stops at the end of a reply.
        model: the model to keep in step: its embeddings are resized when tokens were added, and its generation
            config's ``eos_token_id`` follows ``map_eos_token``.

    The template's special tokens that the tokenizer lacks are added as special tokens (with a warning); the
    model's embedding matrix must then have room for them (``model=`` resizes it).
    """
    spec = CHAT_TEMPLATES.get(chat_template) if isinstance(chat_template, str) else None
    if spec is None:
        raise ValueError(f"unknown chat template {chat_template!r}; known: {', '.join(CHAT_TEMPLATES)}")
    vocab = tokenizer.get_vocab()
    missing = [token for token in spec.special_tokens if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        embeddings = model.get_input_embeddings().num_embeddings if model is not None else None
        if model is not None and len(tokenizer) > embeddings:
            model.resize_token_embeddings(len(tokenizer))
        elif model is None:
            warnings.warn(f"get_chat_template added {missing} to the tokenizer ({len(tokenizer)} tokens now); make "
                          f"sure the model's embeddings cover them (model.resize_token_embeddings(len(tokenizer)) or "
                          f"pass model=)", stacklevel=2)
    prefix = f"{{%- set default_system_message = {json.dumps(system_message)} -%}}" if system_message else ""
    tokenizer.chat_template = prefix + (_SYSTEM if system_message else "") + spec.template
    if map_eos_token:
        tokenizer.eos_token = spec.end_of_turn
        if model is not None and getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    return tokenizer


def train_on_responses_only(trainer_or_dataset, instruction_part: str, response_part: str, *, tokenizer=None):
    """Train on the responses only: labels are set to -100 everywhere except from the end of each
    ``response_part`` marker up to the next ``instruction_part`` marker (or the end of the sequence).

    Takes a TRL ``SFTTrainer`` (after construction, so its datasets are tokenized: ``train_dataset`` and
    ``eval_dataset`` are masked in place and the trainer returned) or a tokenized ``datasets.Dataset`` with an
    ``input_ids`` column (``tokenizer=`` needed; returned with its ``labels`` set). Existing ``-100`` labels stay.
    For templates without ``{% generation %}`` markers; the markers are matched as token sequences, so give them
    as the template renders them, e.g. ``"<|im_start|>user\\n"`` and ``"<|im_start|>assistant\\n"``.
    """
    is_trainer = hasattr(trainer_or_dataset, "train_dataset") and hasattr(trainer_or_dataset, "args")
    if is_trainer:
        tokenizer = tokenizer or trainer_or_dataset.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
    if tokenizer is None:
        raise TypeError("train_on_responses_only(dataset, ...) needs tokenizer= (a trainer brings its own)")
    if not instruction_part or not response_part:
        raise ValueError("train_on_responses_only needs non-empty instruction_part and response_part")
    instruction = tokenizer(instruction_part, add_special_tokens=False)["input_ids"]
    response = tokenizer(response_part, add_special_tokens=False)["input_ids"]

    def mask(dataset):
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            return {name: mask(part) for name, part in dataset.items()}
        columns = dataset.column_names or []
        if "input_ids" not in columns:
            raise ValueError("train_on_responses_only needs tokenized data (an input_ids column); build the trainer "
                             "first, or tokenize the dataset")
        masked = dataset.map(lambda row: {"labels": _mask_labels(row["input_ids"], row.get("labels"), instruction,
                                                                 response)})
        if not any(any(label != -100 for label in labels) for labels in masked["labels"]):
            raise ValueError(f"train_on_responses_only: response_part {response_part!r} (tokens {response}) was "
                             f"found in no row; give the marker exactly as the chat template renders it")
        return masked

    if not is_trainer:
        return mask(trainer_or_dataset)
    trainer = trainer_or_dataset
    trainer.train_dataset = mask(trainer.train_dataset)
    trainer.eval_dataset = mask(trainer.eval_dataset)
    return trainer


def _matches(ids, start, pattern) -> bool:
    return ids[start:start + len(pattern)] == pattern


def _mask_labels(input_ids, labels, instruction, response):
    labels = list(input_ids if labels is None else labels)
    ids = list(input_ids)
    out, training, i = [-100] * len(ids), False, 0
    while i < len(ids):
        if _matches(ids, i, response):
            training, i = True, i + len(response)
        elif _matches(ids, i, instruction):
            training, i = False, i + len(instruction)
        else:
            if training:
                out[i] = labels[i]
            i += 1
    return out
