"""The recipe schema and its loader.

Everything that can be checked without loading a model is checked here, so a typo fails in a second
with the file and key path instead of after a minute of model loading.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from llmtune.errors import LLMTuneError, first_line

# A data reference with one of these suffixes, or that starts with ./ ../ or /, is a local file and must exist;
# anything else is taken as a dataset name on the Hugging Face Hub.
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _LoraOptions(_Spec):
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


class LoraSpec(_LoraOptions):
    name: Literal["lora"]


class DoraSpec(_LoraOptions):
    name: Literal["dora"]


class QLoraSpec(_LoraOptions):
    name: Literal["qlora"]
    bits: Literal[4, 8] = Field(4, description="4-bit (NF4/FP4) or 8-bit (LLM.int8) frozen base")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantize the quantization constants too: ~0.4 bit/param saved")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the dequantized matmuls; bfloat16 on GPUs that have it"
    )


class IA3Spec(_Spec):
    name: Literal["ia3"]
    target_modules: list[str] | None = Field(
        None, description="modules whose activations are rescaled; None = peft's default"
    )
    feedforward_modules: list[str] | None = Field(
        None, description="those of target_modules that are feed-forward (their input is rescaled)"
    )


class PrefixSpec(_Spec):
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


class PromptSpec(_Spec):
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


class PTuningSpec(_Spec):
    name: Literal["p-tuning"]
    num_virtual_tokens: int = Field(20, gt=0)
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="network that produces the virtual tokens")
    encoder_hidden_size: int = Field(128, gt=0)


class AdapterSpec(_Spec):
    name: Literal["adapter"]
    placement: Literal["pfeiffer", "houlsby"] = Field(
        "pfeiffer", description="pfeiffer: after each block's feed-forward; houlsby: after its attention too (2x)"
    )
    reduction_factor: int = Field(
        16, gt=0, description="bottleneck width = hidden size / reduction_factor; lower = more capacity"
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="between the down- and up-projection"
    )


class BitFitSpec(_Spec):
    name: Literal["bitfit"]


class HeadSpec(_Spec):
    name: Literal["head"]
    tied: Literal["untie", "shared"] = Field(
        "untie",
        description="when lm_head shares the input embeddings: 'untie' trains a copy (embeddings unchanged), "
        "'shared' trains the shared matrix",
    )


class LayersSpec(_Spec):
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


class FullSpec(_Spec):
    name: Literal["full"]


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


class _ObjectiveOptions(_Spec):
    # Which head the trained model has: a key of llmtune.models.AUTO_CLASSES.
    model_kind: ClassVar[str] = "causal-lm"

    def head_config(self) -> dict[str, Any]:
        """Config attributes the model needs for this objective (e.g. the labels of a classification head)."""
        return {}


class SFTSpec(_ObjectiveOptions):
    name: Literal["sft"]
    loss_on: Literal["response", "all"] = Field(
        "response", description="'response': assistant turns / completions only; 'all': every token"
    )


class _PreferenceOptions(_ObjectiveOptions):
    """Objectives trained on `format: preference` rows (prompt, chosen, rejected)."""


class DPOSpec(_PreferenceOptions):
    name: Literal["dpo"]
    beta: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="how far the policy may move from the reference; lower = further"
    )
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down"
    ] = Field("sigmoid", description="'sigmoid' is the DPO paper's loss; the others are TRL's variants")


class ORPOSpec(_PreferenceOptions):
    name: Literal["orpo"]
    beta: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="weight of the odds-ratio term next to the chosen response's NLL"
    )


class SimPOSpec(_PreferenceOptions):
    name: Literal["simpo"]
    beta: float = Field(
        2.0, gt=0, allow_inf_nan=False, description="scale of the reward, the length-normalised log-probability"
    )
    gamma: float = Field(0.5, ge=0, allow_inf_nan=False, description="target reward margin of chosen over rejected")


class KTOSpec(_PreferenceOptions):
    name: Literal["kto"]
    beta: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="how far the policy may move from the reference; lower = further"
    )
    desirable_weight: float = Field(1.0, gt=0, description="loss weight of chosen responses (desirable examples)")
    undesirable_weight: float = Field(1.0, gt=0, description="loss weight of rejected responses (undesirable examples)")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="'kto' (the paper's loss, with a KL estimate) or 'apo_zero_unpaired'"
    )


class RewardModelSpec(_PreferenceOptions):
    """A scalar reward r(prompt, response) trained so that r(chosen) > r(rejected) (Bradley-Terry loss)."""

    name: Literal["reward-model"]
    model_kind: ClassVar[str] = "sequence-classification"
    center_rewards: float | None = Field(
        None, ge=0, description="weight of a penalty on the mean reward, keeping rewards centred on 0 (e.g. 0.01)"
    )

    def head_config(self) -> dict[str, Any]:
        return {"num_labels": 1}


RewardName = Literal["exact_match", "iso_date", "similarity"]


class GRPOSpec(_ObjectiveOptions):
    name: Literal["grpo"]
    reward: Union[RewardName, list[RewardName]] = Field(
        "exact_match",
        description="rule-based reward(s): exact_match (completion equals the row's reference), iso_date "
        "(completion is a valid YYYY-MM-DD date), similarity (partial credit: character overlap with the "
        "reference); several are summed",
    )
    reward_model: str | None = Field(
        None,
        description="also score completions with a reward model: a reward-model run directory or a local "
        "sequence-classification checkpoint (relative to the recipe file)",
    )
    reward_weights: list[float] | None = Field(
        None, description="one weight per reward (the reward model's last); default all 1"
    )
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt; advantages compare them")
    max_completion_length: int = Field(32, gt=0, description="tokens generated per completion")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="sampling temperature; diversity in a group")

    @property
    def rewards(self) -> list[str]:
        return [self.reward] if isinstance(self.reward, str) else list(self.reward)

    @model_validator(mode="after")
    def _weights_match(self) -> GRPOSpec:
        n = len(self.rewards) + (self.reward_model is not None)
        if n == 0:
            raise ValueError("reward: name at least one reward, or set reward_model")
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {n} rewards")
        return self


class LMSpec(_ObjectiveOptions):
    """Language modelling / continued pretraining: text joined with EOS and cut into data.max_length blocks."""

    name: Literal["lm"]
    eval_metrics: ClassVar[tuple[str, ...]] = ("perplexity",)


class ClassifySpec(_ObjectiveOptions):
    """Sequence classification: a new head over the model maps each text to one of `labels`."""

    name: Literal["classify"]
    labels: list[str] = Field(
        min_length=2, description="class names; a row's label is one of them or its index (0 = the first)"
    )
    model_kind: ClassVar[str] = "sequence-classification"
    eval_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1")

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str]) -> list[str]:
        if any(not label.strip() for label in labels):
            raise ValueError("a label name is empty")
        if len(set(labels)) != len(labels):
            repeated = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return labels

    def head_config(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {label: i for i, label in enumerate(self.labels)},
        }


class StudentSpec(_Spec):
    from_teacher: Literal["every_other_layer"] = Field(
        description="build the student from the teacher (DistilBERT's trick): its config with half the blocks, "
        "copying embeddings, final norm, head and blocks 0, 2, 4, ..."
    )


class DistillSpec(_ObjectiveOptions):
    name: Literal["distill"]
    teacher: str = Field(description="model reference or run directory (a tuned teacher); frozen during training")
    temperature: float = Field(
        2.0,
        gt=0,
        allow_inf_nan=False,
        description="softens both distributions; >1 shows the teacher's ranking of wrong tokens",
    )
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="loss = alpha * CE(data) + (1 - alpha) * T^2 * divergence(teacher, student)"
    )
    divergence: Literal["forward", "reverse", "jsd"] = Field(
        "forward",
        description="forward KL(teacher||student): covers every teacher mode; reverse: mode-seeking; "
        "jsd: generalised Jensen-Shannon with beta",
    )
    beta: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="jsd only: weight of the teacher in the mixture M = beta * teacher + (1 - beta) * student "
        "(TRL's generalised JSD; default 0.5)",
    )
    loss_on: Literal["response", "all"] = Field(
        "response", description="tokens that carry both losses: 'response' (completions) or 'all'"
    )
    student: StudentSpec | None = Field(
        None, description="null: the recipe's model + method is the student; or {from_teacher: every_other_layer}"
    )

    @model_validator(mode="after")
    def _beta_for_jsd(self) -> DistillSpec:
        if self.divergence == "jsd" and self.beta is None:
            self.beta = 0.5
        elif self.divergence != "jsd" and self.beta is not None:
            raise ValueError(f"beta is only used with divergence: jsd (divergence is {self.divergence!r})")
        return self


class Seq2SeqSpec(_ObjectiveOptions):
    """Encoder-decoder training (T5 family): the source goes to the encoder, the loss is on the decoder's target."""

    name: Literal["seq2seq"]
    model_kind: ClassVar[str] = "seq2seq-lm"
    # Read by data.py: rows are encoded as a source and a target sequence, not one sequence with a masked prompt.
    loss_on: ClassVar[str] = "target"


def _auto_or_bool(value: Any) -> Any:
    # Left to the union, pydantic reports only its first member: "Input should be 'auto'".
    if value == "auto":
        return value
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        raise ValueError(f"expected auto, true or false (got {value!r})") from None


AutoOrBool = Annotated[Union[Literal["auto"], bool], BeforeValidator(_auto_or_bool)]

SEQ2SEQ_FORMATS = ("prompt_completion", "instruction")
# Virtual tokens go in front of every sequence: rows put end to end would share one set.
PROMPT_LEARNING_METHODS = ("prefix", "prompt", "p-tuning")
# Methods whose runs save their adapter alone and never read the frozen weights themselves (DoRA's norm does;
# bottleneck checkpoints hold the whole model): training.frozen_bf16 may store those weights in bf16.
FROZEN_BF16_METHODS = ("lora", "qlora", "ia3", *PROMPT_LEARNING_METHODS)

ObjectiveSpec = Annotated[
    Union[
        SFTSpec,
        DistillSpec,
        LMSpec,
        ClassifySpec,
        Seq2SeqSpec,
        DPOSpec,
        ORPOSpec,
        SimPOSpec,
        KTOSpec,
        GRPOSpec,
        RewardModelSpec,
    ],
    Field(discriminator="name"),
]


class DataSpec(_Spec):
    train: str = Field(description="local file (.jsonl .json .csv .parquet), save_to_disk directory, or hub name")
    eval: str | None = Field(None, description="held-out data; if absent, eval_split of train is held out")
    eval_split: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out when eval is absent")
    split: str = Field("train", description="split to read from a hub dataset or a DatasetDict directory")
    format: Literal["chat", "instruction", "prompt_completion", "text", "preference", "classification"] = "chat"
    columns: dict[str, str] = Field(
        default_factory=dict, description="map our column names to yours, e.g. {messages: conversations}"
    )
    chat_template: bool = Field(True, description="apply the tokenizer's chat template (not for format: text)")
    system_prompt: str | None = Field(None, description="system message put before every conversation")
    max_length: int = Field(512, gt=0, description="tokens per row")
    overflow: Literal["truncate", "drop"] = Field("truncate", description="what to do with rows over max_length")
    packing: bool = Field(
        False,
        description="pack rows into max_length sequences with no padding; attention never crosses rows "
        "(position ids restart per row)",
    )
    padding_free: AutoOrBool = Field(
        "auto",
        description="objective sft: put each batch's rows end to end instead of padding them to the longest; the "
        "same rows per step and the same loss, each row attending on its own; 'auto' = on where random batches of the "
        "data would be at least 10% padding, except for prefix, prompt and p-tuning and for models that do not "
        "attend through sdpa",
    )


class TrainingSpec(_Spec):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the data when max_steps is absent (default 1)")
    batch_size: int = Field(8, gt=0, description="rows per device per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    learning_rate: float = Field(2.0e-4, gt=0, allow_inf_nan=False)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0
    logging_steps: int = Field(5, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and compute dtype")
    bf16: AutoOrBool = Field(
        "auto",
        description="mixed precision: matmuls in bfloat16 under autocast, weights and optimizer state in "
        "training.dtype; 'auto' = where the hardware computes bfloat16 natively (CUDA with bf16, CPUs with "
        "AVX512-BF16 or AMX)",
    )
    recast_frozen: bool = Field(
        True,
        description="under bf16 autocast, cast frozen linear weights to bfloat16 again in backward instead of "
        "keeping a bfloat16 copy of each from forward: less memory by the frozen weights' bf16 size, a few "
        "percent more time",
    )
    full_precision_outputs: bool = Field(
        True,
        description="under bf16 autocast, frozen linear layers return their bf16 product in training.dtype, so an "
        "adapter's small delta is added at full precision instead of being rounded away by a bf16 sum (measured: "
        "held-out loss 3.8% above the float32 baseline's without it, 0.3% with it)",
    )
    frozen_bf16: AutoOrBool = Field(
        "auto",
        description="under bf16 autocast, keep frozen linear weights in bfloat16, the values autocast computes "
        "with anyway: the same products without two casts per layer and step, in half the memory. For methods "
        "that save only their adapter (lora, qlora, ia3, prefix, prompt, p-tuning) and objectives that do not "
        "generate while training (all but grpo); not under fsdp or deepspeed. 'auto' = on a GPU; on the CPU the "
        "checkpoint's float32 weights stay mapped from its file anyway (measured: peak RSS +180-270 MiB on "
        "quickstart, no faster)",
    )
    compact_dropout: bool = Field(
        True,
        description="on CPU, dropout keeps its mask for backward as booleans, not as a noise tensor of the input's "
        "dtype (a float32 copy of every LoRA input), and draws it four elements per 64-bit random number instead "
        "of one (the probability rounded to a multiple of 2^-15)",
    )
    fused_lora: AutoOrBool = Field(
        "auto",
        description="under bf16 autocast, each LoRA layer over a frozen linear layer runs as one autograd function: "
        "its input cast to bf16 once, dropout's mask applied to that copy, the adapter's delta added to the frozen "
        "product inside one float32 matmul; eight passes over a layer's input and output fewer, the same tensors "
        "kept for backward (measured, 20 steps: quickstart 60.0 -> 71.2 trained tokens/s; rows of 50-512 tokens "
        "132.8 -> 155.4, peak RSS 9,071 -> 7,182 MiB). Layers "
        "with dropout draw their masks as compact_dropout does, and keep peft's forward without it. 'auto' = on "
        "the CPU (not yet measured on a GPU); not under fsdp or deepspeed",
    )
    cpu_float32_attention: bool = Field(
        True,
        description="on CPU under bf16 autocast, run attention in float32: PyTorch's CPU flash-attention kernel is "
        "slower in bf16 (measured 2.6x at 66 tokens, 1.2x at 280, equal at 512); exact as well",
    )
    fused_loss: bool = Field(
        True,
        description="apply the output head only at loss-bearing positions, a chunk at a time, with its gradient "
        "computed in the same pass: the logits of prompt and padding tokens are never made",
    )
    fused_blocks: bool = Field(
        True,
        description="Llama-style RMSNorm and SwiGLU MLP as single autograd functions: the MLP keeps two of its "
        "three intermediate-size activations for backward (computing silu(gate) again), the norm one autograd "
        "node in place of eight; only where a module's fused forward reproduces its own bit for bit on random "
        "inputs; not under fsdp or deepspeed",
    )
    group_by_length: bool = Field(
        False,
        description="draw batches of rows of similar length (sorted within random groups of up to 50 batches): "
        "less padding, but each step then weighs short and long rows differently (measured: held-out loss 9-12% "
        "worse after 20 steps on rows of 50-512 tokens), so off by default",
    )
    gradient_checkpointing: AutoOrBool = Field(
        "auto",
        description="recompute each layer's activations in backward instead of keeping them from forward: one more "
        "forward pass per step for one hidden state per layer in place of all of a layer's activations. 'auto' = on "
        "a GPU, where activations decide the peak of allocated memory (TRL's and LLaMA-Factory's default too), "
        "except for prefix tuning and under FSDP's own activation_checkpointing; off on the CPU, where the process "
        "already stays below a checkpointed TRL baseline without it (measured with it, 20 steps: quickstart 50.0 -> "
        "31.0 trained tokens/s, peak RSS 2,233 -> 1,639 MiB; rows of 50-512 tokens 95.2 -> 76.0, 7,948 -> 4,055 MiB)",
    )
    save_steps: int | None = Field(
        50, gt=0, description="checkpoint every N optimizer steps (and at the end); null: only at the end"
    )
    keep_checkpoints: int | None = Field(2, gt=0, description="newest checkpoints kept on disk; null: all")
    fsdp: bool = Field(False, description="shard with PyTorch FSDP when launched with torchrun / accelerate")
    fsdp_config: dict[str, Any] = Field(default_factory=dict, description="FSDP options, as transformers takes them")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config file (relative to the recipe file)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers; TensorBoard event files go to RUN/tensorboard",
    )

    @property
    def fsdp_checkpoints(self) -> bool:
        """Whether FSDP runs its own activation checkpointing (transformers reads the key with or without the
        'fsdp_' prefix)."""
        config = self.fsdp_config
        return self.fsdp and bool(config.get("activation_checkpointing") or config.get("fsdp_activation_checkpointing"))


METRIC_NAMES = ("perplexity", "bleu", "rouge", "exact_match")


class EvalSpec(_Spec):
    metrics: list[Literal["perplexity", "bleu", "rouge", "exact_match", "accuracy", "f1"]] = Field(
        default_factory=lambda: list(METRIC_NAMES),
        description="default: what the objective reports (sft: the first four; classify: accuracy, macro-F1)",
    )
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(8, gt=0)
    max_examples: int | None = Field(None, gt=0, description="evaluate on the first N held-out rows only")


class OutputSpec(_Spec):
    dir: str | None = Field(None, description="run directory; default runs/<recipe file name>")


class Recipe(_Spec):
    model: str = Field(description="hub id | local dir | builtin:NAME | tiny:ARCH")
    tokenizer: str | None = Field(None, description="tokenizer reference when it differs from the model's")
    method: MethodSpec
    objective: ObjectiveSpec = Field(default_factory=lambda: SFTSpec(name="sft"))
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _check_combinations(self) -> Recipe:
        _check_preference(self)
        _check_grpo(self)
        _check_adapter_on_head(self)
        if self.data.format == "text" and isinstance(self.objective, SFTSpec) and self.objective.loss_on == "response":
            # Plain text has no response part: every token is the target.
            self.objective.loss_on = "all"
        if self.objective.name == "distill":
            self._check_distill()
        if self.objective.name == "seq2seq":
            self._check_seq2seq()
        for key in ("packing", "padding_free"):
            if getattr(self.data, key) is True and self.method.name in PROMPT_LEARNING_METHODS:
                raise ValueError(
                    f"data.{key}: {self.method.name} adds virtual tokens in front of each sequence, so with rows "
                    f"end to end only the first row would get them; set data.{key}: false"
                )
        if self.data.padding_free is True and self.objective.name != "sft":
            raise ValueError(
                f"data.padding_free: only objective sft puts rows end to end; remove it for {self.objective.name}"
            )
        if self.training.frozen_bf16 is True and self.method.name not in FROZEN_BF16_METHODS:
            raise ValueError(
                f"training.frozen_bf16: method {self.method.name} saves or reads its frozen weights; only "
                f"{', '.join(FROZEN_BF16_METHODS)} may keep them in bf16; set it to auto or false"
            )
        if self.training.frozen_bf16 is True and self.objective.name == "grpo":
            raise ValueError(
                "training.frozen_bf16: objective grpo generates between steps, outside autocast; set it to auto or "
                "false"
            )
        t = self.training
        if t.gradient_checkpointing is True and t.fsdp_checkpoints:
            raise ValueError(
                "training.gradient_checkpointing: training.fsdp_config.activation_checkpointing already checkpoints "
                "each layer; set one of them to false (gradient_checkpointing may stay auto)"
            )
        if self.method.name == "prefix" and t.gradient_checkpointing is True:
            raise ValueError(
                "training.gradient_checkpointing: prefix tuning feeds its prefixes through the key/value cache, "
                "which gradient checkpointing switches off; set it to auto or false"
            )
        return self

    def _check_seq2seq(self) -> None:
        data = self.data
        if data.format not in SEQ2SEQ_FORMATS:
            raise ValueError(
                f"data.format: objective seq2seq maps a source to a target; use {' or '.join(SEQ2SEQ_FORMATS)} "
                f"(prompt -> completion, instruction + input -> output), not {data.format!r}"
            )
        if data.packing:
            raise ValueError("data.packing: objective seq2seq pads source and target per row; set it to false")
        if data.chat_template and "chat_template" in data.model_fields_set:
            raise ValueError(
                "data.chat_template: an encoder-decoder reads the source as plain text; remove it or set it to false"
            )
        data.chat_template = False
        if self.method.name in PROMPT_LEARNING_METHODS:
            raise ValueError(
                f"method {self.method.name}: virtual tokens are not supported with objective seq2seq here; "
                "use lora, full or another method that changes weights"
            )

    def _check_distill(self) -> None:
        objective = self.objective
        if self.data.packing:
            raise ValueError("data.packing: objective distill compares teacher and student per row; set it to false")
        if objective.student is not None:
            if self.model != objective.teacher:
                raise ValueError(
                    f"model: objective.student.from_teacher builds the student from the teacher, so model must name "
                    f"the teacher ({objective.teacher!r}), not {self.model!r}"
                )
            if self.method.name == "qlora":
                raise ValueError(
                    "method qlora: a student built from the teacher is a new model, not a frozen pretrained base; "
                    "use full, lora or another method"
                )

    @model_validator(mode="after")
    def _check_objective_data(self) -> Recipe:
        objective = self.objective.name
        if objective == "lm":
            if self.data.format != "text":
                raise ValueError("data.format: objective lm trains on plain text; set data.format: text")
            if self.data.packing:
                raise ValueError("data.packing: objective lm already packs the text into data.max_length blocks")
        if (objective == "classify") != (self.data.format == "classification"):
            raise ValueError(
                "data.format: objective classify reads data.format: classification (text and label columns), "
                "and that format is only for objective classify"
            )
        if objective == "classify" and self.data.packing:
            raise ValueError("data.packing: a classifier reads one text per sequence; set data.packing: false")
        allowed = getattr(type(self.objective), "eval_metrics", None)
        if allowed is not None:
            if "metrics" not in self.eval.model_fields_set:
                self.eval.metrics = list(allowed)
            elif bad := [m for m in self.eval.metrics if m not in allowed]:
                raise ValueError(
                    f"eval.metrics: {', '.join(bad)} do not apply to objective {objective}; it reports "
                    f"{', '.join(allowed)}"
                )
        return self


def _check_preference(recipe: Recipe) -> None:
    """Preference objectives and preference data come together, and a pair cannot be packed."""
    objective, data = recipe.objective, recipe.data
    preference_objective = isinstance(objective, _PreferenceOptions)
    if preference_objective and data.format != "preference":
        raise ValueError(
            f"data.format: objective {objective.name} trains on pairs of responses; set data.format: preference "
            "(columns prompt, chosen, rejected)"
        )
    if data.format == "preference" and not preference_objective:
        names = ", ".join(
            n
            for m in _models_in(ObjectiveSpec)
            if issubclass(m, _PreferenceOptions)
            for n in m.model_fields["name"].annotation.__args__
        )
        raise ValueError(f"data.format: preference data needs a preference objective ({names}), not {objective.name}")
    if preference_objective and data.packing:
        raise ValueError(
            f"data.packing: {objective.name} compares a chosen and a rejected sequence row by row; pairs cannot be "
            "packed; set data.packing: false"
        )


def _check_adapter_on_head(recipe: Recipe) -> None:
    # TRL's DPO, KTO and GRPO trainers compute log-probabilities from lm_head.weight directly, so an adapter
    # on the head would never train; TRL would refuse only after the model has loaded.
    targets = getattr(recipe.method, "target_modules", None)
    if recipe.objective.name in ("dpo", "kto", "grpo") and isinstance(targets, list) and "lm_head" in targets:
        raise ValueError(
            f"method.target_modules: {recipe.objective.name} reads the output head's weights directly, so an adapter "
            "on lm_head would never train; remove lm_head from target_modules"
        )


def _check_grpo(recipe: Recipe) -> None:
    objective, data, t = recipe.objective, recipe.data, recipe.training
    if not isinstance(objective, GRPOSpec):
        return
    if data.format not in ("prompt_completion", "chat", "instruction"):
        raise ValueError(
            f"data.format: grpo samples completions for prompts and scores them against each row's reference; "
            f"use prompt_completion (or chat / instruction), not {data.format}"
        )
    if data.packing:
        raise ValueError("data.packing: grpo generates from single prompts; set data.packing: false")
    if (t.batch_size * t.grad_accum) % objective.num_generations:
        raise ValueError(
            f"training.batch_size: grpo fills each step with whole groups of "
            f"num_generations={objective.num_generations} completions; batch_size x grad_accum "
            f"({t.batch_size} x {t.grad_accum}) must be a multiple of it"
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; make its local paths absolute.

    Args:
        path: the YAML file.
        overrides: `a.b=value` strings; the value is parsed as YAML, then typed by the schema.
    """
    try:
        return _load_recipe(Path(path), overrides)
    except LLMTuneError as e:
        # Keys and values can contain newlines; the message must stay one line.
        raise LLMTuneError(str(e).replace("\r", "\\r").replace("\n", "\\n")) from None
    except (RecursionError, ValueError, OSError) as e:
        # Pathological documents: nesting past Python's recursion limit, integers past its digit limit,
        # paths longer than the filesystem allows.
        raise LLMTuneError(f"{path}: cannot use this recipe: {type(e).__name__}: {first_line(e)[:200]}") from None


def _load_recipe(path: Path, overrides: list[str] | None) -> Recipe:
    if not path.is_file():
        raise LLMTuneError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise LLMTuneError(f"{path}: not valid YAML{line}: {first_line(e)}") from None
    if not isinstance(raw, dict):
        raise LLMTuneError(f"{path}: a recipe must be a YAML mapping with keys model, method, data, ...")
    texts = {}
    for item in overrides or []:
        texts.update(_apply_override(raw, item, path))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        # `--set output.dir=2024` parses as an int; where the schema wants text, use the text as typed.
        retry = [err["loc"] for err in e.errors() if err["type"] == "string_type" and _user_path(err["loc"]) in texts]
        for loc in retry:
            _set_path(raw, _user_path(loc), texts[_user_path(loc)])
        recipe = validate_recipe_dict(raw, source=str(path))
    return _resolve_paths(recipe, path.parent)


def validate_recipe_dict(raw: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        # A value that fits no member of a union fails once per member; one message per key is enough.
        messages = {}
        for err in e.errors():
            messages.setdefault(tuple(_walk(err["loc"])[0]), _describe(err))
        raise LLMTuneError(f"{source}: " + "; ".join(messages.values())) from None


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> dict[tuple[str, ...], str]:
    """Set one `a.b=value` in the raw recipe; returns {key path: the value's text} for typing it later."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LLMTuneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.max_steps=5")
    parts = tuple(key.strip().split("."))
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    _set_path(raw, parts, parsed, what=f"--set {item!r}", source=path)
    return {parts: value}


def _set_path(
    raw: dict[str, Any], parts: tuple[str, ...], value: Any, what: str = "", source: Path | None = None
) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise LLMTuneError(f"{what}: {'.'.join(parts[: i + 1])} in {source} is not a mapping")
        node = child
    node[parts[-1]] = value


def _user_path(loc: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(_walk(loc)[0])


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    data = recipe.data
    updates = {}
    for field in ("train", "eval"):
        ref = getattr(data, field)
        if ref is None:
            continue
        local = base / ref
        if local.exists():
            updates[field] = str(local.resolve())
        elif is_local_data_ref(ref):
            raise LLMTuneError(f"{base / ref}: data.{field} file not found (paths are relative to the recipe file)")
    training = recipe.training
    if training.deepspeed is not None:
        config = base / training.deepspeed
        if not config.is_file():
            raise LLMTuneError(f"{config}: training.deepspeed file not found (paths are relative to the recipe file)")
        training = training.model_copy(update={"deepspeed": str(config.resolve())})
    model = _resolve_model_ref(recipe.model, base)
    objective = recipe.objective
    if getattr(objective, "reward_model", None) is not None:
        scorer = (base / objective.reward_model).expanduser()
        if not scorer.is_dir():
            raise LLMTuneError(
                f"{scorer}: objective.reward_model directory not found (a reward-model run directory or a "
                "sequence-classification checkpoint; paths are relative to the recipe file)"
            )
        objective = objective.model_copy(update={"reward_model": str(scorer.resolve())})
    if isinstance(objective, DistillSpec):
        objective = objective.model_copy(update={"teacher": _resolve_model_ref(objective.teacher, base)})
    return recipe.model_copy(
        update={"data": data.model_copy(update=updates), "model": model, "training": training, "objective": objective}
    )


def _resolve_model_ref(ref: str, base: Path) -> str:
    """A model directory relative to the recipe file becomes absolute; other references stay as written."""
    if not ref.startswith(("builtin:", "tiny:")) and (base / ref).is_dir():
        return str((base / ref).resolve())
    return ref


def is_local_data_ref(ref: str) -> bool:
    return ref.endswith(LOCAL_DATA_SUFFIXES) or ref.startswith(("./", "../", "/", "~"))


# Names users bring from peft, transformers and other toolkits, so a typo of those finds our key too.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "sequence_len": "max_length",
    "output_dir": "dir",
}


def _describe(err: dict[str, Any]) -> str:
    loc, names = _walk(err["loc"])
    where = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        bad = loc[-1]
        aliases = {alias: key for alias, key in _ALIASES.items() if key in names}
        close = difflib.get_close_matches(bad, [*names, *aliases], n=1, cutoff=0.5)
        hint = (
            f"did you mean '{aliases.get(close[0], close[0])}'?" if close else f"valid keys: {', '.join(sorted(names))}"
        )
        owners = _union_members_with(loc[0], bad) if len(loc) == 2 else []
        if owners:
            hint = f"'{bad}' is an option of {', '.join(owners)}, not of {loc[0]} {_name_at(loc[0], err)}"
        return f"{where}: unknown key; {hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "union_tag_invalid":
        return f"{where}.name: unknown name {err['ctx']['tag']!r}; expected one of {err['ctx']['expected_tags']}"
    if kind == "union_tag_not_found":
        return f"{where}: needs a 'name' key, e.g. {{name: ...}}"
    if kind == "value_error":
        message = err["msg"].removeprefix("Value error, ")
        return f"{where}: {message}" if loc else message
    return f"{where}: {err['msg']} (got {_short(err.get('input'))})"


def _union_members_with(section: str, key: str) -> list[str]:
    """Names of the method (or objective) kinds that do accept `key`, for a key given to the wrong kind."""
    field = Recipe.model_fields.get(section)
    members = _models_in(field.annotation) if field is not None else []
    return [m.model_fields["name"].annotation.__args__[0] for m in members if key in m.model_fields]


def _name_at(section: str, err: dict[str, Any]) -> str:
    tag = err["loc"][1] if len(err["loc"]) > 2 else ""
    return repr(tag)


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """Turn a pydantic error location into the key path the user wrote and the valid keys at its end."""
    shown: list[str] = []
    models: list[type[BaseModel]] = [Recipe]
    names: list[str] = list(Recipe.model_fields)
    for part in loc:
        part = str(part)
        by_tag = {m.model_fields["name"].annotation.__args__[0]: m for m in models if "name" in m.model_fields}
        if part in by_tag and not any(part in m.model_fields for m in models):
            models = [by_tag[part]]
            names = list(models[0].model_fields)
            continue
        if "[" in part or part in ("str", "int", "float", "bool"):
            continue  # pydantic names the union member it tried; the user wrote no such key
        shown.append(part)
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        models = _models_in(field.annotation) if field is not None else []
        names = sorted({n for m in models for n in m.model_fields}) if models else names
    if len(models) == 1:
        names = list(models[0].model_fields)
    return shown, names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
