"""Training objectives: one spec class per recipe `objective.name`, with the traits the rest of llmtune reads."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from llmtune.recipe.common import Spec, models_in, spec_name


class _ObjectiveOptions(Spec):
    # Which head the trained model has: a key of llmtune.models.AUTO_CLASSES.
    model_kind: ClassVar[str] = "causal-lm"
    # Trains on `format: preference` rows (prompt, chosen, rejected).
    pairs: ClassVar[bool] = False
    # Generates between optimizer steps, outside autocast (so its frozen weights must stay in their own dtype).
    generates_while_training: ClassVar[bool] = False
    # Trains by next-token cross-entropy over labelled positions through TRL's SFT trainer, whose loss
    # speed.fused_loss computes without the other positions' logits and whose batches may be padding-free.
    token_loss: ClassVar[bool] = False
    # Trains a head that predicts objective.labels (per text or per word) instead of text: `generate` prints the
    # labels, and serve, chat and export, which need a model that generates, refuse it.
    predicts_labels: ClassVar[bool] = False
    # Its held-out rows are prompts with a reference answer, scored by generating (eval.prompting applies).
    answers_prompts: ClassVar[bool] = False
    # Scores each batch with a frozen reference policy too: the adapter switched off, or for a method without
    # an adapter a second copy of the base model.
    reference_policy: ClassVar[bool] = False

    def head_config(self) -> dict[str, Any]:
        """Config attributes the model needs for this objective (e.g. the labels of a classification head)."""
        return {}


class SFTSpec(_ObjectiveOptions):
    name: Literal["sft"]
    answers_prompts: ClassVar[bool] = True
    token_loss: ClassVar[bool] = True
    loss_on: Literal["response", "last_turn", "all"] = Field(
        "response",
        description="'response': every assistant turn / completion (except messages marked train: false); "
        "'last_turn': the last assistant turn only; 'all': every token",
    )


class _PreferenceOptions(_ObjectiveOptions):
    pairs: ClassVar[bool] = True


class DPOSpec(_PreferenceOptions):
    name: Literal["dpo"]
    reference_policy: ClassVar[bool] = True
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
    reference_policy: ClassVar[bool] = True
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


class _SampledRewardOptions(_ObjectiveOptions):
    """Objectives whose policy samples its own completions to the data's prompts and learns from their rewards."""

    answers_prompts: ClassVar[bool] = True

    generates_while_training: ClassVar[bool] = True
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
    max_completion_length: int = Field(32, gt=0, description="tokens generated per completion")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="sampling temperature; diversity in a group")

    @property
    def rewards(self) -> list[str]:
        return [self.reward] if isinstance(self.reward, str) else list(self.reward)

    @model_validator(mode="after")
    def _weights_match(self) -> _SampledRewardOptions:
        n = len(self.rewards) + (self.reward_model is not None)
        if n == 0:
            raise ValueError("reward: name at least one reward, or set reward_model")
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {n} rewards")
        return self


class _GroupOptions(_SampledRewardOptions):
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt; advantages compare them")


class GRPOSpec(_GroupOptions):
    name: Literal["grpo"]
    beta: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="weight of the KL penalty to the reference policy (the model with the adapter switched off; "
        "for full fine-tuning a second, frozen copy); 0 (TRL's default): no KL term, no reference",
    )


class RLOOSpec(_GroupOptions):
    """REINFORCE leave-one-out: each completion's advantage is its reward minus the mean reward of the other
    completions to the same prompt; the KL penalty is part of the reward."""

    name: Literal["rloo"]
    beta: float = Field(
        0.05,
        ge=0,
        allow_inf_nan=False,
        description="weight of the KL penalty to the reference policy, subtracted from each reward (TRL's "
        "default); reference as for grpo; 0: none",
    )


class PPOSpec(_SampledRewardOptions):
    """PPO as in RLHF: a value head on the policy estimates returns; rewards are the completion's score minus a
    per-token KL penalty to the reference; advantages by GAE; clipped policy and value losses."""

    name: Literal["ppo"]
    reward: Union[RewardName, list[RewardName]] = Field(
        [],
        description="rule-based reward(s) as for grpo, added to the reward model's score; default none: the "
        "reward model alone",
    )
    kl_coef: float = Field(
        0.05, ge=0, allow_inf_nan=False, description="per-token KL penalty to the reference, subtracted from the reward"
    )
    gamma: float = Field(1.0, ge=0, le=1, description="discount of later rewards (1: the score counts fully)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD")
    cliprange: float = Field(0.2, gt=0, allow_inf_nan=False, description="how far the policy ratio may move per update")
    cliprange_value: float = Field(
        0.2, gt=0, allow_inf_nan=False, description="how far a value prediction may move from the rollout's"
    )
    vf_coef: float = Field(0.1, ge=0, allow_inf_nan=False, description="weight of the value loss beside the policy's")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch (its completions are reused)")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass: the rollout batch is split this many ways")


class LMSpec(_ObjectiveOptions):
    """Language modelling / continued pretraining: text joined with EOS and cut into data.max_length blocks."""

    name: Literal["lm"]
    token_loss: ClassVar[bool] = True
    eval_metrics: ClassVar[tuple[str, ...]] = ("perplexity",)


def _distinct_labels(labels: list[str]) -> list[str]:
    if any(not label.strip() for label in labels):
        raise ValueError("a label name is empty")
    if len(set(labels)) != len(labels):
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        raise ValueError(f"{', '.join(repeated)} listed more than once")
    return labels


def _label_head(labels: list[str]) -> dict[str, Any]:
    """A classification head's size and label names, so a merged or fully tuned model names its labels."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


class ClassifySpec(_ObjectiveOptions):
    """Sequence classification: a new head over the model maps each text to one of `labels`."""

    name: Literal["classify"]
    labels: list[str] = Field(
        min_length=2, description="class names; a row's label is one of them or its index (0 = the first)"
    )
    model_kind: ClassVar[str] = "sequence-classification"
    predicts_labels: ClassVar[bool] = True
    eval_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1")

    _distinct = field_validator("labels")(_distinct_labels)

    def head_config(self) -> dict[str, Any]:
        return _label_head(self.labels)


# Tags of the IOB schemes: outside any entity, or the beginning / inside of an entity of a type.
IOB_TAG = re.compile(r"O|[BI]-\S+")


class TokenClassifySpec(_ObjectiveOptions):
    """Token classification (POS tagging, NER): a new head gives each word one of `labels`, read at the word's
    first sub-token."""

    name: Literal["token-classify"]
    labels: list[str] = Field(
        min_length=2,
        description="tag names; a row's tags are these names (or their indices), one per word; the model's "
        "id2label / label2id come from them",
    )
    scheme: Literal["iob1", "iob2", "none"] | None = Field(
        None,
        description="how tags mark entities, for entity-level precision / recall / F1 (seqeval): iob2 (BIO: every "
        "entity starts with B-), iob1 (B- only between two adjacent entities of a type), none (tags such as POS "
        "with no entities: precision / recall / F1 per tag, macro-averaged); default: iob2 when every label is O, "
        "B-TYPE or I-TYPE, else none",
    )
    model_kind: ClassVar[str] = "token-classification"
    predicts_labels: ClassVar[bool] = True
    eval_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "precision", "recall", "f1")

    _distinct = field_validator("labels")(_distinct_labels)

    @model_validator(mode="after")
    def _scheme_fits_labels(self) -> TokenClassifySpec:
        outside = [label for label in self.labels if not IOB_TAG.fullmatch(label)]
        if self.scheme is None:
            self.scheme = "none" if outside or not any(label.startswith("B-") for label in self.labels) else "iob2"
        elif self.scheme != "none" and outside:
            raise ValueError(
                f"scheme {self.scheme}: labels {', '.join(outside)} are not O, B-TYPE or I-TYPE; set scheme: none "
                "for tags that mark no entities (POS tags)"
            )
        return self

    def head_config(self) -> dict[str, Any]:
        return _label_head(self.labels)


class StudentSpec(Spec):
    from_teacher: Literal["every_other_layer"] = Field(
        description="build the student from the teacher (DistilBERT's trick): its config with half the blocks, "
        "copying embeddings, final norm, head and blocks 0, 2, 4, ..."
    )


class DistillSpec(_ObjectiveOptions):
    name: Literal["distill"]
    answers_prompts: ClassVar[bool] = True
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
    loss_on: Literal["response", "last_turn", "all"] = Field(
        "response",
        description="tokens that carry both losses: 'response' (completions), 'last_turn' (the last one) or 'all'",
    )
    student: StudentSpec | None = Field(
        None, description="null: the recipe's model + method is the student; or {from_teacher: every_other_layer}"
    )

    @model_validator(mode="after")
    def _beta_for_jsd(self) -> DistillSpec:
        if self.divergence != "jsd" and self.beta is not None:
            raise ValueError(f"beta is only used with divergence: jsd (divergence is {self.divergence!r})")
        return self


class Seq2SeqSpec(_ObjectiveOptions):
    """Encoder-decoder training (T5 family): the source goes to the encoder, the loss is on the decoder's target."""

    name: Literal["seq2seq"]
    model_kind: ClassVar[str] = "seq2seq-lm"
    answers_prompts: ClassVar[bool] = True
    # Read by data.py: rows are encoded as a source and a target sequence, not one sequence with a masked prompt.
    loss_on: ClassVar[str] = "target"


class MLMSpec(_ObjectiveOptions):
    """Masked language modelling (BERT): some tokens of each text are hidden and the encoder predicts them."""

    name: Literal["mlm"]
    model_kind: ClassVar[str] = "masked-lm"
    eval_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "perplexity")
    mlm_probability: float = Field(
        0.15,
        gt=0.0,
        lt=1.0,
        description="share of each row's tokens chosen for prediction (special tokens never are); of them 80% "
        "become the mask token, 10% a random token, 10% stay as they are",
    )


class SpanCorruptionSpec(_ObjectiveOptions):
    """Span corruption (T5): spans of each text are replaced by sentinel tokens and the decoder writes them out."""

    name: Literal["span-corruption"]
    model_kind: ClassVar[str] = "seq2seq-lm"
    eval_metrics: ClassVar[tuple[str, ...]] = ("perplexity", "accuracy")
    noise_density: float = Field(
        0.15, gt=0.0, le=0.5, description="share of each row's tokens inside noise spans (T5: 0.15)"
    )
    mean_noise_span_length: float = Field(3.0, ge=1.0, description="mean length of a noise span in tokens (T5: 3)")


ObjectiveSpec = Annotated[
    Union[
        SFTSpec,
        DistillSpec,
        LMSpec,
        ClassifySpec,
        TokenClassifySpec,
        Seq2SeqSpec,
        DPOSpec,
        ORPOSpec,
        SimPOSpec,
        KTOSpec,
        GRPOSpec,
        RLOOSpec,
        PPOSpec,
        RewardModelSpec,
        MLMSpec,
        SpanCorruptionSpec,
    ],
    Field(discriminator="name"),
]

OBJECTIVE_SPECS: dict[str, type[_ObjectiveOptions]] = {spec_name(m): m for m in models_in(ObjectiveSpec)}
