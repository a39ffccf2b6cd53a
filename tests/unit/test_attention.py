"""Padding-free batches: each row attends on its own and gets the logits it gets in a padded batch; a finetune
with rows end to end follows the padded run's loss curve; float32 attention under autocast matches sdpa."""

from __future__ import annotations

import inspect
from itertools import pairwise

import pytest
import torch

from llmtune.accel import attention
from llmtune.accel.attention import SEGMENTED_SDPA, SEGMENTED_SDPA_FLOAT32, use_segmented_attention
from llmtune.batching import pad_batch
from llmtune.models import load_model

ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19], [20]]


def _padded_and_flat():
    ids, mask = pad_batch(ROWS, 0, left=False)
    lengths = [len(r) for r in ROWS]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    flat = {
        "input_ids": torch.tensor([sum(ROWS, [])]),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
    return {"input_ids": ids, "attention_mask": mask}, flat


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_rows_end_to_end_get_the_logits_of_the_padded_batch_attending_row_by_row(ref, monkeypatch):
    torch.manual_seed(0)
    model = load_model(ref).eval()
    padded, flat = _padded_and_flat()
    with torch.no_grad():
        expected = model(**padded).logits
        assert use_segmented_attention(model, float32=False)
        assert model.config._attn_implementation == SEGMENTED_SDPA
        query_lengths = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(query, *args, **kwargs):
            query_lengths.append(query.size(-2))
            return sdpa(query, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        got = model(**flat).logits
        # A padded batch still goes through sdpa with transformers' mask.
        again = model(**padded).logits
    layers = model.config.num_hidden_layers
    # Each row on its own in every layer, never the whole flattened sequence; then the padded batch once per layer.
    assert query_lengths == [len(r) for r in ROWS] * layers + [padded["input_ids"].size(1)] * layers
    start = 0
    for i, row in enumerate(ROWS):
        assert torch.allclose(got[0, start : start + len(row)], expected[i, : len(row)], atol=1e-5), i
        start += len(row)
    assert torch.allclose(again, expected, atol=1e-6)


def test_float32_attention_under_autocast_computes_in_float32_and_matches_sdpa():
    torch.manual_seed(0)
    model = load_model("tiny:llama").eval()
    padded, flat = _padded_and_flat()
    with torch.no_grad():
        exact = model(**padded).logits  # float32 throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(**padded).logits.float()
        assert use_segmented_attention(model, float32=True)
        assert model.config._attn_implementation == SEGMENTED_SDPA_FLOAT32
        dtypes = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                torch.nn.functional,
                "scaled_dot_product_attention",
                lambda q, *a, **k: dtypes.append(q.dtype) or sdpa(q, *a, **k),
            )
            mixed = model(**padded).logits.float()
            model(**flat)
    assert set(dtypes) == {torch.float32}
    # Attention in float32 brings the bf16 run no further from float32 than sdpa's bf16 attention does.
    assert (mixed - exact).abs().max() <= (bf16 - exact).abs().max() * 1.5


def _varlen_by_rows(query, key, value, cu_seq_q, max_q, scale, causal, gqa):
    """What PyTorch's varlen kernel computes, row by row through sdpa."""
    assert cu_seq_q.dtype == torch.int32 and max_q == int(cu_seq_q.diff().max())
    rows = []
    for s, e in pairwise(cu_seq_q.tolist()):
        q, k, v = (t[s:e].transpose(0, 1) for t in (query, key, value))  # (heads, tokens, head dim)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        rows.append(out.transpose(0, 1))
    return torch.cat(rows)


def _newest(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    return _varlen_by_rows(query, key, value, cu_seq_q, max_q, scale, tuple(window_size) == (-1, 0), enable_gqa)


def _without_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    return _varlen_by_rows(query, key, value, cu_seq_q, max_q, scale, tuple(window_size) == (-1, 0), False)


def _with_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None):
    return _varlen_by_rows(query, key, value, cu_seq_q, max_q, scale, is_causal, False)


@pytest.mark.parametrize("kernel", [_newest, _without_gqa, _with_is_causal])
def test_varlen_kernel_gets_every_row_in_one_call_whichever_keywords_it_takes(kernel, monkeypatch):
    """PyTorch's varlen kernel runs on GPUs only; a CPU stand-in with each release's keywords checks what it gets."""
    torch.manual_seed(0)
    model = load_model("tiny:llama").eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    padded, flat = _padded_and_flat()
    calls = []
    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "_VARLEN_KEYWORDS", frozenset(inspect.signature(kernel).parameters))
    monkeypatch.setattr(attention, "_varlen_attn", lambda *a, **k: calls.append(a[0].dtype) or kernel(*a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(**padded).logits.float()
        use_segmented_attention(model, float32=False)
        got = model(**flat).logits.float()
    assert calls == [torch.bfloat16] * model.config.num_hidden_layers
    start = 0
    for i, row in enumerate(ROWS):
        assert torch.allclose(got[0, start : start + len(row)], expected[i, : len(row)], atol=0.05), i
        start += len(row)


@pytest.mark.skipif(
    not torch.cuda.is_available() or "scale" not in attention._VARLEN_KEYWORDS,
    reason="needs a GPU and PyTorch's varlen kernel",
)
def test_on_a_gpu_rows_end_to_end_go_through_one_varlen_call_per_layer_with_the_padded_gradients(monkeypatch):
    torch.manual_seed(0)
    model = load_model("tiny:llama").cuda()
    padded, flat = _padded_and_flat()
    padded = {k: v.cuda() for k, v in padded.items()}
    flat = {k: v.cuda() if torch.is_tensor(v) else v for k, v in flat.items()}
    q_proj = model.model.layers[0].self_attn.q_proj.weight

    def run(batch):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(**batch).logits.float()
        real = logits[padded["attention_mask"].bool()] if batch is padded else logits[0]
        real.square().mean().backward()
        return real.detach(), q_proj.grad.clone()

    expected, expected_grad = run(padded)
    use_segmented_attention(model, float32=False)
    calls = []
    kernel = attention._varlen_attn
    monkeypatch.setattr(attention, "_varlen_attn", lambda *a, **k: calls.append(a[0].size(0)) or kernel(*a, **k))
    got, got_grad = run(flat)
    assert calls == [sum(len(r) for r in ROWS)] * model.config.num_hidden_layers
    # Both in bf16: the same attention, summed in another order.
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert (got_grad - expected_grad).norm() <= 0.02 * expected_grad.norm()


def test_a_model_outside_sdpa_keeps_its_attention():
    model = load_model("tiny:llama")
    model.set_attn_implementation("eager")
    assert not use_segmented_attention(model, float32=False)
    assert model.config._attn_implementation == "eager"


def test_expected_padding_of_random_batches():
    from llmtune.accel import expected_padding

    assert expected_padding([50] * 40, 8, seed=0) == 0.0
    # Half the rows 10 tokens, half 30, two drawn at a time: 40 real tokens a batch, padded to 60 when mixed.
    mixed = 2 * 50 / 100 * 50 / 99
    padded = mixed * 60 + (1 - mixed) / 2 * (20 + 60)
    assert expected_padding([10, 30] * 50, 2, seed=0, batches=4000) == pytest.approx(1 - 40 / padded, abs=0.01)


def test_padding_free_auto_is_on_where_random_batches_would_be_padded(make_recipe):
    from datasets import Dataset

    from llmtune.accel import PADDING_FREE_FROM, Device, resolve
    from llmtune.recipe import load_recipe

    def padding_free(recipe, model, train):
        return resolve(recipe, Device("cpu", "test CPU", native_bf16=False), model, train).padding_free

    model = load_model("tiny:llama")
    recipe = load_recipe(make_recipe("auto"))  # padding_free: auto, batch size 4
    even = Dataset.from_dict({"input_ids": [[1] * 40] * 24})
    ragged = Dataset.from_dict({"input_ids": [[1] * (10 + 30 * (i % 2)) for i in range(24)]})
    assert not padding_free(recipe, model, even)
    assert padding_free(recipe, model, ragged)
    # Asked for, it is on whatever the padding.
    recipe.speed.padding_free = True
    assert padding_free(recipe, model, even)
    assert 0 < PADDING_FREE_FROM < 1
