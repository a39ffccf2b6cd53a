"""Tuning methods: one spec class per recipe `method.name`, with the traits the rest of llmtune reads."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_validator

from llmtune.recipe.common import Spec, models_in, spec_name


class _MethodOptions(Spec):
    # Traits read wherever a method's kind matters (saving, merging, batching, bf16 storage).
    # The run saves only the trained parameters, beside an unchanged base.
    saves_adapter: ClassVar[bool] = False
    # merge-adapter can fold the trained parameters into the base weights.
    mergeable: ClassVar[bool] = False
    # Trained vectors go in front of every sequence, so rows put end to end would share one set.
    virtual_tokens: ClassVar[bool] = False
    # The run neither saves nor reads its frozen weights, which may then be stored in bf16 (speed.frozen_bf16).
    frozen_weights_unused: ClassVar[bool] = False
    # Can train the embedding rows of tokens a chat template adds (LoRA through peft's trainable tokens).
    trains_new_tokens: ClassVar[bool] = False

    def merge_refusal(self, run: str) -> str | None:
        """Why the adapter this method saves in `run` cannot be folded into the base weights, or None; the one
        wording for merge-adapter, push --merged and output.push_to_hub.merged."""
        return None


class _LoraOptions(_MethodOptions):
    saves_adapter: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    frozen_weights_unused: ClassVar[bool] = True
    trains_new_tokens: ClassVar[bool] = True

    r: int = Field(8, gt=0, description="rank of the update; higher = more capacity, more memory")
    alpha: float = Field(16.0, gt=0, description="scale of the update is alpha / r (alpha / sqrt(r) with rsLoRA)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' (every linear layer but the output head) or module names"
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="modules trained in full and saved with the adapter, e.g. lm_head"
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = Field(False, description="rank-stabilized scaling alpha / sqrt(r): keeps high ranks stable")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="A/B init: default (B = 0), gaussian, pissa or olora (from the base weights' SVD / QR)"
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: train the B matrices (and DoRA's magnitudes) at learning_rate x this ratio, A at "
        "learning_rate; B starts at zero and learns features faster with a larger step (the paper uses 16, with a "
        "learning rate about half of plain LoRA's); null: one learning rate",
    )


class LoraSpec(_LoraOptions):
    name: Literal["lora"]


class DoraSpec(_LoraOptions):
    name: Literal["dora"]
    # Its magnitude vector is normalised by the frozen weight's column norms in every forward.
    frozen_weights_unused: ClassVar[bool] = False


class QLoraSpec(_LoraOptions):
    name: Literal["qlora"]
    bits: Literal[4, 8] = Field(4, description="4-bit (NF4/FP4) or 8-bit (LLM.int8) frozen base")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the quantization constants too: ~0.4 bit/param saved")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the dequantized matmuls; bfloat16 on GPUs that have it"
    )


class IA3Spec(_MethodOptions):
    name: Literal["ia3"]
    saves_adapter: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    frozen_weights_unused: ClassVar[bool] = True
    target_modules: list[str] | None = Field(
        None, description="modules whose activations are rescaled; None = peft's default"
    )
    feedforward_modules: list[str] | None = Field(
        None, description="those of target_modules that are feed-forward (their input is rescaled)"
    )


class _VirtualTokenOptions(_MethodOptions):
    saves_adapter: ClassVar[bool] = True
    virtual_tokens: ClassVar[bool] = True
    frozen_weights_unused: ClassVar[bool] = True

    def merge_refusal(self, run: str) -> str | None:
        described = {"prefix": "prefix tuning", "prompt": "prompt tuning", "p-tuning": "p-tuning"}[self.name]
        return (
            f"{described} learns virtual tokens fed in front of every input, not a change to any weight, so there is "
            f"nothing to merge; serve the run directory itself: llmtune generate {run} '...' / llmtune eval {run} "
            f"(or peft's PeftModel.from_pretrained on {run}/adapter)"
        )


class PrefixSpec(_VirtualTokenOptions):
    name: Literal["prefix"]
    num_virtual_tokens: int = Field(20, gt=0, description="trained key/value positions prepended in every layer")
    projection: bool = Field(False, description="produce prefixes through an MLP: more stable, more parameters")
    projection_hidden_size: int = Field(128, gt=0, description="hidden size of that MLP")
    init: Literal["random", "vocab", "text"] | None = Field(
        None,
        description="'vocab': the model's own keys/values for tokens sampled from the vocabulary; 'text': for "
        "init_text; 'random': peft's N(0, 1) vectors, which swamp attention at first. Default: vocab for a "
        "causal LM without projection, otherwise random",
    )
    init_text: str | None = Field(None, description="e.g. 'Convert the date to ISO format:'")

    @model_validator(mode="after")
    def _activation_init(self) -> PrefixSpec:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        if self.init != "text" and self.init_text:
            raise ValueError("init_text is only used with init: text")
        if self.projection and self.init in ("vocab", "text"):
            raise ValueError(
                f"init: {self.init} sets the prefixes themselves, but with projection: true an MLP produces them; "
                "use init: random or projection: false"
            )
        return self


class PromptSpec(_VirtualTokenOptions):
    name: Literal["prompt"]
    num_virtual_tokens: int = Field(20, gt=0, description="soft-prompt vectors prepended to the input embeddings")
    init: Literal["random", "text"] = Field("random", description="'text' starts from init_text's embeddings")
    init_text: str | None = Field(None, description="e.g. 'Convert the date to ISO format:'")

    @model_validator(mode="after")
    def _text_init(self) -> PromptSpec:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs init_text")
        if self.init == "random" and self.init_text:
            raise ValueError("init_text is only used with init: text")
        return self


class PTuningSpec(_VirtualTokenOptions):
    name: Literal["p-tuning"]
    num_virtual_tokens: int = Field(20, gt=0)
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="network that produces the virtual tokens")
    encoder_hidden_size: int = Field(128, gt=0)


class AdapterSpec(_MethodOptions):
    name: Literal["adapter"]
    # Saves its bottleneck layers alone, but its training checkpoints hold the whole model.
    saves_adapter: ClassVar[bool] = True
    placement: Literal["pfeiffer", "houlsby"] = Field(
        "pfeiffer", description="pfeiffer: after each block's feed-forward; houlsby: after its attention too (2x)"
    )
    reduction_factor: int = Field(
        16, gt=0, description="bottleneck width = hidden size / reduction_factor; lower = more capacity"
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="between the down- and up-projection"
    )

    def merge_refusal(self, run: str) -> str | None:
        return (
            "bottleneck adapters are extra layers with a non-linearity between their projections, not a linear "
            f"change to any weight, so there is nothing to merge into the base; serve the run directory itself: "
            f"llmtune generate {run} '...' / llmtune eval {run} (both re-insert the adapters from {run}/adapter into "
            "the base model)"
        )


class BitFitSpec(_MethodOptions):
    name: Literal["bitfit"]


class HeadSpec(_MethodOptions):
    name: Literal["head"]
    tied: Literal["untie", "shared"] = Field(
        "untie",
        description="when lm_head shares the input embeddings: 'untie' trains a copy (embeddings unchanged), "
        "'shared' trains the shared matrix",
    )


class LayersSpec(_MethodOptions):
    name: Literal["layers"]
    last_k: int | None = Field(None, gt=0, description="train the last K transformer blocks (default 1)")
    pattern: str | None = Field(None, description="regex over parameter names, e.g. 'layers\\.(0|1)\\.mlp'")

    @model_validator(mode="after")
    def _pattern_compiles(self) -> LayersSpec:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern is not a valid regex: {e}") from None
        return self


class FullSpec(_MethodOptions):
    name: Literal["full"]
    trains_new_tokens: ClassVar[bool] = True


MethodSpec = Annotated[
    Union[
        LoraSpec,
        QLoraSpec,
        DoraSpec,
        IA3Spec,
        PrefixSpec,
        PromptSpec,
        PTuningSpec,
        AdapterSpec,
        BitFitSpec,
        HeadSpec,
        LayersSpec,
        FullSpec,
    ],
    Field(discriminator="name"),
]


METHOD_SPECS: dict[str, type[_MethodOptions]] = {spec_name(m): m for m in models_in(MethodSpec)}
