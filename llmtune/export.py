"""Export a run, a merged model or any model reference to one GGUF file for llama.cpp, Ollama and LM Studio.

Three stages, each timed: merge (an adapter run is merged in memory, as `merge-adapter` merges it), write
(llama.cpp's own `gguf` package: its writer, tensor-name map and numpy quantizers) and verify. The file is
written next to the output under a temporary name and renamed only once transformers' independent GGUF reader
loads it back with logits within the quantization's tolerance, the same greedy completions for f32 and f16,
and a tokenizer that encodes the probes to the same ids; a failed check leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtune.artifacts import is_run_dir, make_readable, open_run
from llmtune.data import Sample, encode_prompt
from llmtune.errors import LLMTuneError, first_line
from llmtune.merge import (
    FALLBACK_PROBES,
    logits,
    merge_in_memory,
    probe_batch,
    probe_ids,
    probe_samples,
    refuse_unmergeable,
)
from llmtune.models import load_config, load_model, load_tokenizer, load_tuned, options_for
from llmtune.templates import end_of_turn

if TYPE_CHECKING:
    import numpy as np
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from llmtune.recipe import Recipe

# Largest max |logit diff| on the probes that each quantization may show against the merged float32 model:
# about twice what builtin:smollm2-135m-instruct measured (benchmarks/RESULTS.md, "GGUF export"), the max over
# every vocabulary logit at every probe position, so a few outliers set it. --tolerance replaces it.
TOLERANCES = {
    "f32": 1e-3,  # measured 0
    "f16": 0.1,  # 0.038
    "bf16": 0.5,  # 0.23
    "q8_0": 3.0,  # 1.31
    "q5_1": 25.0,  # 11.8
    "q5_0": 20.0,  # 8.7
    "q4_1": 35.0,  # 5.5 on a model that was Q4_1 before; q4_0's value is the guide
    "q4_0": 35.0,  # 17.1
}
QUANTS = tuple(TOLERANCES)
# Quantizations whose greedy completions must equal the merged model's: the others round weights enough to
# change a near-tie between two tokens, which the logit tolerance bounds instead.
GREEDY_QUANTS = ("f32", "f16")
GREEDY_TOKENS = 16
# Largest max |logit diff| between the file and the merged model rounded in memory to the same quantization.
FAITHFUL = 1e-3


@dataclass(frozen=True)
class _Family:
    """How one transformers model type is written: its llama.cpp architecture and what differs from the rest."""

    arch: str  # a gguf.MODEL_ARCH member's name
    # llama.cpp's llama graph expects each query and key head's rotary halves interleaved (convert_hf_to_gguf's
    # `permute`); transformers' GGUF reader undoes it for the llama architecture only.
    permute_qk: bool = False


FAMILIES = {
    "llama": _Family("LLAMA", permute_qk=True),
    "mistral": _Family("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as the llama architecture
    "qwen2": _Family("QWEN2"),
    "qwen3": _Family("QWEN3"),
}


@dataclass
class ExportResult:
    out: Path
    quant: str
    max_abs_diff: float  # exported file vs merged model, logits on the probes
    rounded_max_abs_diff: float  # exported file vs merged model rounded to `quant` in memory
    tolerance: float
    greedy_equal: bool  # greedy completions equal the merged model's (required for GREEDY_QUANTS only)
    probes: int
    size_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)  # merge, write, verify
    modelfile: Path | None = None
    f16_fallback: list[str] = field(default_factory=list)  # tensors whose rows do not fit the quant's blocks


@dataclass
class _Source:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    recipe: Recipe | None  # the run's recipe; None for a model reference
    name: str
    note: str = ""  # what the merge line adds: how far the merge is from what was trained


def default_output(target: str | Path, quant: str) -> Path:
    """<run dir>/export/model-<quant>.gguf for a run directory, else ./<name>-<quant>.gguf."""
    path = Path(target).expanduser()
    if is_run_dir(path):
        return path / "export" / f"model-{quant}.gguf"
    return Path(f"{_name(str(target))}-{quant}.gguf")


def _name(ref: str) -> str:
    path = Path(ref).expanduser()
    if path.exists():
        return path.resolve().name
    return ref.removeprefix("builtin:").replace(":", "-").rstrip("/").rsplit("/", 1)[-1]


def export_gguf(
    target: str | Path,
    out: Path | None = None,
    quant: str = "q8_0",
    ollama: bool = False,
    overwrite: bool = False,
    tolerance: float | None = None,
    progress: Callable[[str], None] = print,
) -> ExportResult:
    """Write `target` as a verified GGUF file (see the module docstring); `progress` gets one line per stage."""
    quant = _check_quant(quant)
    tolerance = TOLERANCES[quant] if tolerance is None else tolerance
    out = (out if out is not None else default_output(target, quant)).expanduser().resolve()
    if out.suffix != ".gguf":
        raise LLMTuneError(f"{out}: --out must name a .gguf file")
    modelfile = out.parent / "Modelfile" if ollama else None
    for path in (out, modelfile):
        if path is not None and path.exists() and not overwrite:
            raise LLMTuneError(f"{path}: already exists; pass --overwrite to replace it, or choose another --out")
    family = _check_target(target)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    source = _load_source(target)
    modelfile_text = None
    if modelfile is not None:
        from llmtune.ollama import modelfile as build_modelfile

        system = source.recipe.data.system_prompt if source.recipe is not None else None
        modelfile_text = build_modelfile(out.name, source.tokenizer, system)
    seconds["merge"] = time.perf_counter() - start
    progress(f"merge: {source.name} ready in {seconds['merge']:.1f}s{source.note}")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".gguf", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        start = time.perf_counter()
        fallback = write_gguf(source.model, source.tokenizer, family, quant, tmp, source.name)
        seconds["write"] = time.perf_counter() - start
        size = tmp.stat().st_size
        progress(f"write: {quant}, {size / 1e6:.1f} MB in {seconds['write']:.1f}s")

        start = time.perf_counter()
        diff, faithful, greedy, probes = _verify(source, tmp, quant, tolerance)
        seconds["verify"] = time.perf_counter() - start
        greedy_note = "equal" if greedy else f"differ (allowed for {quant})"
        progress(
            f"verify: max |logit diff| {diff:.3g} on {probes} probes (tolerance {tolerance:g}); "
            f"{faithful:.2g} against the model rounded to {quant} in memory; greedy {GREEDY_TOKENS}-token "
            f"completions {greedy_note}; tokenizer ids equal; in {seconds['verify']:.1f}s"
        )
        make_readable(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if modelfile is not None:
        from llmtune.artifacts import write_text

        write_text(modelfile, modelfile_text)
    return ExportResult(
        out=out,
        quant=quant,
        max_abs_diff=diff,
        rounded_max_abs_diff=faithful,
        tolerance=tolerance,
        greedy_equal=greedy,
        probes=probes,
        size_bytes=size,
        seconds=seconds,
        modelfile=modelfile,
        f16_fallback=fallback,
    )


def _check_quant(quant: str) -> str:
    q = quant.lower()
    if q in QUANTS:
        return q
    why = (
        "k-quants and i-quants are written by llama.cpp's llama-quantize, not by the gguf package's numpy "
        "quantizers; export q8_0 or f16 and run llama-quantize on it"
        if "_k" in q or q.startswith(("iq", "tq"))  # llama.cpp's k-, i- and ternary quants
        else "unknown quantization"
    )
    raise LLMTuneError(f"--quant {quant}: {why}; supported: {', '.join(QUANTS)}")


def _check_target(target: str | Path) -> _Family:
    """The family `target` is written as; what cannot become one causal LM file is refused before any model loads
    (a large model takes minutes to load and merge)."""
    path = Path(target).expanduser()
    if not is_run_dir(path):
        ref = str(target)
        config = load_config(ref)
        if getattr(config, "is_encoder_decoder", False):
            raise LLMTuneError(f"model {ref!r} is an encoder-decoder; GGUF export writes causal language models")
        return _family(config)
    run = open_run(path)
    recipe = run.recipe()
    objective = recipe.objective
    if objective.model_kind != "causal-lm" or objective.name == "reward-model":
        raise LLMTuneError(
            f"{path}: objective {objective.name!r} trains a {objective.model_kind} model, and GGUF export writes "
            f"causal language models for llama.cpp; use the run directory itself: llmtune eval {path} / "
            f"llmtune generate {path} '...'"
        )
    if recipe.method.saves_adapter:
        refuse_unmergeable(path, run)
    # A distilled student is built from its teacher's architecture.
    base = objective.teacher if getattr(objective, "student", None) is not None else recipe.model
    return _family(load_config(base, options_for(recipe, base)))


def _load_source(target: str | Path) -> _Source:
    path = Path(target).expanduser()
    if is_run_dir(path):
        run = open_run(path)
        recipe = run.recipe()
        if not recipe.method.saves_adapter:
            model, tokenizer = load_tuned(path)
            return _Source(model.float().cpu(), tokenizer, recipe, path.resolve().name)
        merged = merge_in_memory(path)
        note = f"; merged vs base+adapter max |logit diff| {merged.max_abs_diff:.2g}"
        if merged.quantized_max_abs_diff is not None:
            note += f", vs the 4-bit model {merged.quantized_max_abs_diff:.3g} (merged over the dequantized base)"
        return _Source(merged.model.float().cpu(), merged.tokenizer, recipe, path.resolve().name, note)
    ref = str(target)
    return _Source(load_model(ref), load_tokenizer(ref), None, _name(ref))


def _family(config: PretrainedConfig) -> _Family:
    model_type = config.model_type
    family = FAMILIES.get(model_type)
    if family is None:
        raise LLMTuneError(
            f"model type {model_type!r}: GGUF export does not support it yet; supported: {', '.join(FAMILIES)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LLMTuneError(
            f"model type {model_type!r} with rope scaling {rope.get('rope_type')!r}: GGUF export writes unscaled "
            "rotary embeddings only so far"
        )
    return family


# --- writing -----------------------------------------------------------------------------------------


def write_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: _Family, quant: str, path: Path, name: str
) -> list[str]:
    """Write the model, its tokenizer and chat template to `path`; returns the tensors kept f16 because their
    rows are not a whole number of the quantization's blocks (llama.cpp's converter does the same)."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, family.arch)
    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[quant](gguf))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, config)
    _write_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    fallback = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses the embedding matrix when there is no output tensor
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LLMTuneError(f"tensor {hf_name}: no llama.cpp name for it in architecture {family.arch.lower()}")
        weights = tensor.detach().float().cpu().numpy()
        projection = hf_name.rsplit(".", 2)[-2]
        if family.permute_qk and projection in heads:
            weights = _permute(weights, heads[projection])
        data, qtype = _quantize(weights, quant, gguf)
        if qtype != _QTYPES[quant](gguf) and weights.ndim > 1:
            fallback.append(hf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)  # the writer reads a block quant's shape from its bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return fallback


_FILE_TYPES = {
    "f32": lambda g: g.LlamaFileType.ALL_F32,
    "f16": lambda g: g.LlamaFileType.MOSTLY_F16,
    "bf16": lambda g: g.LlamaFileType.MOSTLY_BF16,
    "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0,
    "q5_1": lambda g: g.LlamaFileType.MOSTLY_Q5_1,
    "q5_0": lambda g: g.LlamaFileType.MOSTLY_Q5_0,
    "q4_1": lambda g: g.LlamaFileType.MOSTLY_Q4_1,
    "q4_0": lambda g: g.LlamaFileType.MOSTLY_Q4_0,
}
_QTYPES = {q: (lambda g, q=q: getattr(g.GGMLQuantizationType, q.upper())) for q in QUANTS}


def _quantize(weights: np.ndarray, quant: str, gguf) -> tuple[np.ndarray, Any]:
    """Norms and biases (1-D) stay f32, as llama.cpp keeps them; rows that do not fill whole blocks fall back to
    f16."""
    qtype = _QTYPES[quant](gguf)
    if weights.ndim <= 1 or quant == "f32":
        return weights, gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(weights, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(weights, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_hparams(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _write_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, rows: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp's converter writes it ("gpt2": tokens, merges, token types), the
    special token ids, whether BOS is added, the chat template and the end-of-turn token."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = backend["model"]
    pre = _pre_tokenizer(backend.get("pre_tokenizer"))
    if bpe.get("type") != "BPE" or pre is None or bpe.get("byte_fallback"):
        raise LLMTuneError(
            f"tokenizer {tokenizer.name_or_path!r}: GGUF export writes byte-level BPE tokenizers (GPT-2 style: "
            "SmolLM, Qwen, Llama 3) so far; this one is not"
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows:
        raise LLMTuneError(f"tokenizer has {len(vocab)} tokens but the model only {rows} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        if token is None:  # embedding rows beyond the vocabulary, as llama.cpp's converter names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    else:
        # A vocabulary without merges (single bytes and special tokens): readers derive merges from scores.
        writer.add_token_scores([0.0] * len(tokens))
    for token, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
    ):
        if token is not None:
            add(token)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
        turn = end_of_turn(tokenizer)
        if turn and turn != tokenizer.eos_token and turn in vocab:
            writer.add_eot_token_id(vocab[turn])


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding text puts BOS first: llama.cpp then prepends it to every prompt itself."""
    with_bos = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(with_bos) and with_bos[0] == tokenizer.bos_token_id


def _pre_tokenizer(pre: dict | None) -> str | None:
    """llama.cpp's name for how this tokenizer splits text before BPE, or None for a split it has no name for."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    ):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        regex = steps[0].get("pattern", {}).get("Regex")
        return next((name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex), None)
    return None


# --- verification ------------------------------------------------------------------------------------


def _verify(source: _Source, path: Path, quant: str, tolerance: float) -> tuple[float, float, bool, int]:
    """Read the file back with transformers' GGUF reader and compare it with the merged model: max |logit diff|
    against it and against it rounded in memory, whether greedy completions agree, and the number of probes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        exported = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, IndexError, NotImplementedError) as e:
        raise LLMTuneError(
            f"export check failed: transformers cannot read the written file back ({first_line(e)}); nothing written"
        ) from None
    model, tokenizer, recipe = source.model, source.tokenizer, source.recipe

    ids = probe_ids(recipe, tokenizer)
    if probe_ids(recipe, gguf_tokenizer) != ids:
        raise LLMTuneError(
            "export check failed: the GGUF tokenizer encodes the probe rows to other token ids than the model's "
            "tokenizer; nothing written"
        )
    prompts = greedy_prompts(recipe, tokenizer)
    if [encode_prompt(s, gguf_tokenizer) for s in prompts] != [encode_prompt(s, tokenizer) for s in prompts]:
        raise LLMTuneError(
            "export check failed: the GGUF tokenizer encodes the chat prompts to other token ids than the model's "
            "tokenizer; nothing written"
        )
    batch = probe_batch(recipe, tokenizer)
    with torch.no_grad():
        exported_logits = logits(exported, batch)
        diff = (exported_logits - logits(model, batch)).abs().max().item()
    if not diff <= tolerance:
        raise LLMTuneError(
            f"export check failed: {quant} logits differ from the merged model's by {diff:.3g} on the probes "
            f"(tolerance {tolerance:g}); nothing written"
        )
    from llmtune.generation import Sampling, generate

    encoded = [encode_prompt(s, tokenizer) for s in prompts]
    sampling = Sampling(max_new_tokens=GREEDY_TOKENS)
    want = generate(model, tokenizer, encoded, sampling, len(encoded))
    got = generate(exported, tokenizer, encoded, sampling, len(encoded))
    greedy = [(c.text, c.tokens) for c in got] == [(c.text, c.tokens) for c in want]
    if not greedy and quant in GREEDY_QUANTS:
        bad = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        raise LLMTuneError(
            f"export check failed: {quant} greedy completion of probe {bad} differs from the merged model's "
            f"({got[bad].text!r} vs {want[bad].text!r}); nothing written"
        )
    # The tolerance bounds the rounding; this proves the file holds exactly the rounded weights: the merged model
    # rounded in memory by the same quantizer must give the exported logits, up to float32 summation order.
    _round_in_place(model, quant)
    with torch.no_grad():
        faithful = (exported_logits - logits(model, batch)).abs().max().item()
    if not faithful <= FAITHFUL:
        raise LLMTuneError(
            f"export check failed: the {quant} file's logits differ by {faithful:.3g} from the merged model rounded "
            f"to {quant} in memory (allowed {FAITHFUL:g}); the file does not hold the weights; nothing written"
        )
    return diff, faithful, greedy, len(ids)


def _round_in_place(model: PreTrainedModel, quant: str) -> None:
    """Give the model's weights the values the file stores (its last use: verification ends with it)."""
    import gguf

    with torch.no_grad():
        for param in model.parameters():
            weights = param.detach().float().cpu().numpy()
            data, qtype = _quantize(weights, quant, gguf)
            param.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(weights.shape)))


def greedy_prompts(recipe: Recipe | None, tokenizer: PreTrainedTokenizerBase) -> list[Sample]:
    """The held-out rows' prompts (what the model is given at inference), else the fixed probes, as a user turn
    when the tokenizer has a chat template."""
    prompts = [p for s in probe_samples(recipe) if (p := s.prompt_and_reference()) is not None]
    if prompts:
        return [prompt for prompt, _ in prompts]
    if tokenizer.chat_template:
        return [Sample(messages=[{"role": "user", "content": text}]) for text in FALLBACK_PROBES]
    return [Sample(segments=[(text, False)]) for text in FALLBACK_PROBES]
