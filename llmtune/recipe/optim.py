"""`training.optimizer` and `training.lr_scheduler`: each a name with its own options, like `method` and `objective`.

Either is written as a bare name (`optimizer: adamw`) or as a mapping with the name and options
(`optimizer: {name: sgd, momentum: 0.9}`). An option of another optimizer or schedule is an unknown key, so it is
refused at load instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, model_validator

from llmtune.recipe.common import Spec, models_in, spec_name

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _AdamOptions(Spec):
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.999),
        description="decay rates of the gradient's running mean and running square; a lower second beta "
        "(0.95) adapts faster and is steadier on large models",
    )
    eps: float = Field(1e-8, gt=0, description="added to the root of the running square before dividing by it")


class AdamWSpec(_AdamOptions):
    """AdamW through PyTorch's fused kernel (one kernel for every tensor: the fastest step on CPU and GPU). Two
    float32 moments per trained weight: 8 bytes each."""

    name: Literal["adamw"]


class AdamW8bitSpec(_AdamOptions):
    """bitsandbytes' AdamW with both moments stored in 8 bits, blockwise quantized: 2 bytes per trained weight
    instead of 8; tensors under 4096 elements and embeddings keep 32-bit moments."""

    name: Literal["adamw_8bit"]


class PagedAdamW8bitSpec(_AdamOptions):
    """adamw_8bit with its state in paged memory that CUDA moves to the CPU when the GPU runs short, instead of
    failing on a memory spike (the QLoRA paper's setup); on a CPU the same as adamw_8bit."""

    name: Literal["paged_adamw_8bit"]


class Lion8bitSpec(Spec):
    """bitsandbytes' Lion with its one moment in 8 bits: 1 byte per trained weight. It steps by the sign of the
    update, so every step has the full learning rate's size: use a learning rate 3-10x lower than AdamW's."""

    name: Literal["lion_8bit"]
    betas: tuple[Beta, Beta] = Field(
        (0.9, 0.99),
        description="the first mixes the gradient into the update's sign, the second decays the running mean",
    )


class AdafactorSpec(Spec):
    """Adafactor: the running square of a matrix's gradient kept as one value per row and one per column instead
    of one per weight; no running mean unless beta1 is set. T5's optimizer."""

    name: Literal["adafactor"]
    relative_step: bool = Field(
        False,
        description="Adafactor's own step size, min(1e-2, 1/sqrt(step)), instead of training.learning_rate and "
        "training.lr_scheduler (both unused then; the logged learning rate is Adafactor's)",
    )
    warmup_init: bool = Field(
        False, description="with relative_step: grow the step size from 0 as 1e-6 x step instead of starting at 1e-2"
    )
    scale_parameter: bool = Field(
        False, description="scale each step by the root mean square of the weight it changes (the paper's default)"
    )
    beta1: Beta | None = Field(
        None, description="keep a running mean of the gradient with this decay (4 more bytes per weight); null: none"
    )

    @model_validator(mode="after")
    def _warmup_needs_relative_step(self) -> AdafactorSpec:
        if self.warmup_init and not self.relative_step:
            raise ValueError("warmup_init grows Adafactor's own step size: it needs relative_step: true")
        return self


class SGDSpec(Spec):
    """Stochastic gradient descent: one momentum buffer per trained weight (none at momentum 0)."""

    name: Literal["sgd"]
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="decay of the running sum of past steps; 0: plain SGD")
    nesterov: bool = Field(False, description="Nesterov momentum: the gradient taken a step ahead")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDSpec:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov looks ahead along the momentum: it needs momentum > 0")
        return self


def _bare_name(value: Any) -> Any:
    # `optimizer: sgd` stands for `optimizer: {name: sgd}`, every option at its default.
    return {"name": value} if isinstance(value, str) else value


def _named(union: Any) -> Any:
    """`union` (discriminated by name) that also accepts a bare name, in validation and in the JSON schema."""
    names = tuple(spec_name(m) for m in models_in(union))
    return Annotated[union, BeforeValidator(_bare_name, json_schema_input_type=Union[Literal[names], union])]


OptimizerSpec = _named(
    Annotated[
        Union[AdamWSpec, AdamW8bitSpec, PagedAdamW8bitSpec, Lion8bitSpec, AdafactorSpec, SGDSpec],
        Field(discriminator="name"),
    ]
)


class LinearScheduleSpec(Spec):
    """Warmup, then a straight line from learning_rate down to 0 at the last step."""

    name: Literal["linear"]


class CosineScheduleSpec(Spec):
    """Warmup, then half a cosine from learning_rate down to 0 at the last step."""

    name: Literal["cosine"]


class CosineWithMinLRScheduleSpec(Spec):
    """Warmup, then half a cosine from learning_rate down to learning_rate x min_lr_ratio, which the last steps
    still train at."""

    name: Literal["cosine_with_min_lr"]
    min_lr_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="the final learning rate as a share of the peak")


class PolynomialScheduleSpec(Spec):
    """Warmup, then (1 - progress)^power from learning_rate down to learning_rate x min_lr_ratio."""

    name: Literal["polynomial"]
    power: float = Field(
        1.0, gt=0, description="1: linear; above 1 falls fast then flattens; below 1 stays high then falls"
    )
    min_lr_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="the final learning rate as a share of the peak")


class InverseSqrtScheduleSpec(Spec):
    """Warmup, then learning_rate x sqrt(timescale / (steps since warmup + timescale)): falls quickly at first,
    never reaches 0 and does not depend on the run's length."""

    name: Literal["inverse_sqrt"]
    timescale: int | None = Field(
        None,
        gt=0,
        description="the rate is 0.71 of the peak this many steps after warmup, half at 3x; null: the warmup "
        "steps, or 10,000 without warmup",
    )


class ConstantScheduleSpec(Spec):
    """learning_rate at every step, no warmup (set warmup and it is refused: use constant_with_warmup)."""

    name: Literal["constant"]


class ConstantWithWarmupScheduleSpec(Spec):
    """Warmup, then learning_rate at every step."""

    name: Literal["constant_with_warmup"]


ScheduleSpec = _named(
    Annotated[
        Union[
            LinearScheduleSpec,
            CosineScheduleSpec,
            CosineWithMinLRScheduleSpec,
            PolynomialScheduleSpec,
            InverseSqrtScheduleSpec,
            ConstantScheduleSpec,
            ConstantWithWarmupScheduleSpec,
        ],
        Field(discriminator="name"),
    ]
)

OPTIMIZER_SPECS: dict[str, type[Spec]] = {spec_name(m): m for m in models_in(OptimizerSpec)}
SCHEDULE_SPECS: dict[str, type[Spec]] = {spec_name(m): m for m in models_in(ScheduleSpec)}
