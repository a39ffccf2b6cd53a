"""Speed levers leave the numbers alone: the targeted (fused) loss equals plain cross-entropy over full logits
in value and gradients, for every kind of head; bf16 autocast is resolved as documented; length grouping
cuts padding; and a finetune with every lever on follows the same loss curve as one with every lever off.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import RECIPES
from helpers import chat_batch as _batch

from llmtune.accel import Device, current_device, resolve
from llmtune.accel.loss import TargetedLoss
from llmtune.data import IGNORE_INDEX
from llmtune.errors import LLMTuneError
from llmtune.methods import METHODS
from llmtune.models import load_model, load_tokenizer
from llmtune.recipe import load_recipe

# Devices the speed plan is resolved for: a CPU with native bf16 (AMX or AVX512-BF16) and a GPU with it.
CPU = Device("cpu", "test CPU", native_bf16=True)
GPU = Device("cuda", "test GPU", native_bf16=True)


def _plain_loss(model, batch, num_items=None):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["labels"].size(1) :].float()
    targets = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (num_items if num_items is not None else (targets != IGNORE_INDEX).sum())


def _loss_and_grads(model, fn):
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _perturbed_model(ref: str, method: dict):
    """A tiny model with `method` applied and every trainable weight moved off its initial value."""
    from pydantic import TypeAdapter

    from llmtune.recipe import MethodSpec

    spec = TypeAdapter(MethodSpec).validate_python(method)
    tokenizer = load_tokenizer(ref)
    torch.manual_seed(0)
    model = METHODS[spec.name](spec, load_model(ref), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # LoRA's B starts at zero: make every gradient path non-trivial
    model.eval()  # GPT-2's dropout would draw different masks for the two losses; gradients flow all the same
    return model, tokenizer


CASES = {
    # (tiny arch, method): the plain linear head (frozen and trained, tied and untied), a LoRA-wrapped head,
    # and virtual tokens in front of the sequence.
    "lora-llama": ("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.0}),
    "full-gpt2-tied": ("tiny:gpt2", {"name": "full"}),
    "head-llama": ("tiny:llama", {"name": "head"}),
    "lora-on-lm-head": (
        "tiny:llama",
        {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "lm_head"]},
    ),
    "prompt-tuning": ("tiny:llama", {"name": "prompt", "num_virtual_tokens": 3}),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_targeted_loss_matches_cross_entropy_over_full_logits(case, autocast, one_torch_thread):
    model, tokenizer = _perturbed_model(*CASES[case])
    batch = _batch(tokenizer)
    targeted = TargetedLoss(model, chunk_size=7)  # several chunks, the last one partial
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain, plain_grads = _loss_and_grads(model, lambda: _plain_loss(model, batch, num_items=50))
        fused, fused_grads = _loss_and_grads(model, lambda: targeted(model, batch, 50))
    tolerance = 2e-2 if autocast else 1e-5
    assert fused == pytest.approx(plain, rel=tolerance)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (fused_grads[name] - grad).abs().max().item() <= tolerance * scale, name
    # Outside a loss call the head is the model's own: generation and evaluation see full logits.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[-2:] == (batch["input_ids"].size(1) + (3 if case == "prompt-tuning" else 0), len(tokenizer))


def test_targeted_loss_in_a_pack_never_predicts_across_rows(one_torch_thread):
    model = load_model("tiny:llama")
    targeted = TargetedLoss(model)
    a, b = [5, 6, 7, 8], [9, 10, 11]
    # Every token carries loss, so the boundary position (8 -> 9) would count if the pack were not respected.
    pack = {
        "input_ids": torch.tensor([a + b]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2]]),
        "labels": torch.tensor([a + b]),
    }
    with torch.no_grad():
        packed = targeted(model, pack, num_items=1).item()
        separate = sum(
            targeted(model, {"input_ids": torch.tensor([r]), "labels": torch.tensor([r])}, num_items=1).item()
            for r in (a, b)
        )
    assert packed == pytest.approx(separate, rel=1e-5)


@pytest.mark.parametrize(
    ("training", "method", "expected"),
    [
        ({"bf16": True}, "lora", True),
        ({"bf16": False}, "lora", False),
        ({"bf16": "auto", "dtype": "bfloat16"}, "lora", False),
        ({"bf16": "auto"}, "qlora", False),
    ],
)
def test_bf16_setting_resolves_as_documented(make_recipe, training, method, expected):
    recipe = load_recipe(make_recipe(method={"name": method}, training={"max_steps": 1, **training}))
    assert resolve(recipe, CPU, load_model("tiny:llama")).bf16 is expected


def test_bf16_auto_follows_the_cpu(make_recipe, monkeypatch):
    recipe = load_recipe(make_recipe(training={"max_steps": 1}))
    model = load_model("tiny:llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        device = current_device()
        assert device.kind == "cpu" and device.native_bf16 is native
        assert resolve(recipe, device, model).bf16 is native


def _saved_bytes(fn, counted) -> tuple[Any, int]:
    """The result of `fn()` and the bytes of the tensors autograd saved for backward that `counted` selects."""
    saved = 0

    def pack(t):
        nonlocal saved
        if counted(t):
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved


def _saved_bytes_outside_parameters(model, fn) -> tuple[float, int]:
    """The loss of `fn()` and the bytes autograd saved for backward that are not the model's own parameters."""
    own = {p.data_ptr() for p in model.parameters()}
    return _saved_bytes(fn, lambda t: t.data_ptr() not in own)


def _seeded_step(model, batch, autocast: bool) -> tuple[float, int, dict]:
    """One step's loss, the bytes autograd saved outside the parameters, and the gradients, with seed 1's dropout
    masks."""
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, saved = _saved_bytes_outside_parameters(model, lambda: _plain_loss(model, batch))
    model.zero_grad()
    loss.backward()
    return loss.item(), saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "ref, method",
    [
        ("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.0}),
        ("tiny:gpt2", {"name": "bitfit"}),  # the bias trains while the weight stays frozen
    ],
    ids=["lora", "bitfit"],
)
def test_recast_frozen_linears_keeps_numbers_and_drops_the_bf16_weight_copies(ref, method, one_torch_thread):
    from llmtune.accel.precision import route_frozen_linears

    model, tokenizer = _perturbed_model(ref, method)
    batch = _batch(tokenizer)
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    # Autocast keeps a bf16 copy of a frozen weight where the layer's input needs a gradient (not where it
    # reads the frozen embeddings directly).
    needs_grad = set()

    def note(module, args):
        if args[0].requires_grad:
            needs_grad.add(module)

    hooks = [m.register_forward_pre_hook(note) for m in frozen]

    def run():
        return _seeded_step(model, batch, autocast=True)

    loss, saved, grads = run()
    for hook in hooks:
        hook.remove()
    bf16_copies = sum(m.weight.numel() * 2 for m in needs_grad)
    assert route_frozen_linears(model, recast=True, full_precision_outputs=False) == len(frozen) > 0
    recast_loss, recast_saved, recast_grads = run()
    # The same bf16 products in forward and backward: the same loss and gradients.
    assert recast_loss == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(recast_grads[name], grad, rtol=1e-4, atol=1e-7), name
    # Every frozen weight's bf16 copy is gone from what backward keeps.
    assert saved - recast_saved == bf16_copies > 0
    # Outside autocast the layers compute in the weights' own dtype, as before.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("recast", [True, False], ids=["recast", "autocast-copies"])
def test_frozen_weights_stored_in_bf16_give_the_same_numbers_in_half_the_bytes(recast, one_torch_thread):
    from llmtune.accel.precision import route_frozen_linears

    model, tokenizer = _perturbed_model("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.0})
    batch = _batch(tokenizer)
    head = model.get_output_embeddings()
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    blocks = [m for m in frozen if m is not head]
    route_frozen_linears(model, recast=recast)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _plain_loss(model, batch)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            plain_logits = model(input_ids=batch["input_ids"]).logits  # outside autocast
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, plain_logits

    loss, grads, logits = run()
    fp32_bytes = sum(m.weight.nbytes for m in blocks)
    assert route_frozen_linears(model, recast=recast, store_dtype=torch.bfloat16) == len(frozen) > len(blocks) > 0
    assert {m.weight.dtype for m in blocks} == {torch.bfloat16}
    assert sum(m.weight.nbytes for m in blocks) * 2 == fp32_bytes
    stored_loss, stored_grads, stored_logits = run()
    # Autocast multiplies by these very bf16 values either way: bit for bit the same.
    assert torch.equal(stored_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(stored_grads[name], grad), name
    # Outside autocast the weights are cast to the input's dtype: float32 logits, off by the weights' rounding.
    assert stored_logits.dtype == torch.float32
    assert not torch.equal(stored_logits, logits)
    assert torch.allclose(stored_logits, logits, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "ref, targets",
    [
        ("tiny:gpt2", {}),  # GPT-2 ties its head to the input embedding
        ("tiny:llama", {"target_modules": ["q_proj", "lm_head"]}),  # peft saves a targeted head's base weight
    ],
    ids=["tied", "targeted-head"],
)
def test_the_embeddings_weights_stay_in_float32(ref, targets, one_torch_thread):
    from llmtune.accel.precision import route_frozen_linears

    model, _ = _perturbed_model(ref, {"name": "lora", "r": 4, "dropout": 0.0, **targets})
    head = model.get_output_embeddings()
    routed = route_frozen_linears(model, store_dtype=torch.bfloat16)
    assert routed > 0 and head.weight.dtype == model.get_input_embeddings().weight.dtype == torch.float32
    assert head.weight.requires_grad is False


@pytest.mark.parametrize(
    "method",
    [
        "dora",  # its norm reads the frozen weight itself
        "adapter",  # bottleneck checkpoints hold the whole model
        "layers",  # the run saves the whole model, frozen blocks too
    ],
)
def test_frozen_bf16_true_is_refused_where_the_run_saves_or_reads_frozen_weights(method, make_recipe):
    with pytest.raises(LLMTuneError, match=f"speed.frozen_bf16: method {method} saves or reads"):
        load_recipe(make_recipe(method={"name": method}, speed={"frozen_bf16": True}))


def test_frozen_bf16_auto_is_on_a_gpu_and_off_for_objectives_that_generate_while_training():
    recipes = RECIPES
    quickstart, grpo = load_recipe(recipes / "quickstart.yaml"), load_recipe(recipes / "grpo.yaml")
    assert quickstart.speed.frozen_bf16 == grpo.speed.frozen_bf16 == "auto"
    assert grpo.method.name == quickstart.method.name == "lora"
    dora = load_recipe(recipes / "dora.yaml")
    model = load_model("tiny:llama")
    for device in (CPU, GPU):
        assert resolve(quickstart, device, model).frozen_bf16 is device.gpu
        assert resolve(grpo, device, model).frozen_bf16 is resolve(dora, device, model).frozen_bf16 is False
    with pytest.raises(LLMTuneError, match="speed.frozen_bf16: objective grpo generates between steps"):
        load_recipe(recipes / "grpo.yaml", ["speed.frozen_bf16=true"])


def test_gradient_checkpointing_auto_is_on_a_gpu_unless_prefixes_or_fsdp_checkpoint(tmp_path):
    from trl import SFTConfig

    from llmtune.objectives.base import training_args

    recipes = RECIPES
    quickstart, prefix = load_recipe(recipes / "quickstart.yaml"), load_recipe(recipes / "prefix.yaml")
    sharded = load_recipe(recipes / "quickstart.yaml", ["training.fsdp=true"])
    assert quickstart.speed.gradient_checkpointing == prefix.speed.gradient_checkpointing == "auto"
    model = load_model("tiny:llama")
    # TRL's own default is on; on this CPU the resolved value must reach the trainer's arguments.
    assert next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "gradient_checkpointing") is True
    plan = resolve(quickstart, CPU, model)
    assert training_args(SFTConfig, quickstart, plan, tmp_path).gradient_checkpointing is False
    for device in (CPU, GPU):
        gpu = device.gpu
        assert resolve(quickstart, device, model).gradient_checkpointing is gpu
        assert resolve(sharded, device, model).gradient_checkpointing is gpu
        assert resolve(prefix, device, model).gradient_checkpointing is False
        for key in ("activation_checkpointing", "fsdp_activation_checkpointing"):
            sharded.training.fsdp_config = {key: True}
            assert resolve(sharded, device, model).gradient_checkpointing is False
        sharded.training.fsdp_config = {}
    forced = load_recipe(recipes / "quickstart.yaml", ["speed.gradient_checkpointing=true"])
    assert resolve(forced, CPU, model).gradient_checkpointing is True
    assert training_args(SFTConfig, forced, resolve(forced, CPU, model), tmp_path).gradient_checkpointing is True


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_compact_dropout_keeps_its_masks_as_booleans(autocast, one_torch_thread):
    from llmtune.accel.precision import compact_dropouts

    # LoRA's dropout on every targeted input, and GPT-2's own attention and residual dropout.
    model, tokenizer = _perturbed_model("tiny:gpt2", {"name": "lora", "r": 4, "dropout": 0.3})
    model.train()
    batch = _batch(tokenizer)
    dropouts = [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for m in dropouts]

    def run():
        return _seeded_step(model, batch, autocast)[:2]

    loss, saved = run()
    for hook in hooks:
        hook.remove()
    noise_bytes = sum(x.numel() * (x.element_size() - 1) for x in inputs if x.requires_grad)
    assert compact_dropouts(model) == len(dropouts) > 0
    compact_loss, compact_saved = run()
    # Each mask kept as one byte per element instead of a noise tensor of the input's dtype.
    assert saved - compact_saved == noise_bytes > 0
    # Other masks, the same model: the loss moves by dropout's noise, not by a broken layer.
    assert compact_loss == pytest.approx(loss, rel=0.05)
    assert compact_loss == run()[0]  # the same seed draws the same masks
    # Evaluation draws nothing.
    model.eval()
    with torch.no_grad():
        assert torch.equal(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_compact_dropout_drops_at_its_rate_and_scales_forward_and_backward_alike(p, dtype):
    from llmtune.accel.precision import _BooleanMaskDropout

    torch.manual_seed(0)
    # No zeros: a zero output means a dropped element.
    x = torch.rand(1000, 1001).add_(0.5).to(dtype).requires_grad_()
    y = _BooleanMaskDropout.apply(x, p)
    kept = y != 0
    rounded = round(p * 2**15) / 2**15
    assert abs(rounded - p) <= 2**-16
    # The dropped share is p (rounded to 2^-15) within five standard errors of a million draws.
    assert abs((~kept).float().mean().item() - rounded) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    # Kept elements are scaled so that the expectation is the input, each product rounded once to x's dtype;
    # the gradient goes through the same mask.
    tolerance = {"rtol": 2**-8, "atol": 0} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y[kept], (x[kept].float() / (1 - rounded)).to(dtype), **tolerance)
    # On average 1 / (1 - p) to within the products' rounding; a scale rounded to bf16 first is off by 0.2% at
    # p = 0.05 (1.0547 for 1.0526).
    mean_scale = (y[kept].double() / x[kept].double()).mean().item()
    assert mean_scale == pytest.approx(1 / (1 - rounded), rel=1e-3 if dtype == torch.bfloat16 else 1e-6)
    grad = torch.randn_like(x)
    y.backward(grad)
    expected = torch.where(kept, grad.float() / (1 - rounded), 0).to(dtype)
    torch.testing.assert_close(x.grad, expected, **tolerance)
    # A probability just below 1 still keeps a few elements, scaled by a finite factor.
    assert torch.isfinite(_BooleanMaskDropout.apply(x.detach(), 1 - 2**-17)).all()
    # Every lane of the 64-bit draws is used: no period of four in the mask.
    lanes = (~kept).flatten()[: 4 * (x.numel() // 4)].view(-1, 4).float().mean(0)
    assert (lanes - rounded).abs().max() < 10 * (p * (1 - p) / (x.numel() / 4)) ** 0.5


def test_full_precision_outputs_keep_a_small_adapter_delta_that_a_bf16_sum_rounds_away(one_torch_thread):
    from llmtune.accel.precision import route_frozen_linears

    model, tokenizer = _perturbed_model("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.0})
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(64, layer.in_features, requires_grad=True)
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(1e-4)  # an adapter early in training: a delta far below 1% of the output

    def delta():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with_adapter = layer(x)
            with model.disable_adapter():
                without = layer(x)
        return (with_adapter - without).float()

    exact = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    rounded = delta()
    route_frozen_linears(model)
    kept = delta()
    assert kept.dtype == torch.float32
    # In a bf16 sum most of the delta vanishes or snaps to a rounding step of the much larger output.
    assert (rounded - exact).abs().mean() > 0.8 * exact.abs().mean()
    # Added in float32, only the delta's own bf16 product error is left.
    assert (kept - exact).abs().mean() < 0.02 * exact.abs().mean()


def _graph_nodes(loss: torch.Tensor, name: str) -> int:
    """How many nodes of `loss`'s autograd graph are of the type called `name`."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return sum(type(node).__name__ == name for node in seen)


def _relative_error(grads: dict, reference: dict) -> float:
    """The gradients' distance from `reference`, relative to its norm, over all trained weights together."""
    flat = torch.cat([grads[name].flatten() for name in reference])
    exact = torch.cat([grad.flatten() for grad in reference.values()])
    return ((flat - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("full_precision_outputs", [True, False], ids=["float32-outputs", "bf16-outputs"])
def test_fused_lora_keeps_loss_and_gradients_and_saves_no_more(dropout, full_precision_outputs, one_torch_thread):
    from peft.tuners.lora import Linear as LoraLinear

    from llmtune.accel.precision import compact_dropouts, fuse_lora_layers, route_frozen_linears

    model, tokenizer = _perturbed_model("tiny:llama", {"name": "lora", "r": 4, "dropout": dropout})
    model.train()
    compact_dropouts(model)
    batch = _batch(tokenizer)

    def run(autocast):
        # Compact masks depend on the element count only: every run draws the same ones.
        return _seeded_step(model, batch, autocast)

    exact_loss, _, exact = run(autocast=False)
    route_frozen_linears(model, full_precision_outputs=full_precision_outputs)
    peft_loss, peft_saved, peft_grads = run(autocast=True)
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    assert fuse_lora_layers(model, full_precision_outputs=full_precision_outputs) == len(layers) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _graph_nodes(_plain_loss(model, batch), "_LoraLinearBackward") == len(layers)
    fused_loss, fused_saved, fused_grads = run(autocast=True)
    assert fused_grads.keys() == exact.keys()
    # Against float32 with the same masks, the fused layers are bf16-close, their gradients no further off than
    # peft's (the losses of both differ from float32's by rounding noise of a few 1e-5).
    assert fused_loss == pytest.approx(exact_loss, rel=1e-3) and peft_loss == pytest.approx(exact_loss, rel=1e-3)
    assert _relative_error(fused_grads, exact) < 2e-2
    assert _relative_error(fused_grads, exact) <= 1.5 * _relative_error(peft_grads, exact)
    for name, grad in exact.items():  # every adapter weight gets its gradient, A's and B's alike
        assert (fused_grads[name] - grad).norm() <= 5e-2 * grad.norm(), name
    assert fused_saved <= peft_saved


def test_fused_lora_returns_what_peft_returns_over_bf16_weights_and_keeps_torch_dropout_on_request(
    one_torch_thread,
):
    from llmtune.accel.precision import compact_dropouts, fuse_lora_layers, route_frozen_linears

    # training.dtype bfloat16: peft keeps the adapter in float32 over frozen bf16 weights.
    model, _ = _perturbed_model("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.0})
    for m in model.modules():
        if type(m) is torch.nn.Linear and not m.weight.requires_grad:
            m.weight.data = m.weight.data.to(torch.bfloat16)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    route_frozen_linears(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_out = layer(x)
        assert fuse_lora_layers(model) > 0
        fused_out = layer(x)
    assert peft_out.dtype == fused_out.dtype == torch.bfloat16
    torch.testing.assert_close(fused_out, peft_out, rtol=2e-2, atol=1e-2)

    # Without compact masks, layers with dropout keep peft's forward and torch's own masks.
    model, _ = _perturbed_model("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.2})
    model.train()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features)

    def out():
        torch.manual_seed(3)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    torch_dropout = out()
    fuse_lora_layers(model, compact_masks=False)
    assert torch.equal(out(), torch_dropout)
    compact_dropouts(model)
    fuse_lora_layers(model)
    assert not torch.equal(out(), torch_dropout)  # now fused, with compact masks


def test_fused_lora_leaves_every_other_case_to_peft(one_torch_thread):
    from llmtune.accel.precision import fuse_lora_layers

    batch = torch.randint(0, 64, (2, 9))

    def logits(model, autocast=True):
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=batch).logits

    lora, _ = _perturbed_model("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.0})
    dora, _ = _perturbed_model("tiny:llama", {"name": "dora", "r": 4, "dropout": 0.0})
    before = {"fp32": logits(lora, autocast=False), "dora": logits(dora)}
    with lora.disable_adapter():
        before["disabled"] = logits(lora)
    fuse_lora_layers(lora)
    fuse_lora_layers(dora)
    # Without autocast, with the adapter switched off (as --compare-base runs), and for DoRA: peft's own forward.
    assert torch.equal(logits(lora, autocast=False), before["fp32"])
    assert torch.equal(logits(dora), before["dora"])
    with lora.disable_adapter():
        assert torch.equal(logits(lora), before["disabled"])
    assert not torch.equal(before["disabled"], logits(lora))  # the fused adapter does move the logits


@pytest.mark.parametrize(
    "method",
    [{"name": "lora", "r": 4, "dropout": 0.0}, {"name": "full"}],  # full: the norms' weights train as well
    ids=["lora", "full"],
)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_blocks_keep_loss_and_gradients_and_one_intermediate_tensor_less(method, autocast, one_torch_thread):
    from llmtune.accel.fused import fuse_blocks

    model, tokenizer = _perturbed_model("tiny:llama", method)
    batch = _batch(tokenizer)
    config = model.config
    tokens = batch["input_ids"].numel()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, saved = _saved_bytes(  # the tensors of the MLP's intermediate width
                lambda: _plain_loss(model, batch), lambda t: t.dim() > 0 and t.size(-1) == config.intermediate_size
            )
        model.zero_grad()
        loss.backward()
        return loss.item(), saved, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, saved, grads = run()
    rng = torch.get_rng_state()
    # Two norms per layer and the final one; one MLP per layer.
    assert fuse_blocks(model) == 3 * config.num_hidden_layers + 1
    assert torch.equal(torch.get_rng_state(), rng)  # the check leaves the training run's random stream alone
    fused_loss, fused_saved, fused_grads = run()
    # The same forward operations; backward's formulas differ from autograd's in rounding only: float32's, or
    # under autocast, where the MLP's inputs are bf16, the bf16 roundings autograd makes between its steps.
    assert fused_loss == loss
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        if autocast:
            assert (fused_grads[name] - grad).norm() <= 1e-2 * grad.norm(), name
        else:
            assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name
    # Per layer, silu(gate) is no longer kept: one intermediate-size tensor in the projections' output dtype.
    itemsize = 2 if autocast else 4
    assert saved - fused_saved == config.num_hidden_layers * tokens * config.intermediate_size * itemsize


@pytest.mark.parametrize("ref, kind, looks_alike", [("tiny:t5", "seq2seq-lm", True), ("tiny:gpt2", "causal-lm", False)])
def test_blocks_that_compute_otherwise_keep_their_forward(ref, kind, looks_alike):
    from llmtune.accel.fused import _fused_forward, fuse_blocks

    # T5's norm has Llama's attributes and matches it on float32 inputs, not on bf16 ones; GPT-2 has LayerNorm
    # and a GELU MLP.
    model = load_model(ref, kind=kind)
    assert any(_fused_forward(m) for m in model.modules()) is looks_alike
    assert fuse_blocks(model) == 0
    assert not any("forward" in vars(m) for m in model.modules())


def test_a_swiglu_look_alike_with_another_activation_keeps_its_forward(one_torch_thread):
    from llmtune.accel.fused import fuse_blocks

    model = load_model("tiny:llama")
    odd = model.model.layers[1].mlp
    odd.act_fn = torch.nn.GELU()
    batch = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(input_ids=batch).logits
        assert fuse_blocks(model) == 3 * model.config.num_hidden_layers + 1 - 1
        assert "forward" not in vars(odd) and "forward" in vars(model.model.layers[0].mlp)
        assert torch.equal(model(input_ids=batch).logits, before)


def test_blocks_with_dropout_are_fused_in_training_mode(one_torch_thread):
    from llmtune.accel.fused import fuse_blocks
    from llmtune.accel.precision import compact_dropouts

    # The check calls each MLP twice; its LoRA dropout must draw the same masks both times.
    model, _ = _perturbed_model("tiny:llama", {"name": "lora", "r": 4, "dropout": 0.3})
    model.train()
    assert compact_dropouts(model) > 0
    assert fuse_blocks(model) == 3 * model.config.num_hidden_layers + 1


def test_gated_norms_and_clamping_mlps_keep_their_forward(one_torch_thread):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    from llmtune.accel.fused import fuse_blocks

    class GatedNorm(LlamaRMSNorm):  # Mamba hybrids: a second input that a one-input probe never passes
        def forward(self, hidden_states, gate=None):
            out = super().forward(hidden_states)
            return out if gate is None else out * torch.nn.functional.silu(gate)

    class ClampingMLP(LlamaMLP):  # agrees with the plain MLP until its activations reach the limit
        def forward(self, x):
            gate = self.act_fn(self.gate_proj(x)).clamp(max=10.0)
            return self.down_proj(gate * self.up_proj(x).clamp(-10.0, 10.0))

    model = load_model("tiny:llama")
    layer = model.model.layers[0]
    layer.input_layernorm = GatedNorm(model.config.hidden_size)
    clamping = ClampingMLP(model.config)
    clamping.load_state_dict(layer.mlp.state_dict())
    layer.mlp = clamping
    assert fuse_blocks(model) == 3 * model.config.num_hidden_layers + 1 - 2
    assert "forward" not in vars(layer.input_layernorm) and "forward" not in vars(layer.mlp)


@pytest.mark.parametrize("trained_head, rows", [(False, 128), (True, 1024)])
def test_loss_chunks_stay_under_the_mmap_threshold_on_the_cpu_for_a_frozen_head(trained_head, rows):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 49152, bias=False).requires_grad_(trained_head)

        def get_output_embeddings(self):
            return self.head

    # 128 rows of 49,152 float32 logits: 24 MiB. A trained head's vocabulary-sized gradient gains nothing.
    assert TargetedLoss(Model()).chunk_rows(torch.zeros(3, 8)) == rows
