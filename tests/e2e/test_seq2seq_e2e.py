"""Seq2seq end to end: finetune, eval, merge-adapter and generate through the CLI and the library."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import (
    ok,
    read_jsonl,
    reverse_rows,
    run_cli,
    write_s2s_recipe,
)
from transformers import AutoModelForSeq2SeqLM

from llmtune.evaluation import evaluate
from llmtune.generation import Sampling, complete, generate_texts
from llmtune.merge import merge_adapter
from llmtune.models import load_tokenizer, load_tuned


def test_finetune_eval_merge_generate_through_cli_and_library(tmp_path: Path):
    training = {"max_steps": 6, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 2}
    path = write_s2s_recipe(tmp_path, training=training)
    ok(run_cli("finetune", str(path), cwd=tmp_path))
    run = tmp_path / "runs" / "s2s"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"

    evaluate(run, compare_base=True)
    evaluation = json.loads((run / "eval.json").read_text())
    for name in ("tuned", "base"):
        assert {"perplexity", "bleu", "rouge1", "rougeL", "exact_match"} <= set(evaluation[name])
    assert evaluation["tuned"]["perplexity"] < evaluation["base"]["perplexity"]
    predictions = read_jsonl(run / "eval_predictions.jsonl")
    assert predictions[0]["prompt"].endswith(load_tokenizer("tiny:t5").eos_token)
    assert predictions[0]["reference"] == reverse_rows(8, seed=1)[0]["completion"]

    merged = tmp_path / "merged"
    result = merge_adapter(run, merged)
    assert result.max_abs_diff <= 1e-3 and result.base_max_abs_diff > 0
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(merged)
    tuned, tok = load_tuned(run)
    ids = torch.tensor([tok("abcd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    decoder = torch.tensor([[tok.pad_token_id, *ids[0, :-1].tolist()]])
    with torch.no_grad():
        a = tuned(input_ids=ids, decoder_input_ids=decoder).logits
        b = reloaded(input_ids=ids, decoder_input_ids=decoder).logits
    assert torch.allclose(a, b, atol=1e-4)

    # The merged directory through the CLI and the run directory in-process generate what the reloaded model does.
    [expected] = generate_texts(reloaded, tok, [ids[0].tolist()], Sampling(max_new_tokens=6), batch_size=1)
    text = ok(run_cli("generate", str(merged), "abcd", "--max-new-tokens", "6", cwd=tmp_path)).stdout.strip()
    assert text == expected == complete(str(run), "abcd", Sampling(max_new_tokens=6))
