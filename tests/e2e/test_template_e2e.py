"""The base-model path end to end: no chat template, a named one, 60 LoRA steps, eval, merge and generation."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import KEYWORD_ANSWERS, ok, run_cli, tiny_training, write_base_recipe

from llmtune.evaluation import evaluate


def test_a_base_model_learns_chat_with_a_named_template_and_stops_at_its_end_of_turn(tmp_path: Path):
    recipe = write_base_recipe(tmp_path, training=tiny_training(max_steps=60, batch_size=8, logging_steps=20))
    run = tmp_path / "runs" / "base"
    result = ok(run_cli("finetune", str(recipe), cwd=tmp_path))
    assert "added 2 special tokens the tokenizer lacked (<|im_start|>, <|im_end|>)" in result.stdout

    scores = evaluate(run, compare_base=True).results
    assert scores["tuned"]["exact_match"] - scores["base"]["exact_match"] > 20

    merged = tmp_path / "merged"
    ok(run_cli("merge-adapter", str(run), "--out", str(merged), cwd=tmp_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "of the a blue"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    # Plain transformers stops at the template's end of turn, from the merged model's own generation config.
    assert out.tolist()[-1] == end and len(out) < 16
    assert tokenizer.decode(out, skip_special_tokens=True) == KEYWORD_ANSWERS["blue"]
    assert ok(run_cli("generate", str(run), "of the a blue", cwd=tmp_path)).stdout.strip() == KEYWORD_ANSWERS["blue"]
