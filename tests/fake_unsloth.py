"""A stand-in for Unsloth, for the CPU tests of bench.bench_sft's unsloth provider: ``write_site(dir)`` writes an
``unsloth`` package whose ``FastLanguageModel`` does what Unsloth's two documented calls do, with transformers and
peft (no kernels, no patching), plus its distribution metadata."""

from pathlib import Path

VERSION = "0.0.1+fake"

PACKAGE = '''
import sys

# Unsloth patches transformers, peft and trl when imported, so it must come first
if any(name in sys.modules for name in ("transformers", "peft", "trl")):
    raise ImportError("import unsloth before transformers, peft and trl")

import peft
import transformers

__version__ = VERSION


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length=2048, dtype=None, load_in_4bit=True, **kwargs):
        if load_in_4bit:
            raise NotImplementedError("the fake loads no 4-bit models")
        model = transformers.AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
        return model, transformers.AutoTokenizer.from_pretrained(model_name)

    @staticmethod
    def get_peft_model(model, r=16, target_modules=None, lora_alpha=16, lora_dropout=0.0, bias="none",
                       use_gradient_checkpointing="unsloth", random_state=3407, **kwargs):
        transformers.set_seed(random_state)
        config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                                 target_modules=target_modules, task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)
'''


def write_site(site: Path) -> Path:
    (site / "unsloth").mkdir(parents=True)
    (site / "unsloth" / "__init__.py").write_text(PACKAGE.replace("VERSION", repr(VERSION)))
    info = site / f"unsloth-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: unsloth\nVersion: {VERSION}\n")
    return site
