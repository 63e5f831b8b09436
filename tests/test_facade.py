"""fastsft.FastLanguageModel and the old-name compatibility of fastsft.SFTConfig / fastsft.SFTTrainer."""

from __future__ import annotations

import warnings

import pytest
import torch
import trl

import fastsft
from fastsft import FastLanguageModel, SFTConfig, SFTTrainer
from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
from helpers import SMALL_DEMO





def test_from_pretrained(model_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=96, dtype=None)
    assert model.dtype == (torch.float32 if not torch.cuda.is_available() else model.dtype)
    assert tokenizer.model_max_length == 96 and model.max_seq_length == 96
    assert model.fastsft_patch_report.patched and fastsft.patching.is_patched(model)


@pytest.mark.parametrize("kwargs, named", [
    ({"load_in_8bit": True}, "load_in_8bit=True"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling"),
    ({"fast_inference": True}, "fast_inference=True"),
])
def test_from_pretrained_unsupported_arguments_named(model_dir, kwargs, named):
    with pytest.raises(TypeError, match=named):
        FastLanguageModel.from_pretrained(model_dir, **kwargs)


def test_from_pretrained_rejects_remote_code_and_split_device_maps(model_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        FastLanguageModel.from_pretrained(model_dir, trust_remote_code=True)
    with pytest.raises(ValueError, match="device_map"):
        FastLanguageModel.from_pretrained(model_dir, device_map={"model.layers.0": 0, "lm_head": "cpu"})
    # the notebooks' "off" values are accepted
    FastLanguageModel.from_pretrained(model_dir, load_in_8bit=False, full_finetuning=False, device_map="auto")


def peft(model_dir, **kwargs):
    model, _ = FastLanguageModel.from_pretrained(model_dir, max_seq_length=64)
    return FastLanguageModel.get_peft_model(model, **kwargs)


def test_get_peft_model_config(model_dir):
    model = peft(model_dir, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True,
                 use_gradient_checkpointing=False)
    config = model.peft_config["default"]
    assert config.r == 8 and config.lora_alpha == 16 and set(config.target_modules) == {"q_proj", "v_proj"}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # rsLoRA scaling
    assert not hasattr(model.base_model.model.model.layers[0].self_attn.k_proj, "lora_A")
    assert model.fastsft_patch_report is not None
    # default targets: all seven projections
    default = peft(model_dir, use_gradient_checkpointing=False).peft_config["default"]
    assert set(default.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_random_state_seeds_the_adapter(model_dir):
    def lora_a(seed):
        model = peft(model_dir, random_state=seed, use_gradient_checkpointing=False)
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    torch.manual_seed(1)
    first = lora_a(3407)
    torch.manual_seed(2)
    assert torch.equal(first, lora_a(3407))
    assert not torch.equal(first, lora_a(0))


@pytest.mark.parametrize("kwargs, error, named", [
    ({"use_gradient_checkpointing": "yes"}, ValueError, "use_gradient_checkpointing"),
    ({"loftq_config": {"loftq_bits": 4}}, NotImplementedError, "loftq_config"),
    ({"temporary_location": "/tmp/x"}, TypeError, "temporary_location"),
])
def test_get_peft_model_unsupported(model_dir, kwargs, error, named):
    with pytest.raises(error, match=named) as raised:
        peft(model_dir, **kwargs)
    assert "issue" not in str(raised.value)  # the library's own words, not a tracker reference


def test_get_peft_model_passes_lora_config_fields_and_refuses_double_wrap(model_dir):
    model = peft(model_dir, use_dora=True, use_gradient_checkpointing=False)
    assert model.peft_config["default"].use_dora
    with pytest.raises(ValueError, match="already has a PEFT adapter"):
        FastLanguageModel.get_peft_model(model)


def lora_grads(model):
    batch = demo_tokenizer()(["What is 11 minus 0? 11 minus 0 is 11.", "Hugo has three white foxes."],
                             return_tensors="pt", padding=True)
    model.train()
    model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_gradient_checkpointing_modes_give_the_same_gradients(model_dir):
    """True (reentrant) and "unsloth" (non-reentrant) checkpoint the decoder layers and change no gradient."""
    grads = {}
    for mode in (False, True, "unsloth"):
        model = peft(model_dir, use_gradient_checkpointing=mode, init_lora_weights="gaussian")
        base = model.get_base_model()
        assert base.is_gradient_checkpointing == bool(mode)
        if mode:
            assert base.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] == (mode is True)
        grads[mode] = lora_grads(model)
    # B starts at zero (A's gradients are zero), so B's gradients are the ones that say something
    assert grads[False] and all(g.abs().sum() > 0 for n, g in grads[False].items() if "lora_B" in n)
    for mode in (True, "unsloth"):
        for name, expected in grads[False].items():
            torch.testing.assert_close(grads[mode][name], expected, rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")


def test_for_training_and_inference(model_dir):
    model = peft(model_dir)
    assert FastLanguageModel.for_inference(model) is model and not model.training and model.config.use_cache
    FastLanguageModel.for_training(model)
    assert model.training


# --- old argument names ------------------------------------------------------------------------------------------


def future_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning)]


def test_sftconfig_old_names(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config = SFTConfig(output_dir=str(tmp_path), max_seq_length=77, evaluation_strategy="steps", eval_steps=5,
                           no_cuda=True, overwrite_output_dir=True, report_to="none")
    messages = future_warnings(record)
    assert len(messages) == 4, messages
    for old in ("max_seq_length", "evaluation_strategy", "no_cuda", "overwrite_output_dir"):
        assert sum(f"({old}=" in m for m in messages) == 1
    assert isinstance(config, trl.SFTConfig) and isinstance(config, SFTConfig)
    assert config.max_length == 77 and config.eval_strategy == "steps" and config.use_cpu
    assert not hasattr(config, "max_seq_length")


def test_sftconfig_old_and_new_name_together_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="max_seq_length.*max_length"):
        SFTConfig(output_dir=str(tmp_path), max_seq_length=64, max_length=128)
    with pytest.raises(TypeError, match="TENSORBOARD_LOGGING_DIR"):
        SFTConfig(output_dir=str(tmp_path), logging_dir="logs")
    with pytest.raises(TypeError, match="not_an_argument"):
        SFTConfig(output_dir=str(tmp_path), not_an_argument=1)


def test_sftconfig_without_old_names_matches_trl(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ours = SFTConfig(output_dir=str(tmp_path), max_length=64, report_to="none", use_cpu=True)
    stock = trl.SFTConfig(output_dir=str(tmp_path), max_length=64, report_to="none", use_cpu=True)
    assert ours.to_dict() == stock.to_dict()


def test_trainer_moves_config_fields_into_a_copy_of_args(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, tokenizer=demo_tokenizer(),
                             train_dataset=demo_dataset(8), max_seq_length=40, packing=False,
                             dataset_kwargs={"skip_prepare_dataset": False})
    messages = future_warnings(record)
    assert len(messages) == 4, messages  # tokenizer, max_seq_length, packing, dataset_kwargs
    assert trainer.args.max_length == 40 and trainer.args is not args and args.max_length == 1024
    assert trainer.processing_class is not None
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) <= 40  # the mapped value was used


def test_trainer_old_and_new_tokenizer_together_is_an_error(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="tokenizer.*processing_class"):
        SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, tokenizer=demo_tokenizer(),
                   processing_class=demo_tokenizer(), train_dataset=demo_dataset(8))
