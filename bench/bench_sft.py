"""End-to-end SFT: stock TRL, TRL with Liger, fastsft and Unsloth, each in its own process on the same GPU.

    python -m bench.bench_sft --model llama-1b --providers trl,trl-liger,fastsft --packing --out bench/results
    python -m bench.bench_sft --model llama-8b --packing --seq-len 8192 --batch 1 --qlora
    python -m bench.bench_sft --model llama-8b --packing --unsloth-site /tmp/usite    # Unsloth from its own site

The setup: random-init weights in the shape of a real model, bf16, LoRA r=16,
alpha 16, dropout 0 on q,k,v,o,gate,up,down, AdamW, SDPA attention, non-reentrant gradient checkpointing;
synthetic chat rows (user 20-300 words, assistant 50-1200 words, at 1.3 tokens a word) pre-tokenized with an
assistant mask, so only assistant tokens carry the loss. Tokens/s counts non-padding input tokens after the
warm-up steps, with the GPU synchronized at each step's end. Peak memory is the largest allocation of the run.
The first steps' losses are recorded: the providers must agree on them. ``--qlora`` saves the random model once
and has every provider load it in 4 bits (bitsandbytes NF4, double quantization, bf16 compute: the config of
``fastsft.load(..., load_in_4bit=True)``).

``unsloth`` is Unsloth set up as its documentation has a new user do it: ``FastLanguageModel.from_pretrained`` of
the saved random model (bf16; in 4 bits with ``--qlora``, Unsloth's NF4 config being the one above),
``FastLanguageModel.get_peft_model`` with the same LoRA, ``use_gradient_checkpointing="unsloth"`` (its offloaded
checkpointing; False with ``--no-checkpointing``) and ``random_state=0`` (the seed TRL sets before PEFT draws the
others' adapters: the same initial adapters), then TRL's ``SFTTrainer`` with the same SFTConfig, rows, tokenizer and
step clock. Unsloth pins an older trl and datasets, so it runs from a site directory of its own (``--unsloth-site``
or ``FASTSFT_UNSLOTH_SITE``), put first on its process's PYTHONPATH, from which every other entry holding a ``trl``
package is removed; its row records that process's versions. Without a site and with no importable ``unsloth`` its
row says it was skipped, and why.

Utilization (:func:`flop_per_token`), against the card's bf16 matmul rate measured in the same run (8192^3,
before the providers start):
- ``mfu`` counts model FLOPs per token: forward 2·N and input gradients 2·N for the frozen base weights (N the
  parameters of every linear layer and of the LM head, computed on every token; no weight gradients), 6·r·(in +
  out) for each LoRA adapter (forward, input and weight gradients), and causal attention over the pairs inside
  each example (forward 4·head_dim·heads per pair and layer, backward 2.5x the forward), with the example lengths
  of the generated data standing in for the batches actually timed (packing keeps examples apart).
- ``hfu`` adds what gradient checkpointing recomputes: the decoder layers' forward once more (2·N of the layers,
  the adapters' and attention's forward). This is the checkpointed FLOP limit (Llama-3.1-8B at 2048 tokens: about
  46 GFLOP per token, 32 without the recomputation); without checkpointing hfu = mfu.
Embeddings, norms, activations, the optimizer and NF4 dequantization count nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab, tie embeddings)
    "tiny": (64, 128, 2, 4, 2, 512, False),
    "llama-1b": (2048, 8192, 16, 32, 8, 128_256, True),
    "llama-8b": (4096, 14336, 32, 32, 8, 128_256, False),
}
# Unsloth last: when a run is stopped at a time cap, the rows written before (after every provider) are kept.
PROVIDERS = ("trl", "trl-liger", "fastsft", "unsloth")
# also runnable: fastsft with its decoder layers eager (no captured graphs, the layer inputs on the device), the
# step the graphs replace; fastsft with the captured layers' inputs kept on the device, not offloaded; and fastsft
# with the captured backward graphs recomputing the MLP in full, as the eager layers do
EXTRA_PROVIDERS = ("fastsft-eager", "fastsft-on-device", "fastsft-full-recompute")
FASTSFT_PROVIDERS = ("fastsft", *EXTRA_PROVIDERS)
UNSLOTH_SITE_ENV = "FASTSFT_UNSLOTH_SITE"
UNSLOTH_VERSIONS = ("unsloth", "unsloth-zoo", "trl", "transformers", "peft", "datasets", "bitsandbytes")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_rows(n: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    """Chat-shaped rows of random ids: [bos] user [sep] assistant [eos], the assistant part (and eos) masked in."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        user = int(rng.integers(20, 301) * 1.3)
        assistant = int(rng.integers(50, 1201) * 1.3)
        prompt = [1] + rng.integers(8, vocab, user).tolist() + [3]
        answer = rng.integers(8, vocab, assistant).tolist() + [2]
        ids = (prompt + answer)[:max_length]
        mask = ([0] * len(prompt) + [1] * len(answer))[:max_length]
        rows.append({"input_ids": ids, "assistant_masks": mask})
    return rows


def make_tokenizer(vocab: int):
    """A word-level tokenizer of the model's vocabulary size: the data is pre-tokenized, the trainer only needs
    the special tokens (no download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<sep>": 3} | {f"t{i}": i for i in range(4, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def flop_per_token(name: str, lengths: list[int], *, rank: int = 16, checkpointing: bool = True) -> dict:
    """Model and hardware FLOPs per trained token of LoRA (rank ``rank``) on every decoder linear layer of model
    ``name``, frozen base, over examples of ``lengths`` tokens (see the module docstring)."""
    hidden, inter, layers, heads, kv, vocab, _ = MODELS[name]
    head_dim = hidden // heads
    shapes = [(hidden, heads * head_dim), (hidden, kv * head_dim), (hidden, kv * head_dim),
              (heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    base = layers * sum(i * o for i, o in shapes)
    adapters = layers * rank * sum(i + o for i, o in shapes)
    pairs_per_token = sum(n * (n + 1) // 2 for n in lengths) / sum(lengths)
    attention = layers * 4 * head_dim * heads * pairs_per_token  # forward
    model = 4 * (base + hidden * vocab) + 6 * adapters + 3.5 * attention
    recompute = 2 * base + 2 * adapters + attention if checkpointing else 0
    return {"model": model, "hardware": model + recompute, "attention_pairs_per_token": pairs_per_token}


def make_model(name: str, device: str, checkpoint: Path | None = None):
    """The random-init model; from ``checkpoint`` in 4-bit NF4 when given (``--qlora``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if checkpoint is not None:
        from fastsft.loading import _nf4_config  # the BitsAndBytesConfig of fastsft.load(load_in_4bit=True)

        return LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=_nf4_config(), dtype=torch.bfloat16,
                                                device_map={"": device})

    hidden, inter, layers, heads, kv, vocab, tie = MODELS[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=tie, max_position_embeddings=8192, rope_theta=500_000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


class _StepClock:
    """Trainer callback: wall time and input tokens seen at the end of every step (GPU synchronized)."""

    def __new__(cls):
        import torch
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.marks = []

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen)))

        return Clock()


def unsloth_model(a: argparse.Namespace, device: str):
    """Unsloth's model: the random model saved at ``a.checkpoint`` loaded by ``FastLanguageModel`` (4 bits with
    ``a.qlora``), with its LoRA adapters on (see the module docstring)."""
    import torch
    from unsloth import FastLanguageModel

    if a.checkpoint is None:
        raise ValueError("the unsloth provider loads the random model from a saved checkpoint (--checkpoint)")
    # the tokenizer it loads from the checkpoint is make_tokenizer's; the trainer gets the very one the others get
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(a.checkpoint), max_seq_length=a.max_length,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32, load_in_4bit=a.qlora)
    rank = getattr(a, "rank", 16)
    return FastLanguageModel.get_peft_model(
        model, r=rank, lora_alpha=rank, lora_dropout=0, target_modules=LORA_TARGETS, bias="none",
        use_gradient_checkpointing="unsloth" if a.checkpointing else False, random_state=0)


def make_trainer(provider: str, a: argparse.Namespace, output_dir: str, callbacks: list, rows: list | None = None):
    """The provider's trainer on a random-init model of ``a.model`` and synthetic rows (see the module docstring),
    or ``rows`` when given; LoRA rank ``a.rank`` (alpha equal to it) when the namespace has one, else 16."""
    if provider == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers, peft and trl when imported)
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fastsft_options, config_options = {}, {}
    if provider in FASTSFT_PROVIDERS:
        from fastsft import SFTConfig, SFTTrainer

        capture = getattr(a, "capture_options", None) or {}
        if provider == "fastsft-full-recompute":
            capture = {**capture, "mlp_gradients_only": False}
        fastsft_options["capture_layers"] = False if provider == "fastsft-eager" else (capture or True)
        if provider == "fastsft-on-device":
            config_options["gradient_checkpointing_offload"] = False
    else:
        from trl import SFTConfig, SFTTrainer
    rank = getattr(a, "rank", 16)
    if provider == "unsloth":
        model, lora = unsloth_model(a, device), None  # its adapters are on already
    else:
        model = make_model(a.model, device, a.checkpoint)
        lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                          task_type="CAUSAL_LM")
    steps = a.warmup + a.steps
    if rows is None:
        rows = make_rows(steps * a.batch * rows_per_sequence(a) + 8, model.config.vocab_size, a.max_length)
    data = Dataset.from_list(rows)
    args = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=a.batch, learning_rate=1e-4,
        logging_steps=1, report_to="none", save_strategy="no", bf16=device == "cuda", use_cpu=device == "cpu",
        gradient_checkpointing=a.checkpointing,
        # Unsloth's checkpointing is its own (get_peft_model's use_gradient_checkpointing)
        gradient_checkpointing_kwargs={"use_reentrant": False} if a.checkpointing and provider != "unsloth" else None,
        packing=a.packing, max_length=a.max_length, include_num_input_tokens_seen="non_padding",
        use_liger_kernel=provider == "trl-liger", dataloader_num_workers=0, seed=0, data_seed=0,
        optim=getattr(a, "optim", DEFAULT_OPTIM), **config_options)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=make_tokenizer(model.config.vocab_size), peft_config=lora,
                         callbacks=callbacks, **fastsft_options)
    if getattr(a, "tiled_mlp", False):  # bench_context's offload-tiled mode (fastsft only)
        from fastsft import enable_tiled_mlp

        enable_tiled_mlp(trainer.model)
    return trainer


def run_one(provider: str, a: argparse.Namespace) -> dict:
    """One provider's run in this process."""
    if provider == "unsloth":
        import unsloth  # noqa: F401  (before the step clock imports transformers)
    import torch

    clock = _StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(provider, a, out, [clock])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = clock.marks[a.warmup - 1:]
    (s0, t0, n0), (s1, t1, n1) = timed[0], timed[-1]
    result = {"provider": provider, "model": a.model, "packing": a.packing, "qlora": a.qlora, "batch": a.batch,
              "max_length": a.max_length, "checkpointing": a.checkpointing, "steps_timed": s1 - s0,
              "tokens_per_s": (n1 - n0) / (t1 - t0), "first_losses": losses[:5], **step_times(timed)}
    if torch.cuda.is_available():
        result["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        # CUDA graphs replay in pools the allocator counts as reserved, not allocated: both are shown
        result["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    if provider == "unsloth":  # its own site's versions, not the run's (the environment of the result file)
        result["versions"] = package_versions(UNSLOTH_VERSIONS)
    if provider in FASTSFT_PROVIDERS:
        from fastsft import backends

        if trainer.memory_report is not None:
            result["memory"] = trainer.memory_report.as_dict()
        if trainer.captured_layers is not None:
            result["captured_layers"] = trainer.captured_layers.summary()
        # a kernel that failed fell back to a slower backend: the row must say so, not just a warning in a log
        result["fallbacks"] = backends.fallbacks()
        unavailable = sorted(op for op, why in backends.report().items() if why.get("triton@cuda", "ok") != "ok")
        if unavailable:
            result["fallbacks"]["triton unavailable"] = ", ".join(unavailable)
    return result


def step_times(marks: list[tuple[int, float, int]]) -> dict:
    """Each timed step's milliseconds and its tokens/s, from consecutive (step, seconds, tokens seen) marks: the
    overall tokens/s hides whether a run was steady or had one slow step (a stall, a new shape to tune for)."""
    ms = [(b[1] - a[1]) * 1e3 for a, b in zip(marks, marks[1:])]
    rates = [(b[2] - a[2]) / (b[1] - a[1]) for a, b in zip(marks, marks[1:])]
    if not ms:
        return {}
    return {"step_ms": [round(m, 2) for m in ms], "step_ms_median": statistics.median(ms), "step_ms_max": max(ms),
            "median_step_tokens_per_s": statistics.median(rates)}


def rows_per_sequence(a: argparse.Namespace) -> int:
    """Examples a training sequence takes: one, or as many as packing fits (they average about 1,000 tokens)."""
    return max(3, math.ceil(a.max_length / 700)) if a.packing else 1


def matmul_tflops() -> float | None:
    """The card's bf16 matmul rate, measured in a child process (so that this one never holds a CUDA context
    beside the providers'); None without a GPU or when the measurement fails."""
    out = _in_child("from bench.bench_linear_cross_entropy import matmul_tflops as m; import torch; "
                    "print(m() if torch.cuda.is_available() else None)")
    try:
        return float(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _in_child(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
    return proc.stdout


def save_random_checkpoint(name: str, path: Path, max_positions: int | None = None) -> None:
    """The random-init model (bf16 on a GPU) and its tokenizer written once, for every provider to load in 4 bits
    and for Unsloth to load; ``max_positions`` raises the config's ``max_position_embeddings`` (plain RoPE has no
    other length limit)."""
    import torch

    model = make_model(name, "cuda" if torch.cuda.is_available() else "cpu")
    if max_positions is not None:
        model.config.max_position_embeddings = max_positions
    model.save_pretrained(path)
    make_tokenizer(model.config.vocab_size).save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def package_versions(names) -> dict:
    import importlib.metadata

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def unsloth_env(site: Path, environ) -> dict:
    """The environment of Unsloth's process: ``site`` first on PYTHONPATH, and no other entry that holds a ``trl``
    package (the newer trl of the other providers: Unsloth pins an older one, which its site holds)."""
    site = site.resolve()
    rest = [entry for entry in environ.get("PYTHONPATH", "").split(os.pathsep)
            if entry and Path(entry).resolve() != site and not (Path(entry) / "trl").is_dir()]
    return {**environ, "PYTHONPATH": os.pathsep.join([str(site), *rest])}


def unsloth_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def utilization(row: dict, flop: dict, tflops: float | None) -> dict:
    """GFLOP per token and, with a measured matmul rate, MFU and HFU of a provider's row."""
    out = {"gflop_per_token": flop["model"] / 1e9, "hardware_gflop_per_token": flop["hardware"] / 1e9}
    if tflops and "tokens_per_s" in row:
        out["mfu"] = flop["model"] * row["tokens_per_s"] / (tflops * 1e12)
        out["hfu"] = flop["hardware"] * row["tokens_per_s"] / (tflops * 1e12)
    return out


# The committed results use multi-tensor ("foreach") AdamW; transformers' own default since torch 2.8 is the fused
# one (adamw_torch_fused), whose step is a few kernels with no per-parameter Python on the host.
DEFAULT_OPTIM = "adamw_torch"


def add_optim_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optim", default=DEFAULT_OPTIM,
                        help=f"transformers' optim name (default {DEFAULT_OPTIM}; result names gain it otherwise)")


def optim_suffix(a: argparse.Namespace) -> str:
    optim = getattr(a, "optim", DEFAULT_OPTIM)
    return "" if optim == DEFAULT_OPTIM else f"_{optim}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="llama-1b")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help=f"comma-separated, of {', '.join(PROVIDERS + EXTRA_PROVIDERS)} (default: "
                             f"{','.join(PROVIDERS)})")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--no-packing", dest="packing", action="store_false", help="the default")
    parser.add_argument("--qlora", action="store_true", help="base weights in 4-bit NF4 (bitsandbytes; needs CUDA)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", "--seq-len", dest="max_length", type=int, default=2048,
                        help="tokens per sequence (8192 at most: the models' positions)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--capture-options", type=json.loads, default=None, metavar="JSON",
                        help="fastsft.enable_captured_layers options for the fastsft providers that capture, as a "
                             "JSON object (e.g. '{\"mlp_tile_tokens\": 2048}')")
    parser.add_argument("--unsloth-site", type=Path, default=os.environ.get(UNSLOTH_SITE_ENV) or None, metavar="DIR",
                        help=f"the site directory Unsloth and its pinned trl are installed in (default: "
                             f"${UNSLOTH_SITE_ENV}); without one, the unsloth provider runs where `import unsloth` "
                             f"works, and is skipped elsewhere")
    add_optim_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default=None,
                        help="result file name (default: sft_<model>[_packing][_qlora][_<seq len>])")
    parser.add_argument("--compare", type=Path, metavar="OLD.json",
                        help="after the run, flag every metric worse than in OLD.json (an earlier result of the same "
                             "command) by more than --threshold, and exit 1 if any is")
    parser.add_argument("--threshold", type=float, default=0.05, help="relative change --compare flags (default 5%%)")
    parser.add_argument("--single", choices=PROVIDERS + EXTRA_PROVIDERS, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)  # --qlora: the saved random model
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.single:
        a.result_json.write_text(json.dumps(run_one(a.single, a)))
        return 0
    if a.max_length > 8192:
        parser.error("--seq-len: the models have 8192 positions")
    if a.compare is not None and not a.compare.is_file():  # before the run, not after it
        parser.error(f"--compare: no file {a.compare}")
    providers = a.providers.split(",")
    if unknown := [p for p in providers if p not in PROVIDERS + EXTRA_PROVIDERS]:
        parser.error(f"--providers: unknown {', '.join(unknown)} (known: {', '.join(PROVIDERS + EXTRA_PROVIDERS)})")
    if "unsloth" in providers and a.unsloth_site is not None and not (a.unsloth_site / "unsloth").is_dir():
        parser.error(f"--unsloth-site: no unsloth package in {a.unsloth_site}")

    tflops = matmul_tflops()
    if tflops:
        print(f"bf16 matmul {tflops:.0f} TFLOP/s", flush=True)
    lengths = [len(r["input_ids"]) for r in make_rows((a.warmup + a.steps) * a.batch * rows_per_sequence(a) + 8,
                                                      MODELS[a.model][5], a.max_length)]
    flop = flop_per_token(a.model, lengths, checkpointing=a.checkpointing)
    if a.qlora and tflops is None:
        parser.error("--qlora needs a CUDA GPU (bitsandbytes 4-bit)")
    skip_unsloth = "unsloth" in providers and a.unsloth_site is None and not unsloth_importable()
    name = a.name or (f"sft_{a.model}{'_packing' if a.packing else ''}{'_qlora' if a.qlora else ''}"
                      f"{'' if a.max_length == 2048 else f'_{a.max_length}'}{optim_suffix(a)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.qlora or ("unsloth" in providers and not skip_unsloth):  # Unsloth loads the model from a checkpoint
            _in_child(f"from bench.bench_sft import save_random_checkpoint; save_random_checkpoint({a.model!r}, "
                      f"{tmp!r})")
        for provider in providers:
            extra_args = ["--checkpoint", tmp] if a.qlora or provider == "unsloth" else []
            if provider != "unsloth":
                row = run_child(provider, argv, extra_args)
            elif skip_unsloth:
                row = {"provider": provider, "skipped": f"unsloth is not importable and no --unsloth-site (or "
                                                        f"${UNSLOTH_SITE_ENV}) was given: bench/README.md says how "
                                                        f"to install it in a site of its own"}
                print(row, flush=True)
            else:
                env = os.environ.copy() if a.unsloth_site is None else unsloth_env(a.unsloth_site, os.environ)
                row = run_child(provider, argv, extra_args, env)
            rows.append({**row, **utilization(row, flop, tflops)})
            # after every provider: a run stopped at a time cap keeps the rows it finished
            write_results(rows, a, name, flop, tflops)
    if a.compare is not None:
        from bench import report

        return 1 if report.print_regressions(a.compare, a.out / f"{name}.json", a.threshold) else 0
    return 0


def write_results(rows: list[dict], a: argparse.Namespace, name: str, flop: dict, tflops: float | None) -> None:
    from bench import harness

    skipped = ["skipped"] if any("skipped" in row for row in rows) else []
    harness.write(rows, a.out, name,
                  ["provider", "model", "packing", "qlora", "batch", "max_length", "tokens_per_s",
                   "median_step_tokens_per_s", "step_ms_median", "step_ms_max", "mfu", "hfu", "peak_GiB",
                   "peak_reserved_GiB",
                   "first_losses", "wall_s", "error", *skipped],
                  f"SFT end to end: {a.model}{', QLoRA' if a.qlora else ''}, "
                  f"{'packing' if a.packing else 'no packing'}, batch {a.batch}, max_length {a.max_length}, LoRA r=16, "
                  f"checkpointing {a.checkpointing}, {a.optim}",
                  extra={"optim": a.optim, "matmul_tflops": tflops, "gflop_per_token": flop["model"] / 1e9,
                         "hardware_gflop_per_token": flop["hardware"] / 1e9,
                         "attention_pairs_per_token": flop["attention_pairs_per_token"],
                         "flop_convention": "mfu: model FLOPs (frozen base: fwd + input grads, LoRA fwd + grads, "
                                            "attention in-example pairs); hfu: plus checkpointing's recomputation"})


def run_child(provider: str, argv, extra_args: list[str], env: dict | None = None,
              module: str = "bench.bench_sft") -> dict:
    """One provider in its own process (a fresh CUDA context and allocator, no state from the others), with this
    process's environment or ``env``: ``module``'s ``--single`` mode, which writes the row to ``--result-json``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", module, *(argv if argv is not None else sys.argv[1:]), *extra_args,
               "--single", provider, "--result-json", f.name]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env if env is not None else os.environ.copy())
        if proc.returncode == 0:
            row = json.loads(Path(f.name).read_text())
        else:
            row = {"provider": provider, "error": proc.stderr.strip().splitlines()[-1][:300]
                   if proc.stderr.strip() else f"exit {proc.returncode}"}
            sys.stderr.write(proc.stderr[-3000:])
        row["wall_s"] = time.time() - start
        print(row, flush=True)
        return row


if __name__ == "__main__":
    sys.exit(main())
