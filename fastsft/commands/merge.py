"""``fastsft merge --base MODEL --adapter DIR --output DIR``: a LoRA adapter merged into its base model and saved in
plain transformers format (loadable without PEFT or fastsft), checked before saving: the merged model's logits on a
probe batch must equal those of base + adapter, within the rounding of the weights' dtype."""

from __future__ import annotations

import logging
from pathlib import Path

from fastsft.cli import UsageError

logger = logging.getLogger("fastsft")

# max |merged - (base + adapter)| over the probe logits, relative to their largest magnitude, per weight dtype:
# merging rounds W + scaling * B @ A once into the dtype, where base + adapter keeps the product unrounded
TOLERANCE = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 5e-2, "float16": 1e-2}
PROBE_TOKENS = 32


def add_arguments(parser) -> None:
    parser.add_argument("--base", required=True, help="the base model: a folder or a hub id where reachable")
    parser.add_argument("--adapter", required=True, help="the folder of a PEFT LoRA adapter (fastsft sft's output)")
    parser.add_argument("--output", required=True, help="where the merged model is saved")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the dtype to merge and save in (default: the base's)")


def merge(base: str, adapter: str, output: str, dtype: str = "auto") -> dict:
    """Merge, check and save; returns the check's numbers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    if Path(output).exists() and any(Path(output).iterdir()):
        raise UsageError(f"{output} exists and is not empty: choose a new folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except OSError as exc:
        raise UsageError(f"cannot load base model {base}: {' '.join(str(exc).split())}") from None
    model = PeftModel.from_pretrained(model, adapter).eval()
    weight = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, model.config.vocab_size, (2, PROBE_TOKENS), generator=generator).to(weight.device)
    with torch.no_grad():
        expected = model(input_ids=probe).logits.float()
        merged = model.merge_and_unload()
        got = merged(input_ids=probe).logits.float()
    scale = expected.abs().max().clamp(min=1e-12)
    error = ((got - expected).abs().max() / scale).item()
    dtype_name = str(weight.dtype).removeprefix("torch.")
    tolerance = TOLERANCE.get(dtype_name, 1e-2)
    if not error <= tolerance:
        raise RuntimeError(f"the merged model's logits differ from base + adapter by {error:.3g} of their largest "
                           f"magnitude (at most {tolerance:g} in {dtype_name}); nothing was saved")
    merged.save_pretrained(output)
    for source in (adapter, base):  # the tokenizer saved with the adapter, else the base's
        try:
            AutoTokenizer.from_pretrained(source).save_pretrained(output)
            break
        except (OSError, ValueError):
            continue
    logger.info("merged %s into %s: saved to %s (logits within %.2g of base + adapter, %s)", adapter, base, output,
                error, dtype_name)
    return {"relative_error": error, "tolerance": tolerance, "dtype": dtype_name}


def main(args) -> int:
    merge(args.base, args.adapter, args.output, args.dtype)
    return 0
