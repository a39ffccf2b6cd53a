"""The `training:`, `eval:` and `output:` sections: what a user tunes about a run, how it is scored, where it goes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from llmtune.recipe.common import AutoOrBool, Spec
from llmtune.recipe.optim import AdamWSpec, LinearScheduleSpec, OptimizerSpec, ScheduleSpec


class TrainingSpec(Spec):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the data when max_steps is absent (default 1)")
    batch_size: int = Field(8, gt=0, description="rows per device per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    learning_rate: float = Field(
        2.0e-4,
        gt=0,
        allow_inf_nan=False,
        description="the peak step size, reached after warmup and scaled by lr_scheduler from there",
    )
    optimizer: OptimizerSpec = Field(
        default_factory=lambda: AdamWSpec(name="adamw"),
        description="what turns gradients into steps, and how much memory it keeps per trained weight; a name "
        "(adamw) or a name with its options ({name: sgd, momentum: 0.9})",
    )
    lr_scheduler: ScheduleSpec = Field(
        default_factory=lambda: LinearScheduleSpec(name="linear"),
        description="how the learning rate moves over the run after warmup; a name (cosine) or a name with its "
        "options ({name: cosine_with_min_lr, min_lr_ratio: 0.1})",
    )
    warmup_steps: int = Field(0, ge=0, description="steps over which the learning rate rises linearly from 0")
    warmup_ratio: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="warmup as a share of the run's optimizer steps (rounded up), instead of warmup_steps",
    )
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay; not on biases and norm weights")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are scaled down to this global norm before a step")
    seed: int = 0
    logging_steps: int = Field(5, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and compute dtype")
    bf16: AutoOrBool = Field(
        "auto",
        description="mixed precision: matmuls in bfloat16 under autocast, weights and optimizer state in "
        "training.dtype; 'auto' = where the hardware computes bfloat16 natively (CUDA with bf16, CPUs with "
        "AVX512-BF16 or AMX)",
    )
    group_by_length: bool = Field(
        False,
        description="draw batches of rows of similar length: less padding, but each step then weighs short and "
        "long rows differently, which can cost held-out loss",
    )
    save_steps: int | None = Field(
        50, gt=0, description="checkpoint every N optimizer steps (and at the end); null: only at the end"
    )
    keep_checkpoints: int | None = Field(2, gt=0, description="newest checkpoints kept on disk; null: all")
    fsdp: bool = Field(False, description="shard with PyTorch FSDP when launched with torchrun / accelerate")
    fsdp_config: dict[str, Any] = Field(default_factory=dict, description="FSDP options, as transformers takes them")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config file (relative to the recipe file)")
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: add uniform noise of size alpha / sqrt(length x hidden size) to the input embeddings "
        "in training forwards only (the paper uses 5); null: none",
    )
    check_memory: bool = Field(
        True,
        description="plan the run's memory before the weights load (llmtune plan), print its summary and refuse "
        "to start when a step cannot fit in the device's free memory; false: start without a plan",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers; TensorBoard event files go to RUN/tensorboard",
    )

    @property
    def sharded(self) -> bool:
        """Whether a sharding engine owns the weights outside the forward pass."""
        return self.fsdp or self.deepspeed is not None

    @property
    def fsdp_checkpoints(self) -> bool:
        """Whether FSDP runs its own activation checkpointing (transformers reads the key with or without the
        'fsdp_' prefix)."""
        config = self.fsdp_config
        return self.fsdp and bool(config.get("activation_checkpointing") or config.get("fsdp_activation_checkpointing"))


METRIC_NAMES = ("perplexity", "bleu", "rouge", "exact_match")
MetricName = Literal["perplexity", "bleu", "rouge", "exact_match", "accuracy", "precision", "recall", "f1"]


class EvalSpec(Spec):
    metrics: list[MetricName] = Field(
        default_factory=lambda: list(METRIC_NAMES),
        description="default: what the objective reports (sft: the first four; classify: accuracy, macro-F1; "
        "token-classify: accuracy, precision, recall, F1)",
    )
    max_new_tokens: int = Field(64, gt=0)
    num_beams: int = Field(
        1, ge=1, description="generation metrics: beam search over this many candidates; 1: greedy decoding"
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="generation metrics: divide the score of tokens already in the prompt or the answer by this "
        "(above 1 discourages repeats); null: off",
    )
    batch_size: int = Field(8, gt=0)
    max_examples: int | None = Field(None, gt=0, description="evaluate on the first N held-out rows only")
    prompting: list[str] = Field(
        default_factory=list,
        description="prompting baselines scored beside base and tuned: 'zero-shot' (the base model, prompts "
        "through its own chat template) and 'few-shot:K' (the same with K worked examples from the training data "
        "in front, drawn per row by training.seed)",
    )

    @field_validator("prompting")
    @classmethod
    def _prompting_modes(cls, modes: list[str]) -> list[str]:
        for mode in modes:
            prompting_shots(mode)
        if len(set(modes)) != len(modes):
            raise ValueError(f"{', '.join(sorted({m for m in modes if modes.count(m) > 1}))} listed more than once")
        return modes


def prompting_shots(mode: str) -> int:
    """The number of worked examples of a prompting mode ('zero-shot': 0, 'few-shot:K': K), or ValueError."""
    if mode == "zero-shot":
        return 0
    name, _, k = mode.partition(":")
    if name == "few-shot" and k.isdigit() and int(k) > 0:
        return int(k)
    raise ValueError(f"{mode!r} is not a prompting mode; use zero-shot or few-shot:K with K a whole number above 0")


def is_prompting_column(name: str) -> bool:
    try:
        prompting_shots(name)
    except ValueError:
        return False
    return True


def check_repo_id(repo_id: str) -> str:
    """A Hub model repository id as `owner/name`, or ValueError saying what is wrong with it.

    The Hub also takes a bare name (under the token's own account), but which account that is depends on the
    token of the day; a recipe or a command line that names its owner pushes to the same place every time."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise ValueError(f"{repo_id!r} is not a Hub repository id: give it as owner/name, e.g. your-name/my-model")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hub repository id: {e}".replace(f": {repo_id!r}", "")) from None
    return repo_id


class PushSpec(Spec):
    repo_id: str = Field(description="Hub model repository to upload to, as owner/name; created when missing")
    private: bool = Field(False, description="create the repository private (an existing one keeps its visibility)")
    merged: bool = Field(
        False,
        description="upload the adapter merged into its base (a standalone model, as merge-adapter writes it) "
        "instead of the adapter alone",
    )

    _repo_id_form = field_validator("repo_id")(check_repo_id)


class OutputSpec(Spec):
    dir: str | None = Field(None, description="run directory; default runs/<recipe file name>")
    push_to_hub: PushSpec | None = Field(
        None,
        description="upload the run to the Hugging Face Hub when training ends (as `llmtune push` does); "
        "null: keep it local",
    )
