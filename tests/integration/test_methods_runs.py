"""Every tuning method end to end on the tiny models: finetune, the saved run, reload, eval, merge, generation.

The checks share one in-process `finetune` per case through a module-scoped, lazily filled cache; the model
object handed to `llmtune.run._save_weights` is intercepted to record its end-of-training logits and
trainable set, which the saved run must reproduce.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    ADAPTER_METHODS,
    GPT2,
    LLAMA,
    UNMERGEABLE_METHODS,
    chat_rows,
    expect_error,
    fresh,
    logits_of,
    probe_batch,
    save_recipe,
    trainable_names,
    write_jsonl,
)
from helpers import METHOD_PROBE_PROMPTS as PROBE_PROMPTS
from helpers import tiny_training as _training

import llmtune.run
from llmtune import artifacts
from llmtune.evaluation import evaluate
from llmtune.generation import Sampling, complete
from llmtune.merge import merge_adapter
from llmtune.models import load_model, load_tokenizer, load_tuned, parameter_counts
from llmtune.recipe import load_recipe
from llmtune.run import finetune

# --- 3. end to end per method ---------------------------------------------------------------------

# id -> (model, method section as a user writes it, extra training keys)
E2E_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "lora": (LLAMA, {"name": "lora"}, {}),
    "lora-save-head": (LLAMA, {"name": "lora", "modules_to_save": ["lm_head"]}, {}),
    "rslora": (LLAMA, {"name": "lora", "r": 4, "alpha": 8, "use_rslora": True}, {}),
    "dora": (LLAMA, {"name": "dora"}, {}),
    "qlora": (LLAMA, {"name": "qlora"}, {}),
    "qlora-8bit": (LLAMA, {"name": "qlora", "bits": 8}, {}),
    "ia3": (LLAMA, {"name": "ia3"}, {}),
    "prefix": (LLAMA, {"name": "prefix"}, {}),
    "prompt": (LLAMA, {"name": "prompt"}, {}),
    "prompt-text": (LLAMA, {"name": "prompt", "init": "text", "init_text": "Count:", "num_virtual_tokens": 8}, {}),
    "p-tuning": (LLAMA, {"name": "p-tuning"}, {}),
    "adapter": (LLAMA, {"name": "adapter"}, {}),
    "adapter-houlsby-gpt2": (GPT2, {"name": "adapter", "placement": "houlsby", "non_linearity": "gelu"}, {}),
    "bitfit": (GPT2, {"name": "bitfit"}, {}),
    "head": (GPT2, {"name": "head"}, {}),
    "head-shared": (GPT2, {"name": "head", "tied": "shared"}, {}),
    "layers": (LLAMA, {"name": "layers"}, {}),
    "full": (LLAMA, {"name": "full"}, {}),
    "lora-gc": (LLAMA, {"name": "lora"}, {"speed": {"gradient_checkpointing": True}}),
    "prompt-gc": (LLAMA, {"name": "prompt"}, {"speed": {"gradient_checkpointing": True}}),
}
GC_CASES = ["lora-gc", "prompt-gc"]
# Scoring and generation on two held-out rows exercise every path (prefix cache, virtual tokens) at a third of the cost.
EVAL_OVERRIDES = ["eval.max_examples=2"]
MAIN_CASES = [c for c in E2E_CASES if c not in GC_CASES]
MERGEABLE = [c for c in MAIN_CASES if E2E_CASES[c][1]["name"] in ADAPTER_METHODS - UNMERGEABLE_METHODS]
UNMERGEABLE = [c for c in MAIN_CASES if E2E_CASES[c][1]["name"] in UNMERGEABLE_METHODS]
STANDALONE = [c for c in MAIN_CASES if E2E_CASES[c][1]["name"] not in ADAPTER_METHODS]


def method_of(case: str) -> str:
    return E2E_CASES[case][1]["name"]


def write_recipe(
    root: Path, name: str, ref: str, method: dict[str, Any], speed: dict[str, Any] | None = None, **training: Any
) -> Path:
    write_jsonl(root / "data" / "train.jsonl", chat_rows(24))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(6))
    recipe = {
        "model": ref,
        "method": method,
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        # lr 1e-2 so three steps move every method's weights well away from their start. The end-of-training
        # model is compared with the saved run in float32; speed.frozen_bf16 would leave its frozen weights
        # rounded to bf16 (tests/integration/test_speed_runs.py checks that lever's save and reload under autocast).
        "training": _training(**training),
        "speed": {"frozen_bf16": False, **(speed or {})},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
    }
    return save_recipe(root, name, recipe)


@dataclass
class Trained:
    case: str
    recipe: Path
    run: Path
    metrics: dict[str, Any]
    probe: dict[str, torch.Tensor]
    logits: torch.Tensor  # end-of-training model, eval mode, on `probe`
    trainable: dict[str, int]  # name -> numel of what required grad when the run saved its weights
    trainable_dtypes: set[torch.dtype]
    state: dict[str, torch.Tensor]  # the end-of-training model's state dict (non-adapter methods only)
    trainable_state_keys: set[str]  # its keys that are (or alias) a trainable parameter: tied heads count


def _train(root: Path, case: str) -> Trained:
    ref, method, training = E2E_CASES[case]
    recipe = write_recipe(root, case, ref, method, **training)
    probe = probe_batch(load_tokenizer(ref), PROBE_PROMPTS)
    seen: dict[str, Any] = {}
    save_weights = llmtune.run._save_weights

    def spy(run, model, recipe_):
        seen["logits"] = logits_of(model, probe)
        seen["trainable"] = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        seen["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["state"], seen["state_keys"] = {}, set()
        if method["name"] not in ADAPTER_METHODS:
            state = model.state_dict(keep_vars=True)
            pointers = {p.data_ptr() for p in model.parameters() if p.requires_grad}
            seen["state"] = {k: v.detach().clone() for k, v in state.items()}
            seen["state_keys"] = {k for k, v in state.items() if v.data_ptr() in pointers}
        return save_weights(run, model, recipe_)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llmtune.run, "_save_weights", spy)
        result = finetune(recipe)
    assert "logits" in seen, "finetune never called _save_weights"
    return Trained(
        case,
        recipe,
        result.run.path,
        result.metrics,
        probe,
        seen["logits"],
        seen["trainable"],
        seen["dtypes"],
        seen["state"],
        seen["state_keys"],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[str], Trained]:
    """case -> its finished run, trained once per module on first use."""
    root = tmp_path_factory.mktemp("methods")
    cache: dict[str, Trained] = {}

    def get(case: str) -> Trained:
        if case not in cache:
            cache[case] = _train(root, case)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory) -> Callable[[str], dict[str, float]]:
    """model ref -> eval metrics of the untouched base model, once per ref."""
    root = tmp_path_factory.mktemp("base-eval")
    cache: dict[str, dict[str, float]] = {}

    def get(ref: str) -> dict[str, float]:
        if ref not in cache:
            recipe = write_recipe(root, ref.replace(":", "-"), ref, {"name": "full"})
            cache[ref] = evaluate(recipe, overrides=EVAL_OVERRIDES).results["base"]
        return cache[ref]

    return get


@pytest.mark.parametrize("case", MAIN_CASES)
def test_run_directory_holds_adapter_or_model(trained, case: str):
    t = trained(case)
    manifest = json.loads((t.run / artifacts.MANIFEST_FILE).read_text())
    assert manifest["status"] == "completed"
    if method_of(case) in ADAPTER_METHODS:
        # peft writes adapter_config.json; llmtune's bottleneck adapters their own config.
        config = "bottleneck_config.json" if method_of(case) == "adapter" else "adapter_config.json"
        assert (t.run / "adapter" / config).is_file()
        assert not (t.run / "model").exists()
    else:
        assert (t.run / "model" / "config.json").is_file()
        assert not (t.run / "adapter").exists()
    assert math.isfinite(t.metrics["train_loss"]) and t.metrics["steps"] == 3


@pytest.mark.parametrize("case", MAIN_CASES)
def test_metrics_report_the_trainable_and_total_parameter_counts(trained, case: str):
    t = trained(case)
    on_disk = json.loads((t.run / artifacts.METRICS_FILE).read_text())["parameters"]
    ref, method, _ = E2E_CASES[case]
    model, _ = fresh(ref, method)
    assert on_disk == t.metrics["parameters"] == parameter_counts(model)
    # What trained is what the builder chose, and the reported count is exactly its elements.
    assert set(t.trainable) == trainable_names(model)
    assert on_disk["trainable"] == sum(t.trainable.values())
    assert (on_disk["trainable"] == on_disk["total"]) is (method["name"] == "full")


@pytest.mark.parametrize("case", MAIN_CASES + GC_CASES)
def test_reloaded_run_gives_the_end_of_training_logits(trained, case: str):
    t = trained(case)
    model, _ = load_tuned(t.run)
    reloaded = logits_of(model, t.probe)
    assert reloaded.shape == t.logits.shape
    assert (reloaded - t.logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", [c for c in MAIN_CASES if method_of(c) in ADAPTER_METHODS])
def test_adapter_weights_train_and_save_in_float32(trained, case: str):
    """Every recipe here asks for float32 (training.dtype, and qlora's compute_dtype default)."""
    from safetensors import safe_open

    t = trained(case)
    assert t.trainable_dtypes == {torch.float32}
    with safe_open(str(t.run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("case", STANDALONE)
def test_standalone_methods_change_only_what_they_train(trained, case: str):
    t = trained(case)
    ref = E2E_CASES[case][0]
    base = load_model(ref).state_dict()
    tuned = t.state
    moved = {k for k in base if k in tuned and not torch.equal(base[k], tuned[k])}
    assert moved, "training changed nothing"
    assert moved <= t.trainable_state_keys, f"frozen weights changed: {sorted(moved - t.trainable_state_keys)}"


def test_head_untie_keeps_the_input_embeddings_through_training_and_reload(trained):
    t = trained("head")
    base = load_model(GPT2)
    model, _ = load_tuned(t.run)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(model.get_output_embeddings().weight, base.get_output_embeddings().weight)


@pytest.mark.parametrize("case", MAIN_CASES)
def test_evaluate_compare_base_for_every_method(trained, base_eval, case: str):
    t = trained(case)
    report = evaluate(t.run, compare_base=True, overrides=EVAL_OVERRIDES)
    assert report.examples == 2 and len(report.predictions) == 2
    assert set(report.results) == {"tuned", "base"}
    tuned, base = report.results["tuned"], report.results["base"]
    assert math.isfinite(tuned["perplexity"]) and math.isfinite(base["perplexity"])
    assert tuned["perplexity"] != base["perplexity"], "the tuned model scores exactly as its base"
    if method_of(case) != "qlora":  # a qlora base is the 4-bit model, not the float one
        reference = base_eval(E2E_CASES[case][0])
        assert base["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_adapter_folds_the_adapter_into_a_plain_model(trained, tmp_path: Path, case: str):
    from transformers import AutoModelForCausalLM

    t = trained(case)
    out = tmp_path / "merged"
    result = merge_adapter(t.run, out)
    assert result.max_abs_diff < 1e-3
    assert result.base_max_abs_diff > 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    linears = [m for n, m in merged.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert len(linears) == 4 and all(type(m) is torch.nn.Linear for m in linears)
    if method_of(case) != "qlora":
        # Without quantization the merged model computes the end-of-training function.
        assert (logits_of(merged, t.probe) - t.logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", UNMERGEABLE)
def test_merge_adapter_refuses_unmergeable_methods(trained, tmp_path: Path, case: str):
    t = trained(case)
    with expect_error("nothing to merge", "generate"):
        merge_adapter(t.run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", STANDALONE)
def test_merge_adapter_says_standalone_models_need_no_merge(trained, tmp_path: Path, case: str):
    t = trained(case)
    with expect_error("already a standalone model"):
        merge_adapter(t.run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", MAIN_CASES)
def test_complete_generates_text_for_every_method(trained, case: str):
    t = trained(case)
    text = complete(str(t.run), "hi", Sampling(max_new_tokens=4))
    assert isinstance(text, str)


# --- 4. gradient checkpointing ---------------------------------------------------------------------


@pytest.mark.parametrize("case", GC_CASES)
def test_gradient_checkpointing_trains(trained, case: str):
    t = trained(case)
    assert math.isfinite(t.metrics["train_loss"]) and t.metrics["steps"] == 3
    assert math.isfinite(t.metrics["eval_loss"])
    recipe = load_recipe(t.run / artifacts.RECIPE_FILE)
    assert recipe.speed.gradient_checkpointing is True
    # It trained what the method trains, and the weights moved.
    plain = trained(case.removesuffix("-gc"))
    assert set(t.trainable) == set(plain.trainable)
    assert (t.logits - logits_of(load_model(E2E_CASES[case][0]), t.probe)).abs().max().item() > 0
