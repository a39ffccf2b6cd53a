"""The tuning-method registry: recipe `method.name` -> builder(spec, model, tokenizer) -> model ready to train.

peft methods return a PeftModel whose run directory holds only the adapter; so does `adapter`, which inserts
llmtune's own bottleneck adapters (llmtune.bottleneck). The others (full, bitfit, head, layers) choose which
of the model's own parameters train, and the run saves the whole model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmtune.errors import LLMTuneError, first_line
from llmtune.recipe import (
    AdapterSpec,
    BitFitSpec,
    DoraSpec,
    FullSpec,
    HeadSpec,
    IA3Spec,
    LayersSpec,
    LoraSpec,
    PrefixSpec,
    PromptSpec,
    PTuningSpec,
    QLoraSpec,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# peft's task type for each kind of model (llmtune.models.AUTO_CLASSES): it decides which head peft keeps
# trainable and how inputs reach the model.
# peft has no masked-LM task: its plain PeftModel wraps the encoder with its head, which forwards as it is.
PEFT_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "seq2seq-lm": "SEQ_2_SEQ_LM",
    "masked-lm": None,
    "token-classification": "TOKEN_CLS",
}
# Task types whose head is new: peft keeps it trainable (modules_to_save), and so must every other method.
NEW_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS")

# Biased models users can reach for when BitFit refuses a bias-free one.
MODELS_WITH_BIASES = "GPT-2, OPT, BLOOM, Pythia/GPT-NeoX, BERT, Qwen2/2.5 (q/k/v biases)"


def build_lora(
    spec: LoraSpec | DoraSpec | QLoraSpec,
    model: PreTrainedModel,
    tokenizer=None,
    task_type: str = "CAUSAL_LM",
    new_tokens: list[int] | None = None,
) -> PreTrainedModel:
    """Args:
    new_tokens: ids of tokens the chat template added, whose embedding (and untied output) rows train beside
        the low-rank update, and are saved with the adapter.
    """
    from peft import LoraConfig

    if isinstance(spec, QLoraSpec):
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and enables input grads: what k-bit training needs to be stable.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    _check_modules_exist(model, spec.modules_to_save)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save or None,
        bias=spec.bias,
        use_rslora=spec.use_rslora,
        use_dora=isinstance(spec, DoraSpec),
        init_lora_weights=True if spec.init == "default" else spec.init,
        task_type=task_type,
        trainable_token_indices=_token_rows(model, new_tokens or [], spec.modules_to_save) or None,
        # peft leaves a SEQ_CLS head out of all-linear itself but not a TOKEN_CLS one, and a head given LoRA
        # layers cannot also train in full.
        exclude_modules=[classification_head(model)] if task_type == "TOKEN_CLS" else None,
    )
    return _peft(model, config)


def _token_rows(model: PreTrainedModel, ids: list[int], whole: list[str]) -> dict[str, list[int]]:
    """peft's trainable tokens for the input embeddings, and for an output head with its own weights (a tied
    head follows the embeddings by itself); a layer in `whole` (modules_to_save) trains every row anyway."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [embeddings] + ([head] if head is not None and head.weight is not embeddings.weight else [])
    names = {id(module): name for name, module in model.named_modules()}
    rows = {names[id(layer)]: list(ids) for layer in layers} if ids else {}
    return {name: r for name, r in rows.items() if name.rsplit(".", 1)[-1] not in whole}


def build_ia3(spec: IA3Spec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    from peft import IA3Config

    try:
        config = IA3Config(
            target_modules=spec.target_modules,
            feedforward_modules=spec.feedforward_modules,
            task_type=task_type,
        )
    except ValueError as e:
        raise LLMTuneError(f"method.feedforward_modules: {first_line(e)}") from None
    return _peft(model, config)


def build_prefix(
    spec: PrefixSpec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    import torch
    from peft import PrefixTuningConfig

    config = PrefixTuningConfig(
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=spec.projection,
        encoder_hidden_size=spec.projection_hidden_size,
        task_type=task_type,
    )
    init = spec.init or ("random" if spec.projection or task_type != "CAUSAL_LM" else "vocab")
    if init == "random":
        return _peft(model, config)
    if task_type != "CAUSAL_LM":
        raise LLMTuneError(f"method.init: {init} needs a causal language model; use method.init: random")
    if init == "text":
        ids = _init_text_ids(spec, tokenizer)
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(model.config.vocab_size, (spec.num_virtual_tokens,), generator=generator).tolist()
    prefix = _keys_and_values(model, ids)
    peft_model = _peft(model, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prefix)
    return peft_model


def _keys_and_values(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """The model's own cached keys and values for `ids`, one row per position, in peft's prefix layout.

    Li & Liang (2021) found prefixes started from real tokens' activations train far better than random ones;
    peft's N(0, 1) init puts keys and values well off the scale of the model's own, so at step 0 the prefix
    dominates attention and the loss starts far above the base model's.
    """
    import torch

    training = model.training
    model.eval()  # no dropout in the activations we keep
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    model.train(training)
    # peft reads row p as (2 * layers, kv heads, head dim): layer l's key at 2l, its value at 2l + 1.
    per_layer = [t[0] for layer in cache.layers for t in (layer.keys, layer.values)]
    return torch.stack(per_layer).permute(2, 0, 1, 3).reshape(len(ids), -1)


def _init_text_ids(spec: PrefixSpec | PromptSpec, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """init_text's token ids, repeated to fill every virtual token as peft does."""
    ids = tokenizer(spec.init_text, add_special_tokens=False)["input_ids"]
    if len(ids) > spec.num_virtual_tokens:
        raise LLMTuneError(
            f"method.init_text is {len(ids)} tokens but method.num_virtual_tokens is "
            f"{spec.num_virtual_tokens}; shorten the text or raise num_virtual_tokens"
        )
    return (ids * math.ceil(spec.num_virtual_tokens / len(ids)))[: spec.num_virtual_tokens]


def build_prompt(
    spec: PromptSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    import torch
    from peft import PromptTuningConfig

    ids = _init_text_ids(spec, tokenizer) if spec.init == "text" else None
    peft_model = _peft(model, PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type))
    if ids:
        # peft's own text init reloads the tokenizer by hub name; this works for any tokenizer we loaded.
        with torch.no_grad():
            vectors = model.get_input_embeddings()(torch.tensor(ids)).detach().clone()
            peft_model.prompt_encoder["default"].embedding.weight.copy_(vectors)
    return peft_model


def build_ptuning(
    spec: PTuningSpec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(
        num_virtual_tokens=spec.num_virtual_tokens,
        encoder_reparameterization_type=spec.encoder.upper(),
        encoder_hidden_size=spec.encoder_hidden_size,
        task_type=task_type,
    )
    return _peft(model, config)


def _peft(model: PreTrainedModel, config) -> PreTrainedModel:
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except (ValueError, KeyError) as e:
        message = first_line(e)
        if "not found in the base model" in message or "Target modules" in message:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
            wanted = sorted(config.target_modules or [])
            raise LLMTuneError(
                f"method.target_modules: {', '.join(wanted)} not found in {type(model).__name__}; "
                f"its linear modules are {', '.join(names)}"
            ) from None
        raise LLMTuneError(f"method {config.peft_type.value.lower()}: {message}") from None


def _check_modules_exist(model: PreTrainedModel, names: list[str]) -> None:
    # peft skips a modules_to_save entry that matches nothing, so a typo would silently train less.
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = [n for n in names if n not in present]
    if missing:
        top = sorted({name.split(".")[-1] for name, m in model.named_modules() if name and not list(m.children())})
        raise LLMTuneError(
            f"method.modules_to_save: {', '.join(missing)} not found in {type(model).__name__}; "
            f"module names include {', '.join(top[:12])}"
        )


def build_adapter(
    spec: AdapterSpec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    from llmtune.bottleneck import add_adapters

    if task_type != "CAUSAL_LM":
        # The run saves the adapters alone; a new task head would start random and not be saved with them.
        raise LLMTuneError(
            f"method adapter: trains language models only (the objective needs a {task_type} model); use lora"
        )
    targets = add_adapters(model, spec)
    kinds = sorted({t.rsplit(".", 1)[-1] for t in targets})
    print(
        f"method adapter: {spec.placement} bottleneck adapters after {', '.join(kinds)}: {len(targets)} modules "
        f"({targets[0]} ... {targets[-1]})"
    )
    return model


def _is_linear(module) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")


# --- methods that train a subset of the model's own parameters -----------------------------------


def build_full(spec: FullSpec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    return _train_only(model, lambda name: True)


def build_bitfit(
    spec: BitFitSpec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    if not any(name.endswith(".bias") for name, _ in model.named_parameters()):
        raise LLMTuneError(
            f"method bitfit: {type(model).__name__} has no bias parameters to train; "
            f"use a model with biases ({MODELS_WITH_BIASES}) or another method"
        )
    return _train_only(model, lambda name: name.endswith(".bias"), task_type)


def build_head(spec: HeadSpec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    if task_type in NEW_HEAD_TASKS:
        head = classification_head(model)
        return _train_only(model, lambda name: name.startswith(f"{head}."))
    head = model.get_output_embeddings()
    if head is None:
        raise LLMTuneError(f"method head: {type(model).__name__} has no output head")
    embeddings = model.get_input_embeddings()
    if head.weight is embeddings.weight:
        if spec.tied == "shared":
            print("method head: lm_head is tied to the input embeddings; training the shared matrix (both change)")
        else:
            # Give the head its own copy so the input embeddings stay as pretrained.
            import torch

            head.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
            print("method head: lm_head was tied to the input embeddings; untied it and training the head only")
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    return model


def build_layers(
    spec: LayersSpec, model: PreTrainedModel, tokenizer=None, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    chosen: list[str] = []
    if spec.last_k is not None or spec.pattern is None:
        prefix, n_blocks = _blocks(model)
        k = spec.last_k or 1
        if k > n_blocks:
            raise LLMTuneError(f"method.last_k is {k} but the model has {n_blocks} blocks")
        chosen.append(rf"^{re.escape(prefix)}\.({'|'.join(str(i) for i in range(n_blocks - k, n_blocks))})\.")
    if spec.pattern is not None:
        chosen.append(spec.pattern)
    regex = re.compile("|".join(f"(?:{c})" for c in chosen))
    model = _train_only(model, lambda name: regex.search(name) is not None, task_type)
    if not any(p.requires_grad for p in model.parameters()):
        raise LLMTuneError(f"method.pattern {spec.pattern!r} matches no parameter name (e.g. {_example_name(model)})")
    return model


def _blocks(model: PreTrainedModel) -> tuple[str, int]:
    """Name and length of the model's stack of transformer blocks: the longest ModuleList."""
    import torch

    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise LLMTuneError(f"method layers: no block list found in {type(model).__name__}; use method.pattern")
    return max(lists, key=lambda item: item[1])


def _example_name(model: PreTrainedModel) -> str:
    return next(name for name, _ in model.named_parameters())


# Where transformers puts the new head of a sequence or token classifier: Llama/Qwen/GPT-2 `score`, BERT-likes
# `classifier`.
CLASSIFICATION_HEADS = ("score", "classifier")


def classification_head(model: PreTrainedModel) -> str:
    """Name of a sequence or token classifier's head module."""
    children = dict(model.named_children())
    for name in CLASSIFICATION_HEADS:
        if name in children:
            return name
    raise LLMTuneError(
        f"method head/bitfit/layers: {type(model).__name__} has no classification head named "
        f"{' or '.join(CLASSIFICATION_HEADS)} to train; use method full, or lora with modules_to_save naming its head"
    )


def _train_only(model: PreTrainedModel, wanted: Callable[[str], bool], task_type: str = "") -> PreTrainedModel:
    """Train the parameters `wanted` picks; a classifier's new head always trains, as peft keeps it for SEQ_CLS and
    TOKEN_CLS: a randomly initialised head left frozen would make the classifier guess."""
    head = f"{classification_head(model)}." if task_type in NEW_HEAD_TASKS else None
    for name, p in model.named_parameters():
        p.requires_grad_(wanted(name) or (head is not None and name.startswith(head)))
    return model


METHODS: dict[str, Callable] = {
    "lora": build_lora,
    "qlora": build_lora,
    "dora": build_lora,
    "ia3": build_ia3,
    "prefix": build_prefix,
    "prompt": build_prompt,
    "p-tuning": build_ptuning,
    "adapter": build_adapter,
    "bitfit": build_bitfit,
    "head": build_head,
    "layers": build_layers,
    "full": build_full,
}
