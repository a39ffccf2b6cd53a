"""A run's peak memory per device and its speed, from the recipe and the model's config alone.

No weight is loaded. Parameters, gradients and optimizer state are counted from a model built on the meta device
with the recipe's tuning method applied. Activations are not guessed from a formula: one training step (forward
with the speed plan's levers, loss, backward) runs on fake tensors, which carry shapes and dtypes but no data,
while a dispatch mode keeps the bytes of every live tensor. That step runs the same code a real step runs, so
any architecture transformers builds is planned the same way. Activation memory grows linearly with the number
of layers, so the step runs at two small depths and the whole model's numbers are extrapolated from them.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.errors import LLMTuneError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from llmtune.accel import SpeedPlan
    from llmtune.recipe import Recipe

GiB = 1 << 30
MiB = 1 << 20

# Room CUDA needs besides the tensors a run allocates: its context and kernels (about 0.5 GiB) and the caching
# allocator's partly used blocks.
CUDA_RESERVE = GiB
# Shares of a device's peak matmul rate a fine-tuning step reaches: the low end for small batches and models
# dominated by non-matmul work, the high end for well-fed large matmuls.
MFU_RANGE = (0.25, 0.6)
# Depths the fake step runs at; two so that a pattern of two alternating layer kinds (sliding and full
# attention, say) is represented in both.
DEPTHS = (2, 4)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    memory: int  # bytes
    bf16_flops: float  # dense peak FLOP/s, bfloat16 inputs with float32 accumulation
    fp32_flops: float
    bandwidth: float  # memory bytes/s
    gpu: bool = True
    native_bf16: bool = True


# Memory as nvidia-smi reports it; dense peak rates from the vendors' data sheets (no sparsity).
DEVICES: dict[str, DeviceInfo] = {
    "h100": DeviceInfo("H100 SXM 80GB", 81559 * MiB, 989e12, 67e12, 3.35e12),
    "a100-80gb": DeviceInfo("A100 80GB", 81920 * MiB, 312e12, 19.5e12, 2.04e12),
    "a100-40gb": DeviceInfo("A100 40GB", 40960 * MiB, 312e12, 19.5e12, 1.56e12),
    "l4": DeviceInfo("L4", 23034 * MiB, 121e12, 30.3e12, 0.30e12),
    "a10": DeviceInfo("A10", 23028 * MiB, 125e12, 31.2e12, 0.60e12),
    "rtx4090": DeviceInfo("RTX 4090", 24564 * MiB, 165e12, 82.6e12, 1.01e12),
    "rtx3090": DeviceInfo("RTX 3090", 24576 * MiB, 71e12, 35.6e12, 0.94e12),
    # Turing has no bfloat16: training.bf16 auto stays off, and float32 runs on its CUDA cores.
    "t4": DeviceInfo("T4", 15360 * MiB, 65e12, 8.1e12, 0.32e12, native_bf16=False),
}


def device_info(name: str | None) -> DeviceInfo:
    """A known device by name, `cpu` for this machine as measured, or None for the machine the run is on."""
    if name is None:
        return _this_machine()
    key = name.lower().replace(" ", "").replace("_", "-")
    if key == "cpu":
        return _measured_cpu()
    if key in DEVICES:
        return DEVICES[key]
    raise LLMTuneError(f"--device {name!r}: unknown device; use one of {', '.join([*DEVICES, 'cpu'])}, or --memory")


def parse_memory(text: str) -> int:
    """'24GiB', '24 GB', '80g', '512MiB' -> bytes (GB and GiB both read as 2^30, as GPU makers count)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([gGmM])(?:i?[bB])?\s*", text)
    if not match:
        raise LLMTuneError(f"--memory {text!r}: give an amount such as 24GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * (GiB if match.group(2).lower() == "g" else MiB))


def _this_machine() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        # Under torchrun each process plans for the GPU it will train on.
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        free, _ = torch.cuda.mem_get_info(index)
        # A card the table knows lends its rates; an unknown one plans memory only (rates of the closest kind
        # would be a guess).
        known = next((d for d in DEVICES.values() if d.name.split()[0] in props.name), None)
        base = known or DeviceInfo(props.name, 0, 0.0, 0.0, 0.0)
        return replace(base, name=props.name, memory=free, native_bf16=torch.cuda.is_bf16_supported())
    return _measured_cpu()


_CPU: list[DeviceInfo] = []


def _measured_cpu() -> DeviceInfo:
    """This CPU: available memory, and matmul rate and copy bandwidth measured here in about a second."""
    if _CPU:
        return _CPU[0]
    import torch

    from llmtune.accel import current_device

    def rate(dtype, n=512, reps=3) -> float:
        a = torch.randn(n, n, dtype=dtype)
        a @ a  # warm-up: the first call pays for thread start and kernel selection
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best

    big = torch.empty(32 * MiB, dtype=torch.uint8)
    big.clone()
    start = time.perf_counter()
    big.clone()
    bandwidth = 2 * big.numel() / (time.perf_counter() - start)  # read and write
    device = current_device()
    fp32 = rate(torch.float32)
    info = DeviceInfo(
        f"cpu ({device.name})",
        _available_memory(),
        rate(torch.bfloat16) if device.native_bf16 else fp32,
        fp32,
        bandwidth,
        gpu=False,
        native_bf16=device.native_bf16,
    )
    _CPU.append(info)
    return info


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class MemoryPlan:
    """Peak bytes per device of one training step, by what holds them."""

    recipe: Recipe
    device: DeviceInfo
    nproc: int
    speed: SpeedPlan
    parameters: int
    trainable_parameters: int
    weights: dict[str, int]  # bytes by storage kind (float32, bfloat16, nf4, ...)
    trainable: int  # bytes of the trained weights (part of weights)
    gradients: int  # of the trained weights, alive at the peak
    optimizer: int
    activations: int  # kept for backward at the peak
    logits: int  # the output head's logits and the loss at the peak
    backward: int  # gradients of activations and other temporaries at the peak
    buckets: int  # DDP's flat copy of the gradients it reduces
    other_checkpointing: int | None  # the total with gradient checkpointing the other way round
    flops_per_token: float
    bytes_per_step: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            sum(self.weights.values())
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.backward
            + self.buckets
        )

    @property
    def available(self) -> int:
        return self.device.memory - (CUDA_RESERVE if self.device.gpu else 0)

    @property
    def needed(self) -> int:
        """Bytes the run needs of the device's memory: on a CPU, every process of the run shares the one memory."""
        return self.total * (1 if self.device.gpu else self.nproc)

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    @property
    def tokens_per_step(self) -> int:
        t = self.recipe.training
        return t.batch_size * t.grad_accum * self.recipe.data.max_length * self.nproc

    def tokens_per_second(self) -> tuple[float, float] | None:
        """Training tokens/s over all devices, at the low and high ends of MFU_RANGE and never faster than the
        memory traffic of a step allows; None where the device's rates are unknown."""
        peak = self.device.bf16_flops if self.speed.bf16 or self._half_weights else self.device.fp32_flops
        if not peak or not self.flops_per_token:
            return None
        per_device = self.tokens_per_step / self.nproc
        floor = self.bytes_per_step / self.device.bandwidth if self.device.bandwidth else 0.0
        low, high = (
            self.nproc * per_device / max(per_device * self.flops_per_token / (peak * mfu), floor) for mfu in MFU_RANGE
        )
        return low, high

    @property
    def _half_weights(self) -> bool:
        return self.recipe.training.dtype != "float32" or self.recipe.method.name == "qlora"

    def summary(self) -> str:
        """One line for the start of a run."""
        speed = self.tokens_per_second()
        rate = f", {_rate(speed)}" if speed else ""
        verdict = "fits" if self.fits else "does not fit"
        return (
            f"plan: peak {gib(self.total)} per device of {gib(self.available)} on {self.device.name} "
            f"({verdict}; weights {gib(sum(self.weights.values()))}, activations "
            f"{gib(self.activations + self.logits + self.backward)}){rate}"
        )

    def table(self) -> str:
        t, d = self.recipe.training, self.recipe.data
        ckpt = "with" if self.speed.gradient_checkpointing else "without"
        rows = [(f"weights, {kind}", n) for kind, n in self.weights.items()]
        rows += [
            (f"  of which trained ({self.trainable_parameters:,} parameters)", self.trainable),
            ("gradients alive at the peak", self.gradients),
            (f"optimizer state ({t.optimizer.name})", self.optimizer),
            (f"activations kept for backward ({ckpt} gradient checkpointing)", self.activations),
            ("logits and loss", self.logits),
            ("backward temporaries", self.backward),
        ]
        if self.buckets:
            rows.append(("DDP gradient buckets", self.buckets))
        width = max(len(name) for name, _ in rows)
        lines = [
            f"plan for {self.recipe.model} ({self.parameters:,} parameters), method {self.recipe.method.name}, "
            f"objective {self.recipe.objective.name}",
            f"a step: {self.nproc} x {t.batch_size} rows of {d.max_length} tokens per micro-batch, grad_accum "
            f"{t.grad_accum}; {self.speed.summary()}",
            "",
            *(f"  {name:<{width}}  {gib(n):>10}" for name, n in rows if not name.startswith("  ") or n),
            f"  {'peak per device':<{width}}  {gib(self.total):>10}",
        ]
        if self.other_checkpointing is not None:
            other = "without" if self.speed.gradient_checkpointing else "with"
            lines.append(f"  {f'  ({other} gradient checkpointing)':<{width}}  {gib(self.other_checkpointing):>10}")
        lines += ["", f"device {self.device.name}: {gib(self.available)} for tensors: {self._verdict()}"]
        speed = self.tokens_per_second()
        if speed:
            lines.append(f"speed: {_rate(speed)} ({self.flops_per_token / 1e9:.2f} GFLOP per token)")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _verdict(self) -> str:
        shared = "" if self.needed == self.total else f" (its {self.nproc} processes: {gib(self.needed)})"
        if self.fits:
            return f"fits{shared}, {gib(self.available - self.needed)} to spare"
        return f"does not fit{shared}, {gib(self.needed - self.available)} short"

    def to_dict(self) -> dict[str, Any]:
        speed = self.tokens_per_second()
        return {
            "model": self.recipe.model,
            "method": self.recipe.method.name,
            "device": self.device.name,
            "nproc": self.nproc,
            "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "weights": self.weights,
            "trainable": self.trainable,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "backward": self.backward,
            "buckets": self.buckets,
            "total": self.total,
            "available": self.available,
            "fits": self.fits,
            "gradient_checkpointing": self.speed.gradient_checkpointing,
            "total_other_checkpointing": self.other_checkpointing,
            "tokens_per_second": speed,
        }


def gib(n: float) -> str:
    """Bytes in GiB with two decimals, or in MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _rate(speed: tuple[float, float]) -> str:
    return f"{_count(speed[0])}-{_count(speed[1])} tokens/s"


def _count(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def start_plan(recipe: Recipe, longest: int | None) -> MemoryPlan | None:
    """The plan of a run starting on this machine whose rows are at most `longest` tokens; None, with a line
    saying why, for a run the planner cannot model."""
    if longest:
        data = recipe.data.model_copy(update={"max_length": min(longest, recipe.data.max_length)})
        recipe = recipe.model_copy(update={"data": data})
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return plan_recipe(recipe, device_info(None), nproc, both_checkpointing=False)
    except Exception as e:  # the plan advises; a model it cannot trace on fake tensors still trains
        from llmtune.errors import first_line

        reason = str(e) if isinstance(e, LLMTuneError) else f"{type(e).__name__}: {first_line(e)}"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"plan: none for this run ({reason})", flush=True)
        return None


_PLANS: dict[str, MemoryPlan] = {}


def plan_recipe(recipe: Recipe, device: DeviceInfo, nproc: int = 1, both_checkpointing: bool = True) -> MemoryPlan:
    """The memory and speed plan of `recipe` on `nproc` devices like `device`."""
    # The same recipe planned again (each run of a sweep, the fixes tried) costs nothing the second time.
    key = json.dumps(
        [recipe.model_dump(mode="json", exclude={"eval", "output"}), repr(device), nproc, both_checkpointing]
    )
    if key not in _PLANS:
        _PLANS[key] = _plan(recipe, device, nproc, both_checkpointing)
    return _PLANS[key]


def _plan(recipe: Recipe, device: DeviceInfo, nproc: int, both_checkpointing: bool) -> MemoryPlan:
    _check_planned(recipe)
    counts = _at_full_depth(recipe, device)
    other = None
    if both_checkpointing:
        flipped = _flip_checkpointing(recipe, counts.speed)
        if flipped is not None:
            other = _memory_plan(flipped, device, nproc, _at_full_depth(flipped, device), None).total
    return _memory_plan(recipe, device, nproc, counts, other)


_COUNTS: dict[str, _Counts] = {}


def _at_full_depth(recipe: Recipe, device: DeviceInfo) -> _Counts:
    # The step does not depend on the device's memory or the number of devices: plans for other amounts of
    # either (the shards a fix tries) reuse it.
    key = json.dumps([recipe.model_dump(mode="json", exclude={"eval", "output"}), repr(replace(device, memory=0))])
    if key not in _COUNTS:
        layers = _layers(recipe)
        if layers <= DEPTHS[1]:
            _COUNTS[key] = _step(recipe, device, layers)
        else:
            _COUNTS[key] = _extrapolate(*(_step(recipe, device, depth) for depth in DEPTHS), layers)
    return _COUNTS[key]


def _flip_checkpointing(recipe: Recipe, speed: SpeedPlan) -> Recipe | None:
    if recipe.method.name == "prefix" or recipe.training.fsdp_checkpoints:
        return None  # never checkpointed (see accel.resolve)
    return _with(recipe, {"speed": {"gradient_checkpointing": not speed.gradient_checkpointing}})


def _with(recipe: Recipe, changes: dict[str, dict[str, Any]]) -> Recipe:
    data = recipe.model_dump(mode="python")
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    return type(recipe).model_validate(data)


# Objectives whose step is one forward and backward over the batch's rows; the rest sample completions or run a
# teacher while they train.
_PLANNED_KINDS = ("causal-lm", "seq2seq-lm", "masked-lm", "sequence-classification", "token-classification")


def _check_planned(recipe: Recipe) -> None:
    o = recipe.objective
    if o.generates_while_training or getattr(o, "student", None) is not None or hasattr(o, "teacher"):
        raise LLMTuneError(
            f"objective {o.name}: its steps generate completions or run a second model, which llmtune plan does "
            "not model yet; plan the same model with objective sft to see its weights, optimizer and activations"
        )
    if o.model_kind not in _PLANNED_KINDS:
        raise LLMTuneError(f"objective {o.name}: model kind {o.model_kind} is not planned")
    if recipe.method.virtual_tokens:
        raise LLMTuneError(
            f"method {recipe.method.name}: its virtual tokens start from the model's own embeddings, which llmtune "
            "plan does not have; plan the same model with method lora to see its weights and activations"
        )


@dataclass
class _Counts:
    depth: int
    parameters: int
    trainable_parameters: int
    weights: dict[str, int]
    trainable: int
    optimizer: int
    gradients: int  # of every trained weight
    step: dict[str, int]  # the fake step's peak: activations, logits, backward temporaries, gradients so far
    steady: dict[str, int]  # its peak of all but gradients: a micro-batch whose gradients already exist
    flops_per_token: float
    speed: SpeedPlan
    notes: list[str]


def _extrapolate(a: _Counts, b: _Counts, layers: int) -> _Counts:
    """`a` and `b` measured at two depths, carried to `layers` along the line through them."""
    k = (layers - a.depth) / (b.depth - a.depth)

    def line(x: float, y: float) -> int:
        return max(0, round(x + k * (y - x)))

    return _Counts(
        depth=layers,
        parameters=line(a.parameters, b.parameters),
        trainable_parameters=line(a.trainable_parameters, b.trainable_parameters),
        weights={kind: line(a.weights.get(kind, 0), b.weights.get(kind, 0)) for kind in {**a.weights, **b.weights}},
        trainable=line(a.trainable, b.trainable),
        optimizer=line(a.optimizer, b.optimizer),
        gradients=line(a.gradients, b.gradients),
        step={key: line(a.step[key], b.step[key]) for key in a.step},
        steady={key: line(a.steady[key], b.steady[key]) for key in a.steady},
        flops_per_token=a.flops_per_token + k * (b.flops_per_token - a.flops_per_token),
        speed=b.speed,
        notes=b.notes,
    )


def _memory_plan(recipe: Recipe, device: DeviceInfo, nproc: int, c: _Counts, other: int | None) -> MemoryPlan:
    t = recipe.training
    weights, gradients, optimizer = dict(c.weights), c.gradients, c.optimizer
    notes = list(c.notes)
    buckets = 0
    shard = _sharding(recipe, nproc)
    if shard == "params":
        weights = {k: math.ceil(v / nproc) for k, v in weights.items()}
    if shard in ("params", "grads"):
        gradients = math.ceil(gradients / nproc)
    if shard in ("params", "grads", "optimizer"):
        optimizer = math.ceil(optimizer / nproc)
    if _offloads_optimizer(recipe):
        optimizer = 0
        notes.append("DeepSpeed offloads the optimizer state to CPU memory: it is not on the device")
    if nproc > 1 and shard is None:
        buckets = gradients
    if t.grad_accum > 1:
        # Gradients of earlier micro-batches stay alive through the next micro-batch, which adds to them.
        step = c.steady
        notes.append(f"grad_accum {t.grad_accum}: gradients stay alive across micro-batches")
    else:
        # The trainer frees gradients after each optimizer step: the step's own peak says how many exist.
        step = c.step
        gradients = math.ceil(step["gradients"] * gradients / max(c.gradients, 1))
    tokens_per_device = t.batch_size * recipe.data.max_length
    step_bytes = _bytes_per_step(weights, c, t.grad_accum)
    return MemoryPlan(
        recipe=recipe,
        device=device,
        nproc=nproc,
        speed=c.speed,
        parameters=c.parameters,
        trainable_parameters=c.trainable_parameters,
        weights=weights,
        trainable=c.trainable,
        gradients=gradients,
        optimizer=optimizer,
        activations=step["activations"],
        logits=step["logits"],
        backward=step["backward"],
        buckets=buckets,
        other_checkpointing=other,
        flops_per_token=c.flops_per_token,
        bytes_per_step=step_bytes if tokens_per_device else 0.0,
        notes=notes,
    )


def _bytes_per_step(weights: dict[str, int], c: _Counts, grad_accum: int) -> float:
    """Memory traffic of one optimizer step: each micro-batch reads the weights in forward, again in backward
    (and once more when recomputing), and the optimizer reads and writes the trained weights, their gradients
    and its state once."""
    passes = 3 if c.speed.gradient_checkpointing else 2
    return grad_accum * passes * sum(weights.values()) + 2 * (c.trainable + c.gradients + c.optimizer)


def _sharding(recipe: Recipe, nproc: int) -> str | None:
    """What is split across devices: 'params' (FSDP, ZeRO-3), 'grads' (ZeRO-2), 'optimizer' (ZeRO-1) or None."""
    t = recipe.training
    if nproc == 1:
        return None
    if t.fsdp:
        return "params"
    stage = _zero_stage(recipe)
    return {1: "optimizer", 2: "grads", 3: "params"}.get(stage)


def _deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    if not recipe.training.deepspeed:
        return {}
    return json.loads(Path(recipe.training.deepspeed).read_text(encoding="utf-8"))


def _zero_stage(recipe: Recipe) -> int:
    return int(_deepspeed_config(recipe).get("zero_optimization", {}).get("stage", 0))


def _offloads_optimizer(recipe: Recipe) -> bool:
    zero = _deepspeed_config(recipe).get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


# The number-of-layers keys of the configs transformers ships (a config's attribute_map routes the others).
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


def _layers(recipe: Recipe) -> int:
    return _depth_of(_base_config(recipe))


def _depth_of(config: Any) -> int:
    for key in _LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise LLMTuneError(f"model {config.__class__.__name__}: no layer count in its config; it cannot be planned")


_CONFIGS: dict[str, Any] = {}


def _base_config(recipe: Recipe) -> Any:
    from llmtune.models import load_config, options_for

    if recipe.model not in _CONFIGS:
        _CONFIGS[recipe.model] = load_config(recipe.model, options_for(recipe, recipe.model))
    return _CONFIGS[recipe.model]


def _config_at(recipe: Recipe, depth: int) -> Any:
    import copy

    config = copy.deepcopy(_base_config(recipe))
    for key, value in recipe.objective.head_config().items():
        setattr(config, key, value)
    layers = _depth_of(config)
    if depth == layers:
        return config
    for key in (*_LAYER_KEYS, "num_decoder_layers"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, depth)
    # Per-layer lists (attention kinds, MoE layer choices) follow the depth.
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == layers:
            setattr(config, key, value[:depth])
    return config


def _step(recipe: Recipe, device: DeviceInfo, depth: int) -> _Counts:
    """Counts of the model at `depth` layers and the peak of one fake training step."""
    import torch

    from llmtune import accel
    from llmtune.accel import Device
    from llmtune.methods import METHODS, PEFT_TASK_TYPES
    from llmtune.models import auto_class

    config = _config_at(recipe, depth)
    kind = recipe.objective.model_kind
    # A 4-bit model loads in its compute dtype (llmtune.models.load_model).
    dtype = getattr(torch, getattr(recipe.method, "compute_dtype", recipe.training.dtype))
    with torch.device("meta"):
        model = auto_class(kind).from_config(config, dtype=dtype)
        quantized = _quantized_linears(model) if recipe.method.name == "qlora" else set()
        model = METHODS[recipe.method.name](
            recipe.method, model, None, task_type=PEFT_TASK_TYPES[recipe.objective.model_kind]
        )
    target = Device("cuda" if device.gpu else "cpu", device.name, device.native_bf16)
    speed = accel.resolve(recipe, target, model, None)
    counts = _count_parameters(recipe, model, quantized, speed)
    step, steady, notes = _fake_step(recipe, model, quantized, speed, target)
    return _Counts(
        depth=depth,
        step=step,
        steady=steady,
        flops_per_token=_flops_per_token(recipe, model, config, speed),
        speed=speed,
        notes=notes,
        **counts,
    )


def _quantized_linears(model: nn.Module) -> set[str]:
    """Names of the linear layers bitsandbytes quantizes when transformers loads `model` for qlora."""
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == k or name.endswith("." + k) for k in keep)
    }


def _count_parameters(recipe: Recipe, model: nn.Module, quantized: set[str], speed: SpeedPlan) -> dict[str, Any]:
    from torch import nn

    weights: dict[str, int] = {}
    quantized_weights = {
        id(module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _base_name(name) in quantized
    }
    frozen_linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad}
    total = trainable_n = trainable_bytes = optimizer = 0
    for p in model.parameters():
        total += p.numel()
        if id(p) in quantized_weights:
            kind, size = _quantized_bytes(recipe.method, p)
        elif speed.frozen_bf16 and id(p) in frozen_linear:
            kind, size = "bfloat16", 2 * p.numel()
        else:
            kind, size = str(p.dtype).removeprefix("torch."), p.numel() * p.element_size()
        weights[kind] = weights.get(kind, 0) + size
        if p.requires_grad:
            trainable_n += p.numel()
            trainable_bytes += size
            optimizer += optimizer_bytes(recipe.training.optimizer, p)
    from peft import PeftModel

    if recipe.objective.reference_policy and not isinstance(model, PeftModel):
        # No adapter to switch off: the reference is a second, frozen copy of the base, loaded as the policy was.
        weights["reference copy"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "parameters": total,
        "trainable_parameters": trainable_n,
        "weights": weights,
        "trainable": trainable_bytes,
        "gradients": trainable_bytes,
        "optimizer": optimizer,
    }


def _base_name(name: str) -> str:
    """A module's name in the model before peft wrapped it (base_model.model. prefix, .base_layer suffix)."""
    return name.removeprefix("base_model.model.").removesuffix(".base_layer")


def _quantized_bytes(spec: Any, p: torch.Tensor) -> tuple[str, int]:
    n = p.numel()
    if spec.bits == 8:
        return "int8", n + 4 * p.shape[0]  # one float32 scale per output row
    blocks = math.ceil(n / 64)  # bitsandbytes' 4-bit block
    # Double quantization stores each block's scale in 8 bits, with a float32 scale per 256 of them and one
    # float32 offset.
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 if spec.double_quant else 4 * blocks
    return spec.quant_type, n // 2 + scales


def optimizer_bytes(spec: Any, p: torch.Tensor) -> int:
    """Bytes of optimizer state the recipe's optimizer keeps for trained weight `p`."""
    n, size = p.numel(), p.element_size()
    name = spec.name
    if name == "adamw":
        return 2 * n * size  # both moments in the weight's dtype
    if name in ("adamw_8bit", "paged_adamw_8bit", "lion_8bit"):
        moments = 1 if name == "lion_8bit" else 2
        # bitsandbytes keeps 32-bit state for tensors under 4096 elements; 8-bit state has a scale per 256.
        if n < 4096:
            return moments * 4 * n
        return moments * (n + 4 * math.ceil(n / 256))
    if name == "adafactor":
        factored = p.dim() >= 2
        second = 4 * (math.prod(p.shape[:-1]) + p.shape[-1]) if factored else 4 * n
        return second + (4 * n if spec.beta1 is not None else 0)
    if name == "sgd":
        return n * size if spec.momentum else 0
    raise LLMTuneError(f"training.optimizer {name}: its state is not planned")


def _flops_per_token(recipe: Recipe, model: nn.Module, config: Any, speed: SpeedPlan) -> float:
    """Forward matmul FLOPs per token (2 per weight of every linear layer, plus causal attention's scores and
    mix), times the passes a step makes: forward, input gradients, weight gradients where weights train, and
    the recomputed forward under checkpointing."""
    from torch import nn

    matmul = trained = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            matmul += m.weight.numel()
            trained += m.weight.numel() if m.weight.requires_grad else 0
    layers = _depth_of(config)
    width = getattr(config, "hidden_size", 0) or 0
    attention = 2 * layers * recipe.data.max_length * width
    forward = 2 * matmul + attention
    passes = 2 + trained / max(matmul, 1) + (1 if speed.gradient_checkpointing else 0)
    return forward * passes


def _fake_step(
    recipe: Recipe, model: nn.Module, quantized: set[str], speed: SpeedPlan, device: Any
) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """One training step of `model` on fake tensors: the bytes of its live tensors by category where their sum
    was highest, and where the sum of all but the gradients was highest."""
    import torch
    from torch import nn

    from llmtune import accel

    fake = _live_bytes_mode()
    cpu = torch.device("cpu")
    converted: dict[int, nn.Parameter] = {}
    compute = getattr(torch, getattr(recipe.method, "compute_dtype", recipe.training.dtype))
    for name, module in model.named_modules():
        base = _base_name(name) in quantized
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in converted:
                # A 4-bit layer computes in method.compute_dtype from weights dequantized on the fly.
                meta = p.data.to(compute) if base and key == "weight" else p.data
                tensor = fake.fake_tensor_converter.from_meta_and_device(fake, meta, cpu)
                converted[id(p)] = nn.Parameter(tensor, requires_grad=p.requires_grad)
            module._parameters[key] = converted[id(p)]
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = fake.fake_tensor_converter.from_meta_and_device(fake, b, cpu)
    notes = []
    with fake:
        # Liger's Triton kernels need a GPU; llmtune's fused blocks keep the same activations for backward.
        kernels = "llmtune" if speed.kernels else None
        loss_fn = accel.apply(model, replace(speed, kernels=kernels), probe=False)
        if speed.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        model.train()
        model.config.use_cache = False
        inputs = _fake_batch(recipe, model)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if speed.bf16 else nullcontext()
        with fake.tracking(model):
            with autocast:
                loss = _loss(model, inputs, loss_fn, fake, device)
            fake.category = "backward"
            loss.backward()
    peaks = fake.at_peak, fake.at_steady_peak
    if quantized:
        # bitsandbytes dequantizes one 4-bit weight at a time, in forward and again in backward.
        largest = max(m.weight.numel() for n, m in model.named_modules() if _base_name(n) in quantized)
        for peak in peaks:
            peak["backward"] += largest * torch.tensor([], dtype=compute).element_size()
        notes.append("4-bit layers: each weight is dequantized for its matmul, one at a time")
    return *peaks, notes


def _fake_batch(recipe: Recipe, model: nn.Module) -> dict[str, torch.Tensor]:
    """A batch as large as the recipe allows: batch_size rows of max_length tokens each, every label set (pairs
    objectives put chosen and rejected rows in one batch)."""
    import torch

    rows = recipe.training.batch_size * (2 if recipe.objective.pairs else 1)
    length = recipe.data.max_length
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (rows, length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kind = recipe.objective.model_kind
    if kind == "sequence-classification":
        labels = model.config.num_labels
        batch["labels"] = torch.zeros(rows) if labels == 1 else torch.zeros(rows, dtype=torch.long)
    else:
        batch["labels"] = ids.clone()
    return batch


def _loss(model, inputs, loss_fn, fake, device) -> torch.Tensor:
    if loss_fn is None:
        fake.logits_from_head(model)
        return model(**inputs).loss
    from llmtune.accel.loss import summed_nll

    hidden = loss_fn.hidden_states(model, inputs)
    fake.category = "logits"
    states = hidden[:, :-1].reshape(-1, hidden.size(-1))  # every position carries loss: the largest batch
    targets = inputs["labels"][:, 1:].reshape(-1)
    chunk = loss_fn.chunk_rows(states, gpu=device.gpu)
    return summed_nll(loss_fn.head, states, targets, chunk) / targets.numel()


def _live_bytes_mode():
    """A fake-tensor mode that, while `tracking`, keeps the bytes of every tensor storage its ops create, by
    category, until the storage is freed, and their breakdown when the total was highest (`at_peak`) and when
    the total of all but the gradients was (`at_steady_peak`). Parameters and buffers are counted from the
    model, not here; a gradient moves to 'gradients' once it is accumulated into its weight."""
    import contextlib

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    categories = ("activations", "logits", "backward", "gradients")
    device_query = torch.ops.prim.device.default

    class LiveBytes(FakeTensorMode):
        def __init__(self) -> None:
            super().__init__()
            self.on = False
            self.category = "activations"
            self.live = dict.fromkeys(categories, 0)
            self.at_peak = dict(self.live)
            self.at_steady_peak = dict(self.live)
            self._peak = self._steady_peak = 0
            self._owner = WeakIdKeyDictionary()  # storage -> [category, bytes]

        @contextlib.contextmanager
        def tracking(self, model: nn.Module):
            for t in [*model.parameters(), *model.buffers()]:
                self._owner[t.untyped_storage()] = None
            hooks = [
                p.register_post_accumulate_grad_hook(self._to_gradients) for p in model.parameters() if p.requires_grad
            ]
            self.on = True
            try:
                yield
            finally:
                self.on = False
                for hook in hooks:
                    hook.remove()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs or {})
            if self.on and func is not device_query:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self._track(t.untyped_storage())
            return out

        def logits_from_head(self, model: nn.Module) -> None:
            """Count what the output head and the loss after it make as logits."""
            head = model.get_output_embeddings()
            if head is not None:
                head.register_forward_pre_hook(lambda *_: setattr(self, "category", "logits"))

        def _track(self, storage: Any) -> None:
            if storage in self._owner:
                return
            entry = [self.category, storage.nbytes()]
            self._owner[storage] = entry
            weakref.finalize(storage, self._free, entry)
            self.live[entry[0]] += entry[1]
            total = sum(self.live.values())
            if total > self._peak:
                self._peak, self.at_peak = total, dict(self.live)
            steady = total - self.live["gradients"]
            if steady > self._steady_peak:
                self._steady_peak, self.at_steady_peak = steady, dict(self.live, gradients=0)

        def _free(self, entry: list) -> None:
            self.live[entry[0]] -= entry[1]

        def _to_gradients(self, p: torch.Tensor) -> None:
            entry = self._owner.get(p.grad.untyped_storage())
            if entry and entry[0] != "gradients":
                self.live[entry[0]] -= entry[1]
                entry[0] = "gradients"
                self.live["gradients"] += entry[1]

    return LiveBytes()


# The changes `fix` tries, least disruptive first: the same run slower, the same run in more steps, then less
# optimizer memory, then a quantized base.
def propose_fix(plan: MemoryPlan) -> tuple[str, MemoryPlan] | None:
    """The smallest recipe change (as --set flags) under which `plan`'s run fits its device, and its plan."""
    recipe = plan.recipe
    for flags, changes in _fixes(recipe, plan.speed):
        candidate = plan_recipe(_with(recipe, changes), plan.device, plan.nproc, both_checkpointing=False)
        if candidate.fits:
            return flags, candidate
    # Then more GPUs, each holding a shard of the weights, gradients and optimizer state (processes on one CPU
    # share its memory: more of them do not help).
    if plan.device.gpu and not recipe.training.sharded:
        sharded = _with(recipe, {"training": {"fsdp": True}})
        for nproc in (2, 4, 8):
            if nproc > plan.nproc:
                candidate = plan_recipe(sharded, plan.device, nproc, both_checkpointing=False)
                if candidate.fits:
                    return f"--set training.fsdp=true --nproc {nproc}", candidate
    return None


def fix_command(recipe_path: Any, overrides: list[str] | None, flags: str) -> str:
    """The finetune command with the user's --set flags and a fix's, the fix's replacing any of the same key."""
    import shlex

    changed = {flag.split("=", 1)[0] for flag in re.findall(r"--set (\S+)", flags)}
    kept = [o for o in overrides or [] if o.split("=", 1)[0].strip() not in changed]
    return f"llmtune finetune {recipe_path}{''.join(f' --set {shlex.quote(o)}' for o in kept)} {flags}"


def no_fix_hint(plan: MemoryPlan) -> str:
    """What is left to try when no single recipe change, nor sharding over up to 8 GPUs, makes `plan`'s run fit."""
    if plan.device.gpu:
        return "shorten data.max_length, or shard over more than 8 GPUs (llmtune plan --nproc N says how many)"
    return "shorten data.max_length"


def _fixes(recipe: Recipe, speed: SpeedPlan):
    t = recipe.training
    checkpoint = (
        {} if speed.gradient_checkpointing or recipe.method.name == "prefix" else {"gradient_checkpointing": True}
    )
    if checkpoint:
        yield "--set speed.gradient_checkpointing=true", {"speed": checkpoint}
    batch, accum = t.batch_size, t.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        changes = {"training": {"batch_size": batch, "grad_accum": accum}}
        flags = f"--set training.batch_size={batch} --set training.grad_accum={accum}"
        if checkpoint:
            yield f"{flags} --set speed.gradient_checkpointing=true", {**changes, "speed": checkpoint}
        else:
            yield flags, changes
    if t.optimizer.name == "adamw":
        yield "--set training.optimizer=adamw_8bit", {"training": {"optimizer": {"name": "adamw_8bit"}}}
    if recipe.method.name == "lora":
        yield "--set method.name=qlora", {"method": {"name": "qlora"}}
