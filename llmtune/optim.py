"""How the recipe's optimizer, learning-rate schedule, LoRA+ and NEFTune reach the trainer.

transformers' Trainer builds the optimizer and schedule itself wherever its `optim` and `lr_scheduler_type` names
cover the recipe's choice, so checkpoints save and restore their state as they always do. What those names cannot
say goes through the Trainer's own optimizer hook (`optimizer_cls_and_kwargs`, read when training starts, after
any wrapping of the model): Adafactor's options, and LoRA+'s parameter groups over whichever optimizer the recipe
names. Adafactor's relative step brings its own schedule (`relative_step_schedule`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from llmtune.recipe import Recipe, TrainingSpec

# The Trainer's `optim` name for each recipe optimizer. AdamW is PyTorch's fused kernel, which PyTorch has for
# the CPU as for CUDA: on this CPU (one thread) it stepped 420 LoRA-sized tensors in 4.4 ms against foreach's
# 20.5 ms, and 11M weights in 13 ms against 59 ms; the Trainer's default on CUDA too, so no device choice here.
TRAINER_OPTIM = {
    "adamw": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "lion_8bit": "lion_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}


def trainer_fields(t: TrainingSpec) -> dict[str, Any]:
    """TrainingArguments fields for the recipe's optimizer, schedule, warmup and NEFTune."""
    opt, schedule = t.optimizer, t.lr_scheduler
    fields: dict[str, Any] = {
        "optim": TRAINER_OPTIM[opt.name],
        "lr_scheduler_type": schedule.name,
        "lr_scheduler_kwargs": _schedule_kwargs(t),
        # transformers reads a warmup below 1 as a share of the run's steps.
        "warmup_steps": t.warmup_steps if t.warmup_ratio is None else t.warmup_ratio,
        "neftune_noise_alpha": t.neftune_noise_alpha,
    }
    if hasattr(opt, "betas"):
        fields["adam_beta1"], fields["adam_beta2"] = opt.betas
    if hasattr(opt, "eps"):
        fields["adam_epsilon"] = opt.eps
    if opt.name == "sgd":
        fields["optim_args"] = f"momentum={opt.momentum},nesterov={opt.nesterov}"
    return fields


def _schedule_kwargs(t: TrainingSpec) -> dict[str, Any]:
    schedule = t.lr_scheduler
    if schedule.name == "cosine_with_min_lr":
        return {"min_lr_rate": schedule.min_lr_ratio}
    if schedule.name == "polynomial":
        return {"power": schedule.power, "lr_end": t.learning_rate * schedule.min_lr_ratio}
    if schedule.name == "inverse_sqrt" and schedule.timescale is not None:
        return {"timescale": schedule.timescale}
    return {}


def optimizer_hook(recipe: Recipe, args: TrainingArguments) -> tuple[Any, dict[str, Any]] | None:
    """The Trainer's `optimizer_cls_and_kwargs` for what its `optim` names cannot say; None where they can."""
    from transformers import Trainer
    from transformers.optimization import Adafactor

    opt = recipe.training.optimizer
    hook = None
    if opt.name == "adafactor":
        # The Trainer's own Adafactor takes no options: relative step and parameter scaling always off.
        options = {
            "relative_step": opt.relative_step,
            "warmup_init": opt.warmup_init,
            "scale_parameter": opt.scale_parameter,
            "beta1": opt.beta1,
        }
        hook = (Adafactor, {"lr": None if opt.relative_step else args.learning_rate, **options})
    ratio = getattr(recipe.method, "loraplus_lr_ratio", None)
    if ratio is None:
        return hook
    optimizer_cls, kwargs = hook or Trainer.get_optimizer_cls_and_kwargs(args)
    return _loraplus_factory(optimizer_cls, ratio, args.weight_decay), kwargs


def _loraplus_factory(optimizer_cls: type, ratio: float, weight_decay: float) -> Callable[[], Callable[..., Any]]:
    """An optimizer factory as the Trainer takes one: called with nothing, then with (model, **optimizer kwargs)."""
    from peft.optimizers import create_loraplus_optimizer

    def build(model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = create_loraplus_optimizer(
            model, optimizer_cls, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay, **kwargs
        )
        if kwargs.get("optim_bits") == 8:
            # As the Trainer does for its own 8-bit optimizers: embeddings (trained as modules_to_save) keep
            # 32-bit moments, for stability as bitsandbytes advises.
            import bitsandbytes

            manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
            for module in model.modules():
                if isinstance(module, nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
        return optimizer

    return lambda: build


def forget_8bit_overrides() -> None:
    """Drop the 32-bit overrides of 8-bit optimizers built before in this process: bitsandbytes keeps them in one
    process-wide manager, by parameter position, and would apply them to whichever weight of the next optimizer
    sits at that position."""
    if "bitsandbytes" in sys.modules:
        from bitsandbytes.optim import GlobalOptimManager

        GlobalOptimManager.get_instance().initialize()


def relative_step_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """For Adafactor with relative_step, which computes its own step size: a schedule that only reads back the
    step size the next step will take (for the logs); None for every other optimizer, which the Trainer's schedule
    drives."""
    from transformers.optimization import Adafactor, AdafactorSchedule

    class NextStepSize(AdafactorSchedule):
        # transformers' version reports the step size of the step just taken (so the log of step 1 says 0) and
        # fails on an empty parameter group, which the Trainer makes for weights without decay when every
        # trained weight decays (LoRA's).
        def get_lr(self) -> list[float]:
            opt, sizes = self.optimizer, []
            for group, base in zip(opt.param_groups, self.base_lrs, strict=True):
                if not group["params"]:
                    sizes.append(base)
                    continue
                first = group["params"][0]
                # What Adafactor reads at the start of its next step: the step count, then the weight's RMS.
                state = {"step": opt.state[first].get("step", 0) + 1, "RMS": opt._rms(first.detach().float())}
                sizes.append(opt._get_lr(group, state))
            return sizes

    inner = getattr(optimizer, "optimizer", optimizer)  # the Trainer schedules the optimizer accelerate wrapped
    if isinstance(inner, Adafactor) and inner.defaults["relative_step"]:
        return NextStepSize(inner)
    return None
