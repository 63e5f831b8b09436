"""``fastsft.SFTTrainer``: TRL's ``SFTTrainer`` with fastsft's kernels patched into the model.

Change ``from trl import SFTTrainer, SFTConfig`` to ``from fastsft import SFTTrainer, SFTConfig``; everything
else is TRL's (dataset formatting, packing, ``assistant_only_loss``, evaluation, checkpoints, logging).

TRL 1.16 installs its own fused LM head on the model in ``SFTTrainer.__init__`` (a chunked log-prob kernel).
This trainer takes it off again and puts fastsft's patched forward in its place, so the two never stack. The
patched forward also speaks TRL's ``fused_lm_head=True`` protocol, so every TRL loss path still works; the
plain one (``loss_type="nll"``, no ``compute_loss_func``, no label smoothing) is short-cut to fastsft's fused
mean loss, whose gradients are finished in the forward pass.

The modules: :mod:`~fastsft.trainer.sft_trainer` (the class, which only wires the others into TRL's hooks),
:mod:`~fastsft.trainer.arguments` (older argument names, offloaded checkpointing), :mod:`~fastsft.trainer.trl_head`
(fastsft's forward in place of TRL's head), :mod:`~fastsft.trainer.host_time` (per-step host work skipped),
:mod:`~fastsft.trainer.metrics` (TRL's token metrics, read at each log), :mod:`~fastsft.trainer.ddp` (DDP settings
for LoRA-only training).
"""

from fastsft.trainer.arguments import SFTConfig
from fastsft.trainer.sft_trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
