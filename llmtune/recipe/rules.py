"""Cross-field rules: each a named function that refuses one combination of keys, and the defaults that depend on
other keys, resolved in one place.

A rule raises ValueError naming the key to change; it never changes the recipe. The loader turns the message into
the one-line error the user sees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmtune.recipe.data import SAMPLE_KINDS, SEQ2SEQ_FORMATS
from llmtune.recipe.methods import METHOD_SPECS
from llmtune.recipe.models import SDPA_ATTENTION, is_gguf_ref
from llmtune.recipe.objectives import OBJECTIVE_SPECS

if TYPE_CHECKING:
    from llmtune.recipe.schema import Recipe


def resolve_defaults(recipe: Recipe) -> None:
    """Fill the defaults that depend on other sections, for keys the recipe leaves unset."""
    objective, data = recipe.objective, recipe.data
    if data.format == "text" and objective.name == "sft" and objective.loss_on == "response":
        objective.loss_on = "all"  # plain text has no response part: every token is the target
    if objective.name == "seq2seq" and "chat_template" not in data.model_fields_set:
        data.chat_template = False  # an encoder reads its source as plain text
    if objective.name == "distill" and objective.divergence == "jsd" and objective.beta is None:
        objective.beta = 0.5
    allowed = getattr(type(objective), "eval_metrics", None)
    if allowed is not None and "metrics" not in recipe.eval.model_fields_set:
        recipe.eval.metrics = list(allowed)


def check_preference_data(recipe: Recipe) -> None:
    """Preference objectives and preference data come together, and a pair cannot be packed."""
    objective, data = recipe.objective, recipe.data
    if objective.pairs and data.format != "preference":
        raise ValueError(
            f"data.format: objective {objective.name} trains on pairs of responses; set data.format: preference "
            "(columns prompt, chosen, rejected)"
        )
    if data.format == "preference" and not objective.pairs:
        names = ", ".join(name for name, spec in OBJECTIVE_SPECS.items() if spec.pairs)
        raise ValueError(f"data.format: preference data needs a preference objective ({names}), not {objective.name}")
    if objective.pairs and data.packing:
        raise ValueError(
            f"data.packing: {objective.name} compares a chosen and a rejected sequence row by row; pairs cannot be "
            "packed; set data.packing: false"
        )


def check_sampled_rewards(recipe: Recipe) -> None:
    """grpo, rloo and ppo sample completions to single prompts; grpo and rloo in whole groups per prompt."""
    objective, data, t = recipe.objective, recipe.data, recipe.training
    if not objective.generates_while_training:
        return
    name = objective.name
    if data.format not in ("prompt_completion", "chat", "instruction"):
        raise ValueError(
            f"data.format: {name} samples completions for prompts and scores them against each row's reference; "
            f"use prompt_completion (or chat / instruction), not {data.format}"
        )
    if data.packing:
        raise ValueError(f"data.packing: {name} generates from single prompts; set data.packing: false")
    groups = getattr(objective, "num_generations", None)
    if groups is not None and (t.batch_size * t.grad_accum) % groups:
        raise ValueError(
            f"training.batch_size: {name} fills each step with whole groups of "
            f"num_generations={groups} completions; batch_size x grad_accum "
            f"({t.batch_size} x {t.grad_accum}) must be a multiple of it"
        )
    if name == "ppo":
        _check_ppo(recipe)


def _check_ppo(recipe: Recipe) -> None:
    objective, t = recipe.objective, recipe.training
    if t.grad_accum != 1:
        raise ValueError(
            "training.grad_accum: ppo takes objective.ppo_epochs x objective.minibatches optimizer steps per rollout "
            "batch of training.batch_size prompts; set grad_accum: 1 (a larger rollout: raise batch_size)"
        )
    if t.batch_size % objective.minibatches:
        raise ValueError(
            f"objective.minibatches: {objective.minibatches} does not divide training.batch_size ({t.batch_size}), "
            "the rollout batch it splits"
        )
    if recipe.method.virtual_tokens:
        raise ValueError(
            f"method {recipe.method.name}: ppo reads its value estimates at each token's position, which virtual "
            "tokens shift; use lora, full or another method that changes weights"
        )
    if t.sharded:
        raise ValueError("training.fsdp / training.deepspeed: ppo trains its value head on one process; remove them")


def check_adapter_on_head(recipe: Recipe) -> None:
    # TRL's DPO, KTO, GRPO and RLOO trainers compute log-probabilities from lm_head.weight directly, so an adapter
    # on the head would never train; TRL would refuse only after the model has loaded.
    targets = getattr(recipe.method, "target_modules", None)
    if recipe.objective.name in ("dpo", "kto", "grpo", "rloo") and isinstance(targets, list) and "lm_head" in targets:
        raise ValueError(
            f"method.target_modules: {recipe.objective.name} reads the output head's weights directly, so an adapter "
            "on lm_head would never train; remove lm_head from target_modules"
        )


def check_distill(recipe: Recipe) -> None:
    objective = recipe.objective
    if objective.name != "distill":
        return
    if recipe.data.packing:
        raise ValueError("data.packing: objective distill compares teacher and student per row; set it to false")
    if objective.student is not None:
        if recipe.model != objective.teacher:
            raise ValueError(
                f"model: objective.student.from_teacher builds the student from the teacher, so model must name "
                f"the teacher ({objective.teacher!r}), not {recipe.model!r}"
            )
        if recipe.method.name == "qlora":
            raise ValueError(
                "method qlora: a student built from the teacher is a new model, not a frozen pretrained base; "
                "use full, lora or another method"
            )


def check_seq2seq(recipe: Recipe) -> None:
    data = recipe.data
    if recipe.objective.name != "seq2seq":
        return
    if data.format not in SEQ2SEQ_FORMATS:
        raise ValueError(
            f"data.format: objective seq2seq maps a source to a target; use {' or '.join(SEQ2SEQ_FORMATS)} "
            f"(prompt -> completion, instruction + input -> output), not {data.format!r}"
        )
    if data.packing:
        raise ValueError("data.packing: objective seq2seq pads source and target per row; set it to false")
    if data.chat_template:
        raise ValueError(
            "data.chat_template: an encoder-decoder reads the source as plain text; remove it or set it to false"
        )
    if recipe.method.virtual_tokens:
        raise ValueError(
            f"method {recipe.method.name}: virtual tokens are not supported with objective seq2seq here; "
            "use lora, full or another method that changes weights"
        )


def check_rows_end_to_end(recipe: Recipe) -> None:
    """Packing and padding-free batches put rows end to end, which virtual tokens and most objectives cannot use."""
    method = recipe.method
    for key, value in (("data.packing", recipe.data.packing), ("speed.padding_free", recipe.speed.padding_free)):
        if value is True and method.virtual_tokens:
            raise ValueError(
                f"{key}: {method.name} adds virtual tokens in front of each sequence, so with rows end to end only "
                f"the first row would get them; set {key}: false"
            )
    if recipe.speed.padding_free is True and recipe.objective.name != "sft":
        raise ValueError(
            f"speed.padding_free: only objective sft puts rows end to end; remove it for {recipe.objective.name}"
        )


def check_frozen_bf16(recipe: Recipe) -> None:
    if recipe.speed.frozen_bf16 is not True:
        return
    if not recipe.method.frozen_weights_unused:
        allowed = ", ".join(name for name, spec in METHOD_SPECS.items() if spec.frozen_weights_unused)
        raise ValueError(
            f"speed.frozen_bf16: method {recipe.method.name} saves or reads its frozen weights; only {allowed} may "
            "keep them in bf16; set it to auto or false"
        )
    if recipe.objective.generates_while_training:
        raise ValueError(
            f"speed.frozen_bf16: objective {recipe.objective.name} generates between steps, outside autocast; set it "
            "to auto or false"
        )


def check_gradient_checkpointing(recipe: Recipe) -> None:
    if recipe.speed.gradient_checkpointing is not True:
        return
    if recipe.training.fsdp_checkpoints:
        raise ValueError(
            "speed.gradient_checkpointing: training.fsdp_config.activation_checkpointing already checkpoints each "
            "layer; set one of them to false (gradient_checkpointing may stay auto)"
        )
    if recipe.method.name == "prefix":
        raise ValueError(
            "speed.gradient_checkpointing: prefix tuning feeds its prefixes through the key/value cache, which "
            "gradient checkpointing switches off; set it to auto or false"
        )


# Levers that replace a layer's forward or the loss: a sharding engine owns the weights outside the forward pass.
UNSHARDED_LEVERS = ("fused_loss", "fused_kernels", "fused_lora", "frozen_bf16", "recast_frozen")


def check_speed_under_sharding(recipe: Recipe) -> None:
    if not recipe.training.sharded:
        return
    for key in UNSHARDED_LEVERS:
        if getattr(recipe.speed, key) is True:
            raise ValueError(
                f"speed.{key}: fsdp and deepspeed own the weights outside the forward pass, where this lever works; "
                "set it to auto or false"
            )


def check_objective_data(recipe: Recipe) -> None:
    objective, data = recipe.objective.name, recipe.data
    if objective == "lm":
        if data.format != "text":
            raise ValueError("data.format: objective lm trains on plain text; set data.format: text")
        if data.packing:
            raise ValueError("data.packing: objective lm already packs the text into data.max_length blocks")
    if (objective == "classify") != (data.format == "classification"):
        raise ValueError(
            "data.format: objective classify reads data.format: classification (text and label columns), "
            "and that format is only for objective classify"
        )
    if objective == "classify" and data.packing:
        raise ValueError("data.packing: a classifier reads one text per sequence; set data.packing: false")
    if (objective == "token-classify") != (data.format == "token_classification"):
        raise ValueError(
            "data.format: objective token-classify reads data.format: token_classification (tokens and tags "
            "columns), and that format is only for objective token-classify"
        )
    if objective == "token-classify" and data.packing:
        raise ValueError("data.packing: a tagger reads one sentence per sequence; set data.packing: false")
    if objective in DENOISING_OBJECTIVES:
        _check_denoising(recipe)


# Objectives that corrupt plain text and train the model to restore it.
DENOISING_OBJECTIVES = ("mlm", "span-corruption")


def _check_denoising(recipe: Recipe) -> None:
    objective, data, method = recipe.objective.name, recipe.data, recipe.method
    if data.format != "text":
        raise ValueError(f"data.format: objective {objective} corrupts plain text; set data.format: text")
    if data.packing:
        raise ValueError(f"data.packing: objective {objective} cuts each text into rows itself; set it to false")
    if method.virtual_tokens or method.name == "adapter":
        raise ValueError(
            f"method {method.name}: virtual tokens and bottleneck adapters are not supported with objective "
            f"{objective}; use lora, dora, full or another method that changes weights"
        )


def check_eval_metrics(recipe: Recipe) -> None:
    allowed = getattr(type(recipe.objective), "eval_metrics", None)
    if allowed is not None and (bad := [m for m in recipe.eval.metrics if m not in allowed]):
        raise ValueError(
            f"eval.metrics: {', '.join(bad)} do not apply to objective {recipe.objective.name}; it reports "
            f"{', '.join(allowed)}"
        )


def check_model_options(recipe: Recipe) -> None:
    options = recipe.model_options
    local = recipe.model.startswith(("builtin:", "tiny:")) or is_gguf_ref(recipe.model)
    if options.revision is not None and local:
        raise ValueError(
            f"model_options.revision: names a branch or commit of a hub repository, and model {recipe.model!r} is "
            "not read from the hub; remove it"
        )
    if recipe.speed.float32_attention is True and options.attn_implementation not in SDPA_ATTENTION:
        raise ValueError(
            f"speed.float32_attention: computes attention through sdpa, and model_options.attn_implementation "
            f"{options.attn_implementation} replaces sdpa; set one of them to auto"
        )


def check_mixture_sizes(recipe: Recipe) -> None:
    """A list of sources is a weighted mixture, or whole sources and counts: a weight says what share of the mixture
    a source is, which a fixed number of rows would contradict."""
    for key in ("train", "eval"):
        sources = getattr(recipe.data, key)
        if isinstance(sources, str) or sources is None:
            continue
        weighted = [source.weight is not None for source in sources]
        if any(weighted) and not all(weighted):
            i = weighted.index(False)
            raise ValueError(
                f"data.{key}[{i}] ({sources[i].path}): has no weight, but data.{key}[{weighted.index(True)}] has one; "
                "in a weighted mixture every source needs a weight (count and whole sources go without weights)"
            )


def check_source_formats(recipe: Recipe) -> None:
    """Every source gives the kind of sample data.format gives, so one objective can train on all of them."""
    data, objective = recipe.data, recipe.objective.name
    kind = SAMPLE_KINDS[data.format]
    same = [f for f, k in SAMPLE_KINDS.items() if k == kind]
    if objective == "seq2seq":
        same = [f for f in same if f in SEQ2SEQ_FORMATS]
    for key in ("train", "eval"):
        for _, label, source in data.sources(key):
            if source.format in same:
                continue
            if SAMPLE_KINDS[source.format] != kind:
                why = (
                    f"format {source.format} gives {SAMPLE_KINDS[source.format]} samples, but data.format "
                    f"{data.format} gives {kind} samples; every source must give the same kind"
                )
            else:
                why = f"format {source.format}: objective seq2seq maps a source to a target"
            raise ValueError(
                f"{label}: {why}; give it format {' or '.join(same)} (map its columns with columns:), or change "
                "data.format"
            )


def check_warmup(recipe: Recipe) -> None:
    t = recipe.training
    if t.warmup_ratio is not None and t.warmup_steps:
        raise ValueError(
            "training.warmup_ratio, training.warmup_steps: both set the warmup; set one of them (the other to null / 0)"
        )
    if t.lr_scheduler.name == "constant" and (t.warmup_ratio or t.warmup_steps):
        raise ValueError(
            "training.lr_scheduler: constant has no warmup and would ignore it; use constant_with_warmup, or set "
            "the warmup to 0"
        )


def check_loraplus(recipe: Recipe) -> None:
    opt = recipe.training.optimizer
    if getattr(recipe.method, "loraplus_lr_ratio", None) is not None and getattr(opt, "relative_step", False):
        raise ValueError(
            "method.loraplus_lr_ratio: Adafactor with relative_step sets one step size of its own, so the B "
            "matrices cannot get a larger one; remove loraplus_lr_ratio or set training.optimizer.relative_step: "
            "false"
        )


def check_neftune(recipe: Recipe) -> None:
    if recipe.training.neftune_noise_alpha is None:
        return
    if recipe.objective.generates_while_training:
        raise ValueError(
            f"training.neftune_noise_alpha: objective {recipe.objective.name} samples its completions from the "
            "model in training mode, where NEFTune's noise would perturb them too; remove neftune_noise_alpha"
        )
    if recipe.speed.padding_free is True:
        raise ValueError(
            "speed.padding_free: NEFTune (training.neftune_noise_alpha) scales its noise by 1/sqrt(sequence length), "
            "and rows end to end are one long sequence, so each row would get less noise; set it to auto or false"
        )


def check_push_merged(recipe: Recipe) -> None:
    push = recipe.output.push_to_hub
    if push is None or not push.merged:
        return
    refusal = recipe.method.merge_refusal(recipe.output.dir or "RUN")
    if refusal is not None:
        raise ValueError(f"output.push_to_hub.merged: {refusal}; set merged: false to upload the adapter itself")


def check_prompting(recipe: Recipe) -> None:
    """Prompting baselines answer prompts; objectives scored otherwise (a head, pairs, plain text) have none."""
    if not recipe.eval.prompting:
        return
    objective = recipe.objective
    if not objective.answers_prompts:
        answering = ", ".join(name for name, spec in OBJECTIVE_SPECS.items() if spec.answers_prompts)
        raise ValueError(
            f"eval.prompting: objective {objective.name} is not scored by answering prompts, so a prompted base model "
            f"has no column to fill; prompting baselines are for {answering}; remove eval.prompting"
        )
    if recipe.data.format == "text":
        raise ValueError(
            "eval.prompting: rows of plain text (data.format: text) have no prompt to answer; use prompt/response "
            "rows (chat, instruction, prompt_completion) or remove eval.prompting"
        )


# In the order they are checked: the first that fails is the error the user sees.
RULES: tuple[Callable[[Recipe], None], ...] = (
    check_preference_data,
    check_sampled_rewards,
    check_adapter_on_head,
    check_distill,
    check_seq2seq,
    check_rows_end_to_end,
    check_frozen_bf16,
    check_gradient_checkpointing,
    check_speed_under_sharding,
    check_objective_data,
    check_eval_metrics,
    check_model_options,
    check_mixture_sizes,
    check_source_formats,
    check_warmup,
    check_loraplus,
    check_neftune,
    check_push_merged,
    check_prompting,
)
