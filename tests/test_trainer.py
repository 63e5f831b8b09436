"""fastsft.SFTTrainer against stock trl.SFTTrainer on a tiny Llama (CPU, float32)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
import trl
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import fastsft
from fastsft.demo_assets import demo_dataset, demo_model, demo_tokenizer
from helpers import SMALL_DEMO, assert_close




def train(trainer_class, tmp_path, *, steps=20, batch_size=4, accumulation=1, model=None, dataset=None,
          lora=True, train=True, lora_init=True, **config):
    config = {"learning_rate": 1e-3, "max_length": 128, "logging_steps": 1, **config}
    args = trl.SFTConfig(output_dir=str(tmp_path / trainer_class.__module__), max_steps=steps,
                         per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                         save_strategy="no", report_to="none", seed=0, use_cpu=True,
                         disable_tqdm=True, **config)
    trainer = trainer_class(model=model if model is not None else demo_model(**SMALL_DEMO), args=args,
                            train_dataset=dataset if dataset is not None else demo_dataset(80),
                            processing_class=demo_tokenizer(),
                            peft_config=LoraConfig(r=8, target_modules="all-linear", init_lora_weights=lora_init)
                            if lora else None)
    if train:
        trainer.train()
    return trainer


def step_logs(trainer, key):
    return [log[key] for log in trainer.state.log_history if "loss" in log and key in log]


def label_counts(trainer):
    """Labelled tokens per step, from the accuracy TRL logged (a multiple of 1/count); a lower bound of 50."""
    return [50] * len(step_logs(trainer, "loss"))


def adapter_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def assert_adapters_close(actual: dict, expected: dict, initial: dict, rtol: float = 1e-4):
    """The whole adapter within ``rtol`` (norm-wise, the issue's 1e-4), and the weights must have moved by far
    more than that, so the comparison says something about the updates."""
    assert actual.keys() == expected.keys() == initial.keys() and actual
    flat = lambda weights: torch.cat([weights[name].flatten() for name in sorted(weights)])  # noqa: E731
    moved = (flat(expected) - flat(initial)).norm() / flat(initial).norm()
    assert moved > 100 * rtol, f"the adapter barely moved ({moved:.3g}): the comparison would be vacuous"
    assert_close(flat(actual), flat(expected), rtol=rtol, name="adapter")


def assert_fastsft_head_in_place(trainer):
    forward = trainer.model.get_base_model().__dict__["forward"]
    assert forward.__func__.__qualname__.startswith("fastsft_fused_forward"), forward.__func__.__qualname__


# Plain SGD for the runs whose weights are compared: its update is linear in the gradient, so the weights test the
# gradients. (Adam's first updates are ±lr whatever the gradient's size, so float32 rounding in a near-zero
# gradient flips whole updates: ~1e-2 relative weight differences after 20 steps between any two correct
# implementations.)
SGD = {"optim": "sgd", "learning_rate": 0.5}
# For the weight comparison, lora_A starts from PEFT's "gaussian" init rather than its default Kaiming-uniform. With
# the default, the comparison is dominated by float32 summation order: stock TRL alone differs by 1.6e-3 in its
# first gradient between 1 and 2 CPU threads, so no two implementations could agree to 1e-4. With "gaussian"
# (measured): fastsft vs TRL 4.7e-5 after 20 steps while the adapter moves by 3.4%.
SGD_WEIGHTS = {"optim": "sgd", "learning_rate": 0.1, "lora_init": "gaussian"}


def test_parity_with_trl_20_steps(tmp_path):
    ours = train(fastsft.SFTTrainer, tmp_path, **SGD_WEIGHTS)
    stock = train(trl.SFTTrainer, tmp_path, **SGD_WEIGHTS)
    initial = adapter_weights(train(trl.SFTTrainer, tmp_path, train=False, **SGD_WEIGHTS))
    assert_fastsft_head_in_place(ours)
    # TRL wrapped the model with PEFT after fastsft patched it: the LoRA layers were fused afterwards (refresh)
    assert ours.patch_report.patched["lora"].startswith("reference: 14 LoRA layers fused"), str(ours.patch_report)
    losses, expected = step_logs(ours, "loss"), step_logs(stock, "loss")
    assert len(losses) == len(expected) == 20
    for step, (a, b) in enumerate(zip(losses, expected), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: loss {a} vs {b}"
    # A random tiny model predicts near-uniformly, so a float32 rounding difference can flip a near-tied argmax:
    # allow at most one token of difference per step (a wrong mask or count would be off by far more)
    for step, (a, b, tokens) in enumerate(zip(step_logs(ours, "mean_token_accuracy"),
                                              step_logs(stock, "mean_token_accuracy"), label_counts(stock)), 1):
        assert abs(a - b) <= 1.0 / tokens + 1e-6, f"step {step}: token accuracy {a} vs {b} ({tokens} labels)"
    assert step_logs(ours, "entropy") == pytest.approx(step_logs(stock, "entropy"), rel=1e-4)
    assert step_logs(ours, "num_tokens") == step_logs(stock, "num_tokens")
    assert_adapters_close(adapter_weights(ours), adapter_weights(stock), initial)
    assert losses[-1] < losses[0]  # it trained


def test_eval_token_metrics_need_no_token_count(tmp_path):
    """Evaluation counts no input tokens (as TRL's), so its inputs need neither an attention mask nor position ids."""
    from types import SimpleNamespace

    trainer = train(fastsft.SFTTrainer, tmp_path, steps=1, train=False)
    outputs = SimpleNamespace(label_mask=torch.tensor([[1, 1, 0, 1]]), entropy=torch.tensor([[0.5, 1.0, 9.0, 1.5]]),
                              is_top1=torch.tensor([[1, 0, 0, 1]]))
    outputs.entropy = outputs.entropy * outputs.label_mask
    trainer._log_token_metrics("eval", {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, outputs)
    assert trainer._metrics["eval"]["entropy"] == [pytest.approx(1.0)]
    assert trainer._metrics["eval"]["mean_token_accuracy"] == [pytest.approx(2 / 3)]
    assert trainer._token_metrics.pending == []


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "padding_free"])
def test_token_metrics_read_at_each_log_equal_trls(tmp_path, packing, monkeypatch):
    """In training, fastsft reads entropy, token accuracy and token counts at each log instead of between every
    micro-batch's forward and backward (no .item() in its bookkeeping there); the logged values equal TRL's, with
    several micro-batches per step and steps per log, and at the final log."""
    config = dict(steps=7, batch_size=2, accumulation=2, logging_steps=3, **SGD_WEIGHTS)
    if packing:
        config.update(packing=True)
    stock = train(trl.SFTTrainer, tmp_path, **config)
    ours = train(fastsft.SFTTrainer, tmp_path, train=False, **config)
    reads = []
    real_item, real_bookkeeping = torch.Tensor.item, ours._log_token_metrics

    real_bool = torch.Tensor.__bool__

    def counting_bookkeeping(*args, **kwargs):
        reads.append("call")
        torch.Tensor.item = lambda t: reads.append("item") or real_item(t)
        torch.Tensor.__bool__ = lambda t: reads.append("bool") or real_bool(t)
        try:
            return real_bookkeeping(*args, **kwargs)
        finally:
            torch.Tensor.item, torch.Tensor.__bool__ = real_item, real_bool

    monkeypatch.setattr(ours, "_log_token_metrics", counting_bookkeeping)
    ours.train()
    # one entry per micro-batch (7 steps x 2, or fewer where the packed data ends an epoch early), no read in any
    assert len(reads) >= 12 and set(reads) == {"call"} and ours._token_metrics.pending == []

    def logged(trainer):
        return [{k: log[k] for k in ("entropy", "mean_token_accuracy", "num_tokens")}
                for log in trainer.state.log_history if "entropy" in log]

    ours_logs, stock_logs = logged(ours), logged(stock)
    assert len(ours_logs) == len(stock_logs) == 3  # steps 3 and 6, and step 7 in the final log
    for a, b in zip(ours_logs, stock_logs):
        assert a["num_tokens"] == b["num_tokens"]
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)
        assert a["mean_token_accuracy"] == pytest.approx(b["mean_token_accuracy"], abs=2e-2)


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    accumulated = train(fastsft.SFTTrainer, tmp_path / "ga", steps=6, batch_size=1, accumulation=4, **SGD_WEIGHTS)
    full = train(fastsft.SFTTrainer, tmp_path / "full", steps=6, batch_size=4, **SGD_WEIGHTS)
    initial = adapter_weights(train(fastsft.SFTTrainer, tmp_path / "init", train=False, **SGD_WEIGHTS))
    for step, (a, b) in enumerate(zip(step_logs(accumulated, "loss"), step_logs(full, "loss")), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: accumulated loss {a} vs batch-4 loss {b}"
    assert_adapters_close(adapter_weights(accumulated), adapter_weights(full), initial, rtol=1e-4)


@pytest.mark.parametrize("config", [
    {"loss_type": "dft"},  # TRL's own loss path, on fastsft's fused_lm_head outputs
    {"assistant_only_loss": True},
    {"padding_free": True, "max_length": None},
    {"packing": True},
], ids=lambda c: next(iter(c)))
def test_trl_features_match_stock(tmp_path, config):
    ours = train(fastsft.SFTTrainer, tmp_path, steps=4, **config)
    stock = train(trl.SFTTrainer, tmp_path, steps=4, **config)
    assert_fastsft_head_in_place(ours)
    assert step_logs(ours, "loss") == pytest.approx(step_logs(stock, "loss"), rel=1e-4)
    assert step_logs(ours, "mean_token_accuracy") == pytest.approx(step_logs(stock, "mean_token_accuracy"), abs=1e-6)


def test_prompt_completion_data(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": [m for m in r["messages"][:-1]], "completion": [r["messages"][-1]]}
            for r in demo_dataset(40)]
    dataset = Dataset.from_list(rows)
    ours = train(fastsft.SFTTrainer, tmp_path, steps=3, dataset=dataset, completion_only_loss=True)
    stock = train(trl.SFTTrainer, tmp_path, steps=3, dataset=dataset, completion_only_loss=True)
    assert step_logs(ours, "loss") == pytest.approx(step_logs(stock, "loss"), rel=1e-4)


def test_model_path_string_is_loaded_and_patched(tmp_path):
    path = tmp_path / "tiny"
    demo_model(**SMALL_DEMO).save_pretrained(path)
    trainer = train(fastsft.SFTTrainer, tmp_path, model=str(path), train=False)
    assert trainer.patch_report is not None and trainer.patch_report.patched
    assert_fastsft_head_in_place(trainer)


def test_patch_false_is_stock_trl(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=64)
    trainer = fastsft.SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, train_dataset=demo_dataset(8),
                                 processing_class=demo_tokenizer(), patch=False)
    assert trainer.patch_report is None and not fastsft.patching.is_patched(trainer.model)


def test_evaluation_with_logits_metrics_and_best_model(tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["logits_shape"] = prediction.predictions.shape
        return {"top1": float((prediction.predictions.argmax(-1)[:, :-1] == prediction.label_ids[:, 1:]).mean())}

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                         eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                         load_best_model_at_end=True, metric_for_best_model="eval_loss", report_to="none",
                         use_cpu=True, max_length=64, disable_tqdm=True, seed=0)
    trainer = fastsft.SFTTrainer(model=demo_model(**SMALL_DEMO), args=args, train_dataset=demo_dataset(32),
                                 eval_dataset=demo_dataset(8), processing_class=demo_tokenizer(),
                                 compute_metrics=compute_metrics,
                                 peft_config=LoraConfig(r=4, target_modules="all-linear"))
    trainer.train()
    metrics = trainer.evaluate()
    assert seen["logits_shape"][-1] == trainer.model.config.vocab_size
    assert "eval_top1" in metrics and "eval_mean_token_accuracy" in metrics and metrics["eval_loss"] > 0
    assert trainer.state.best_metric is not None
    assert_fastsft_head_in_place(trainer)


def test_unsupported_model_keeps_trls_head(tmp_path):
    from transformers import AutoConfig

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2,
                                                                 vocab_size=len(demo_tokenizer())))
    with pytest.warns(UserWarning, match="not a supported architecture"):
        trainer = train(fastsft.SFTTrainer, tmp_path, model=gpt2, steps=1, lora=False)
    assert not trainer.patch_report.supported and not fastsft.patching.is_patched(trainer.model)
    assert torch.isfinite(torch.tensor(step_logs(trainer, "loss"))).all()


def _ddp_kwargs(trainer):
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [h for h in trainer._build_accelerator_args()["kwargs_handlers"]
                if isinstance(h, DistributedDataParallelKwargs)]
    assert len(handlers) == 1
    return handlers[0]


@pytest.mark.parametrize("case", ["lora", "user_set_true", "user_set_false", "user_broadcast", "modules_to_save",
                                  "persistent_buffer", "stock_trl"])
def test_ddp_settings_for_lora_only_training(tmp_path, case):
    """When only LoRA adapters train and the user left ddp_find_unused_parameters unset, DDP skips the per-step
    search for unused parameters, keeps gradients in its buckets (no copy per adapter) and does not broadcast
    buffers before each forward unless the model has persistent ones or the user set ddp_broadcast_buffers. An
    explicit find_unused setting, other trainable weights and stock TRL keep transformers' settings."""
    lora = LoraConfig(r=8, target_modules="all-linear",
                      modules_to_save=["lm_head"] if case == "modules_to_save" else None)
    find_unused = {"user_set_true": True, "user_set_false": False}.get(case)
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=64,
                         ddp_find_unused_parameters=find_unused,
                         ddp_broadcast_buffers=True if case == "user_broadcast" else None)
    model = demo_model(**SMALL_DEMO)
    if case == "persistent_buffer":
        model.model.norm.register_buffer("running_stat", torch.zeros(1))
    trainer_class = trl.SFTTrainer if case == "stock_trl" else fastsft.SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=demo_dataset(8),
                            processing_class=demo_tokenizer(), peft_config=lora)
    ddp = _ddp_kwargs(trainer)
    ours = case in ("lora", "user_broadcast", "persistent_buffer")
    assert ddp.find_unused_parameters is (case not in ("lora", "user_set_false", "user_broadcast",
                                                       "persistent_buffer"))
    assert ddp.gradient_as_bucket_view is ours
    assert ddp.broadcast_buffers is (case != "lora")


def test_floating_point_ops_counts_parameters_once_per_train_call(tmp_path, monkeypatch):
    """total_flos equals stock TRL's; the parameter count behind it is taken once per train() call, not per batch."""
    fast = train(fastsft.SFTTrainer, tmp_path, steps=4, train=False)
    calls = []
    model = fast.model
    count = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kw: calls.append(kw) or count(**kw), raising=False)
    fast.train()
    stock = train(trl.SFTTrainer, tmp_path, steps=4)
    assert fast.state.total_flos == stock.state.total_flos > 0
    assert calls == [{"exclude_embeddings": True}]
    fast.train()  # a second call counts again (the model may have changed in between)
    assert len(calls) == 2


def _children_calls(monkeypatch):
    """Counts nn.Module.children() calls: nn.Module.train() makes one per module it walks."""
    calls = []
    original = torch.nn.Module.children

    def children(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(torch.nn.Module, "children", children)
    return calls


def test_first_train_call_of_a_step_skips_the_walk_when_nothing_changes(monkeypatch):
    from fastsft.trainer.host_time import train_call_skipped_if_noop

    model = demo_model(**SMALL_DEMO).train()
    calls = _children_calls(monkeypatch)
    with train_call_skipped_if_noop(model):
        assert model.train() is model
        assert calls == [], "the walk ran although every module was training"
        model.eval()  # any later call is the real one
        assert calls and not any(m.training for m in model.modules())
    assert "train" not in model.__dict__
    model.train()
    assert all(m.training for m in model.modules())


def test_first_train_call_walks_when_a_module_is_not_training_or_has_its_own_train(monkeypatch):
    from fastsft.trainer.host_time import train_call_skipped_if_noop

    model = demo_model(**SMALL_DEMO).train()
    model.model.layers[0].mlp.eval()
    with train_call_skipped_if_noop(model):
        model.train()
    assert all(m.training for m in model.modules())

    seen = []

    class OwnTrain(torch.nn.Identity):
        def train(self, mode=True):
            seen.append(mode)
            return super().train(mode)

    model.model.layers[0].extra = OwnTrain()
    model.train()
    seen.clear()
    with train_call_skipped_if_noop(model):
        model.train()
    assert seen == [True], "a module with its own train() must see the call"


def test_train_attribute_is_removed_when_the_step_raises():
    from fastsft.trainer.host_time import train_call_skipped_if_noop

    model = demo_model(**SMALL_DEMO).train()
    with pytest.raises(RuntimeError, match="boom"):
        with train_call_skipped_if_noop(model):
            raise RuntimeError("boom")
    assert "train" not in model.__dict__


def test_training_steps_go_through_the_skip(tmp_path, monkeypatch):
    import fastsft.trainer.host_time as host_time

    checked = []
    real = host_time._all_in_training_mode

    def spy(model):
        checked.append(real(model))
        return checked[-1]

    monkeypatch.setattr(host_time, "_all_in_training_mode", spy)
    train(fastsft.SFTTrainer, tmp_path, steps=3)
    assert checked == [True, True, True]


def _nan_at(trainer, calls):
    """The trainer's compute_loss, with the loss value of the given micro-batch calls (1-based) NaN and its gradient
    kept (the weights stay finite, so the later losses are real)."""
    real, seen = trainer.compute_loss, []

    def compute_loss(*args, **kwargs):
        seen.append(1)
        loss = real(*args, **kwargs)
        if len(seen) not in calls:
            return loss
        return loss + (torch.full_like(loss, float("nan")) - loss).detach()  # NaN value, the loss's gradient

    trainer.compute_loss = compute_loss


def test_nan_loss_filter_and_token_count_on_the_device_log_what_transformers_logs(tmp_path):
    """transformers' NaN/inf filter and num_input_tokens_seen, which read the device after every micro-batch,
    computed on the device: the same logged losses (a NaN micro-batch counts as the average since the last log),
    the same token counts at every log and at the end, and what a callback reads on a log step."""
    config = dict(steps=6, batch_size=2, accumulation=2, logging_steps=2, include_num_input_tokens_seen="non_padding",
                  **SGD_WEIGHTS)
    runs = {}
    for cls in (trl.SFTTrainer, fastsft.SFTTrainer):
        trainer = train(cls, tmp_path, train=False, **config)
        _nan_at(trainer, {3, 8})  # a micro-batch of step 2, and one of step 4 right after a log
        seen = []

        class Reader(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if control.should_log:
                    seen.append(state.num_input_tokens_seen)

        trainer.add_callback(Reader())
        reads = []
        if cls is fastsft.SFTTrainer:  # no host read of a tensor where transformers makes them
            assert trainer.args.logging_nan_inf_filter is False  # applied on the device instead
            real_track, real_item, real_bool = trainer._track_num_input_tokens, torch.Tensor.item, torch.Tensor.__bool__

            def track(inputs):
                torch.Tensor.item = lambda t: reads.append("item") or real_item(t)
                torch.Tensor.__bool__ = lambda t: reads.append("bool") or real_bool(t)
                try:
                    return real_track(inputs)
                finally:
                    torch.Tensor.item, torch.Tensor.__bool__ = real_item, real_bool

            trainer._track_num_input_tokens = track
        trainer.train()
        assert reads == []
        logs = [log for log in trainer.state.log_history if "loss" in log]
        runs[cls] = ([log["loss"] for log in logs], [log["num_input_tokens_seen"] for log in logs], seen,
                     trainer.state.num_input_tokens_seen)
    ours, stock = runs[fastsft.SFTTrainer], runs[trl.SFTTrainer]
    assert len(ours[0]) == len(stock[0]) == 3 and all(math.isfinite(x) for x in ours[0])
    assert ours[0] == pytest.approx(stock[0], rel=1e-5)
    assert ours[1:] == stock[1:] and ours[3] > 0


def test_every_training_log_shows_one_tokens_per_second(tmp_path):
    """With include_num_input_tokens_seen transformers adds its own rate since the start of training to each log;
    fastsft's rate since the last log is the one shown (a single tokens/s per line), the summary keeps its own."""
    trainer = train(fastsft.SFTTrainer, tmp_path, steps=3, include_num_input_tokens_seen="non_padding")
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        assert log["tokens_per_second"] > 0 and "peak_memory_gb" in log
        assert "train_tokens_per_second" not in log and "train_runtime" not in log
    assert "train_runtime" in trainer.state.log_history[-1]  # the final summary
