"""Patching transformers causal LMs with fastsft's kernels: ``patch``, ``unpatch`` and the ``PatchReport``.

The supported families and what each kernel needs from them live in :mod:`fastsft.patching.families`.
"""

from fastsft.patching.core import causal_lm_of, is_patched, is_supported, patch, reclaim_forward, refresh, unpatch
from fastsft.patching.families import FAMILIES, Family
from fastsft.patching.lm_head import FusedCausalLMOutput
from fastsft.patching.report import PatchReport

__all__ = ["FAMILIES", "Family", "FusedCausalLMOutput", "PatchReport", "causal_lm_of", "is_patched",
           "is_supported", "patch", "reclaim_forward", "refresh", "unpatch"]
