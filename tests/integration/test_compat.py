"""The compatibility matrix (issue 3): every cell of tests/compat_matrix.py proved on a tiny model.

- "tested" cells train that combination for 2 steps through `llmtune.run.finetune` in-process (tiny:gpt2 for
  bitfit and head, tiny:llama otherwise) and check that every trainable tensor moved, plus what the feature
  promises (checkpointing switched on, rows packed, a 4-bit base, a merge that reproduces the logits).
  "distributed" cells: one torchrun job (2 CPU processes, gloo DDP) trains every method in turn, so the
  interpreter start-up is paid once; each rank reports a digest of its trainable weights, which must agree.
- "refused" cells: recipe validation (`load_recipe`) raises a one-line LLMTuneError, and `finetune` stops
  there before any tokenizer or model loads; merge refusals come from `merge_adapter` itself.
- "n/a" cells: QLoRA base: `bits` is refused as an option of qlora only; merge of a standalone model:
  `merge_adapter` says the run is already a standalone model.

Trained runs are shared through module-scoped fixtures (merge and QLoRA-base cells reuse the SFT run).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from compat_matrix import MATRIX, NA, REFUSED, TESTED
from helpers import COMPAT_ROWS as ROWS
from helpers import check_compat_run as check_run_directory
from helpers import expect_error, write_compat_recipe

import llmtune.objectives
import llmtune.run
from llmtune import artifacts
from llmtune.merge import merge_adapter
from llmtune.models import load_tuned
from llmtune.recipe import load_recipe
from llmtune.run import finetune

# Recipe sections each feature changes (merge, QLoRA base and distributed reuse the SFT recipe).
FEATURE_SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "sft": {},
    "grad_ckpt": {"speed": {"gradient_checkpointing": True}},
    "packing": {"data": {"packing": True}},
    "padding_free": {"speed": {"padding_free": True}},
}
FEATURE_KEYS = {
    "grad_ckpt": "speed.gradient_checkpointing",
    "packing": "data.packing",
    "padding_free": "speed.padding_free",
}
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")

# The tiny models train much faster on one thread on a busy two-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quantized_layers(model) -> int:
    """bitsandbytes' own quantized linear layers (peft's LoRA wrappers around them share their class names)."""
    return sum(
        type(m).__name__ in QUANTIZED_LAYERS and type(m).__module__.startswith("bitsandbytes") for m in model.modules()
    )


def write_recipe(root: Path, name: str, method: str, feature: str = "sft") -> Path:
    return write_compat_recipe(root, name, method, FEATURE_SECTIONS.get(feature, {}))


def cells(status: str) -> list[Any]:
    return [
        pytest.param(method, feature, id=f"{method}-{feature}")
        for method, row in MATRIX.items()
        for feature, (cell_status, _) in row.items()
        if cell_status == status
    ]


def train_loss(run: Path) -> float:
    return json.loads((run / artifacts.METRICS_FILE).read_text())["train_loss"]


# --- in-process runs -------------------------------------------------------------------------------


@dataclass
class Trained:
    method: str
    feature: str
    run: Path
    trainable: list[str]  # names of the parameters that required grad
    unmoved: list[str]  # of those, the ones training left exactly as they were
    gradient_checkpointing: bool  # some module had checkpointing switched on during training
    train_rows: int  # rows of the dataset the trainer drew batches from (fewer than ROWS once packed)
    flat_batches: bool  # the trainer's batches put rows end to end: one sequence, no attention mask
    quantized_layers: int  # bitsandbytes layers in the trained model


def _watch(build: Callable, seen: dict[str, Any]) -> Callable:
    """The sft trainer builder, with `train` wrapped to record what training did to the model."""

    def build_and_watch(recipe, model, *args, **kwargs):
        trainer = build(recipe, model, *args, **kwargs)
        train = trainer.train

        def watched_train(*a, **k):
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            result = train(*a, **k)
            after = dict(model.named_parameters())
            seen["trainable"] = sorted(before)
            seen["unmoved"] = sorted(n for n, p in before.items() if torch.equal(p, after[n].detach()))
            seen["gradient_checkpointing"] = any(
                getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
            )
            seen["train_rows"] = len(trainer.train_dataset)
            batch = next(iter(trainer.get_train_dataloader()))
            seen["flat_batches"] = "attention_mask" not in batch and batch["input_ids"].size(0) == 1
            seen["quantized_layers"] = quantized_layers(model)
            return result

        trainer.train = watched_train
        return trainer

    return build_and_watch


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[str, str], Trained]:
    """(method, feature) -> its finished 2-step run, trained on first use."""
    root = tmp_path_factory.mktemp("compat")
    cache: dict[tuple[str, str], Trained] = {}

    def get(method: str, feature: str = "sft") -> Trained:
        if (method, feature) not in cache:
            recipe = write_recipe(root, f"{method}-{feature}", method, feature)
            seen: dict[str, Any] = {}
            with pytest.MonkeyPatch.context() as mp:
                sft = llmtune.objectives.OBJECTIVES["sft"]
                mp.setattr(sft, "build_trainer", _watch(sft.build_trainer, seen))
                result = finetune(recipe)
            assert seen, "finetune never trained through the sft builder"
            cache[method, feature] = Trained(method, feature, result.run.path, **seen)
        return cache[method, feature]

    return get


def check_trained(t: Trained) -> None:
    check_run_directory(t.run, t.method)
    assert t.trainable, "nothing was trainable"
    assert not t.unmoved, f"trainable tensors that training left unchanged: {t.unmoved}"


# --- tested cells ----------------------------------------------------------------------------------


def prove_sft(trained, tmp_path: Path, method: str) -> None:
    t = trained(method)
    check_trained(t)
    assert not t.gradient_checkpointing and t.train_rows == ROWS
    model, _ = load_tuned(t.run)
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def prove_gradient_checkpointing(trained, tmp_path: Path, method: str) -> None:
    t = trained(method, "grad_ckpt")
    check_trained(t)
    assert t.gradient_checkpointing, "speed.gradient_checkpointing was set but no module checkpointed"
    assert load_recipe(t.run / artifacts.RECIPE_FILE).speed.gradient_checkpointing is True
    # Recomputing activations changes memory, not numbers: the same 2 steps give the same loss.
    plain = trained(method)
    assert train_loss(t.run) == pytest.approx(train_loss(plain.run), rel=1e-4)


def prove_packing(trained, tmp_path: Path, method: str) -> None:
    t = trained(method, "packing")
    check_trained(t)
    assert t.train_rows < ROWS, f"data.packing: the trainer still drew from {t.train_rows} unpacked rows"


def prove_padding_free(trained, tmp_path: Path, method: str) -> None:
    t = trained(method, "padding_free")
    check_trained(t)
    assert t.flat_batches, "speed.padding_free: the trainer still padded its batches"
    # 'auto', the default, puts rows end to end too.
    assert trained(method).flat_batches


def prove_qlora_base(trained, tmp_path: Path, method: str) -> None:
    t = trained(method)
    check_trained(t)
    # Every linear layer of the blocks was quantized: 7 per block x 2 blocks of tiny:llama.
    assert t.quantized_layers == 14
    model, _ = load_tuned(t.run)
    assert quantized_layers(model) == 14


def prove_merge(trained, tmp_path: Path, method: str) -> None:
    t = trained(method)
    out = tmp_path / "merged"
    result = merge_adapter(t.run, out)
    assert result.max_abs_diff <= 1e-3 and result.reload_max_abs_diff <= 1e-3
    assert result.base_max_abs_diff > 0, "the merged model computes exactly what the base did"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(out.glob("*.safetensors"))


IN_PROCESS_PROOFS = {
    "sft": prove_sft,
    "grad_ckpt": prove_gradient_checkpointing,
    "packing": prove_packing,
    "padding_free": prove_padding_free,
    "qlora_base": prove_qlora_base,
    "merge": prove_merge,
}


# The distributed column is proved under torchrun: tests/distributed/test_compat_ddp.py.
@pytest.mark.parametrize(("method", "feature"), [c for c in cells(TESTED) if c.values[1] != "distributed"])
def test_tested_cell(request, tmp_path: Path, method: str, feature: str):
    assert feature in IN_PROCESS_PROOFS, f"no way to test {feature}; add a prove_* function"
    IN_PROCESS_PROOFS[feature](request.getfixturevalue("trained"), tmp_path, method)


# --- refused cells ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "feature"), cells(REFUSED))
def test_refused_cell(request, tmp_path: Path, monkeypatch, method: str, feature: str):
    if feature == "merge":
        t = request.getfixturevalue("trained")(method)
        with expect_error(str(t.run), "nothing to merge", "llmtune generate"):
            merge_adapter(t.run, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        return
    assert feature in FEATURE_KEYS, f"no recipe setting for {feature}; add one to FEATURE_SECTIONS"
    path = write_recipe(tmp_path, "refused", method, feature)
    with expect_error(str(path), FEATURE_KEYS[feature], method):
        load_recipe(path)

    # And finetune stops there: no tokenizer or model is loaded, no run directory is written.
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a tokenizer or model for a refused recipe")

    monkeypatch.setattr(llmtune.run, "load_recipe_tokenizer", must_not_load)
    monkeypatch.setattr(llmtune.run, "load_base_model", must_not_load)
    with expect_error(FEATURE_KEYS[feature]):
        finetune(path)
    assert not (tmp_path / "runs").exists()


# --- n/a cells -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "feature"), cells(NA))
def test_not_applicable_cell(request, tmp_path: Path, method: str, feature: str):
    if feature == "qlora_base":
        # Nothing in a recipe of this method can ask for a quantized base: that option belongs to qlora.
        path = write_recipe(tmp_path, "quantized", method)
        recipe = yaml.safe_load(path.read_text())
        recipe["method"]["bits"] = 4
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        with expect_error("method.bits", "option of qlora", f"'{method}'"):
            load_recipe(path)
    elif feature == "merge":
        t = request.getfixturevalue("trained")(method)
        assert (t.run / "model" / "config.json").is_file() and not (t.run / "adapter").exists()
        with expect_error("already a standalone model", "no merge needed"):
            merge_adapter(t.run, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
    else:
        pytest.fail(f"{method} x {feature} is n/a, and nothing checks that; add a check here")
