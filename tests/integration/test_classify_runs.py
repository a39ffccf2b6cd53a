"""Classification runs in-process on tiny:bert: head-only training; an IA3 classifier saves its head and merges."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import write_classify_recipe

from llmtune.merge import merge_adapter
from llmtune.models import load_base_model
from llmtune.recipe import load_recipe
from llmtune.run import finetune


def test_head_only_training_on_bert_changes_the_head_and_nothing_else(tmp_path: Path, one_torch_thread):
    path = write_classify_recipe(tmp_path, "head", model="tiny:bert", method={"name": "head"})
    result = finetune(path, ["training.max_steps=4", "training.save_steps=null"])
    from transformers import AutoModelForSequenceClassification

    tuned = AutoModelForSequenceClassification.from_pretrained(result.run.model).state_dict()
    base = load_base_model(load_recipe(path)).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_ia3_classifier_on_bert_saves_its_head_and_merges_into_a_plain_encoder(tmp_path: Path, one_torch_thread):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    path = write_classify_recipe(tmp_path, "bert", model="tiny:bert", method={"name": "ia3"})
    run = finetune(path, ["training.max_steps=3", "training.save_steps=null"]).run.path
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    result = merge_adapter(run, tmp_path / "merged")
    assert result.max_abs_diff <= 1e-3 and result.base_max_abs_diff > 1e-3
    merged = AutoModelForSequenceClassification.from_pretrained(result.out)
    assert type(merged).__name__ == "BertForSequenceClassification" and merged.config.num_labels == 2
