"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021) between the frozen layers of a transformer.

Each adapter maps a sublayer's output h to h + up(act(down(h))), with `down` narrowing the hidden size by
`reduction_factor`. `up` starts at zero, so the adapted model starts as exactly the base model. Adapters sit on
the output of each block's feed-forward module (Pfeiffer) and also of its attention module (Houlsby), before
the block's residual addition, and reach the model as child modules plus forward hooks: the base model's own
parameter names stay as they are, so its weights load unchanged under the adapters.

No maintained library does this over transformers 5: the `adapters` package (1.3.0) pins transformers ~=4.57,
and peft has no bottleneck method.

The run directory holds the adapter weights alone (`adapter/adapter_model.safetensors` with the names they
have in the model) and `adapter/bottleneck_config.json`; `load_adapters` inserts the adapters into a freshly
loaded base and loads them. The non-linearity keeps them out of the base weights: nothing to merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmtune.errors import LLMTuneError

if TYPE_CHECKING:
    from llmtune.recipe import AdapterSpec

# Submodule names of a block's attention and feed-forward parts: Llama / Mistral / Qwen / Phi (self_attn, mlp),
# GPT-2 / GPT-J (attn, mlp), Falcon / BLOOM (self_attention), GPT-NeoX (attention), Mixtral-style blocks.
ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
# The adapter's name as a child of the module it follows; every adapter parameter name contains it.
ADAPTER_MODULE = "bottleneck_adapter"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "bottleneck_config.json"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """h -> h + up(act(down(h))), zero at initialisation."""

    def __init__(self, hidden_size: int, width: int, non_linearity: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, width)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(width, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


def _adapt_output(module: nn.Module, args: Any, output: Any) -> Any:
    adapter = getattr(module, ADAPTER_MODULE)
    # Attention modules return (hidden states, attention weights, ...); only the hidden states are adapted.
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def find_targets(model: nn.Module, placement: str) -> list[str]:
    """Names of the modules whose outputs get an adapter: per block, feed-forward (and attention for houlsby)."""
    targets = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        attention = next((c for c in ATTENTION_NAMES if c in children), None)
        feed_forward = next((c for c in FEED_FORWARD_NAMES if c in children), None)
        if attention is None or feed_forward is None:
            continue
        chosen = [attention, feed_forward] if placement == "houlsby" else [feed_forward]
        targets += [f"{name}.{child}" if name else child for child in chosen]
    if not targets:
        raise LLMTuneError(
            f"method adapter: no block in {type(model).__name__} has an attention ({', '.join(ATTENTION_NAMES)}) "
            f"and a feed-forward ({', '.join(FEED_FORWARD_NAMES)}) submodule; its blocks hold "
            f"{', '.join(_block_children(model))}; use method lora or layers for this model"
        )
    return targets


def _block_children(model: nn.Module) -> list[str]:
    """Child names of the modules in the model's ModuleLists (its blocks and their parts), else of the model."""
    names = {
        name for m in model.modules() if isinstance(m, nn.ModuleList) for item in m for name, _ in item.named_children()
    }
    return sorted(names) or [name for name, _ in model.named_children()]


def add_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Insert `spec`'s adapters into `model` in place, freeze everything else; returns the adapted module names."""
    hidden_size = model.config.get_text_config().hidden_size
    width = hidden_size // spec.reduction_factor
    if width < 1:
        raise LLMTuneError(
            f"method.reduction_factor is {spec.reduction_factor} but the hidden size is {hidden_size}, which leaves "
            f"no bottleneck; use a reduction_factor of at most {hidden_size}"
        )
    targets = find_targets(model, spec.placement)
    for name in targets:
        module = model.get_submodule(name)
        if hasattr(module, ADAPTER_MODULE):
            raise LLMTuneError(f"method adapter: {name} already has an adapter")
        reference = next(module.parameters())
        adapter = Bottleneck(hidden_size, width, spec.non_linearity).to(reference.device, reference.dtype)
        module.add_module(ADAPTER_MODULE, adapter)
        module.register_forward_hook(_adapt_output)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_parameter(name))
    return targets


def is_adapter_parameter(name: str) -> bool:
    return f".{ADAPTER_MODULE}." in name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.state_dict().items() if is_adapter_parameter(n)}


def save_adapters(model: nn.Module, directory: Path, spec: AdapterSpec) -> None:
    """Write the adapter weights and their config (options, adapted modules, sizes) into `directory`."""
    from safetensors.torch import save_file

    state = adapter_state(model)
    targets = find_targets(model, spec.placement)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        **spec.model_dump(mode="json"),
        "hidden_size": model.config.get_text_config().hidden_size,
        "base_model_class": type(model).__name__,
        "target_modules": targets,
        "parameters": sum(t.numel() for t in state.values()),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_adapters(model: nn.Module, spec: AdapterSpec, directory: Path) -> nn.Module:
    """Insert `spec`'s adapters into a freshly loaded base and load their weights from `directory`.

    `directory` is a run's adapter directory, or a training checkpoint (the Trainer saves the whole model
    there, adapters included; only the adapter tensors are read).
    """
    from safetensors import safe_open

    targets = add_adapters(model, spec)
    config_file = directory / CONFIG_FILE
    if config_file.is_file():
        saved = json.loads(config_file.read_text(encoding="utf-8"))["target_modules"]
        if saved != targets:
            raise LLMTuneError(
                f"{directory}: the adapters were saved for modules {', '.join(saved[:4])}..., but the base model "
                f"has {', '.join(targets[:4])}...; load them over the base model they were trained on"
            )
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys() if is_adapter_parameter(key)})
    expected = set(adapter_state(model))
    if set(state) != expected:
        wrong = sorted(expected - set(state)) or sorted(set(state) - expected)
        raise LLMTuneError(
            f"{directory}: {len(expected - set(state))} adapter tensors missing and {len(set(state) - expected)} "
            f"unexpected (e.g. {wrong[0]}); point at a run of method adapter or one of its checkpoints"
        )
    model.load_state_dict(state, strict=False)
    return model
