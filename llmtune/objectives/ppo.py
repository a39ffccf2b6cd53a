"""PPO, RLHF's last stage: the policy samples a completion to each prompt, a reward model (and any rule rewards)
scores it, and the policy moves toward completions that scored better than its value head expected, while a
per-token KL penalty keeps it near the reference (the model with the adapter switched off).

TRL 1.16 ships no PPO trainer, so this one is llmtune's own, on transformers' Trainer for its checkpoints, resume,
schedule and logs. One Trainer step is one rollout batch of training.batch_size prompts followed by
objective.ppo_epochs x objective.minibatches optimizer steps on it (the last of them the Trainer's own).
The algorithm follows the PPO of "Fine-Tuning Language Models from Human Preferences" (Ziegler et al., 2019) and
"The N+ Implementation Details of RLHF with PPO" (Huang et al., 2024): the reward is the score at the last token
minus kl_coef x (log p - log p_ref) at every token, advantages by GAE and whitened per rollout, clipped policy
and value losses.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, Trainer, TrainingArguments

from llmtune.batching import pad_batch
from llmtune.data import encode_prompt, prompt_sample
from llmtune.errors import LLMTuneError
from llmtune.objectives.base import training_args
from llmtune.objectives.grpo import as_completions, online_trainer
from llmtune.templates import stop_token_ids
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

VALUE_HEAD_FILE = "value_head.safetensors"

# --- the algorithm on tensors: responses are (batch, T), `mask` 1 on each response's tokens (through its EOS) ----


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean and unit variance over the response tokens; 0 elsewhere."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards and per-token KL: each token earns -kl_coef x (log p - log p_ref); the last token of each
    response also earns its sequence's score."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.size(0)), last] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (advantages + values). The value after a response's last token
    is 0: the episode ends there."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        following = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: the mean of max(-A r, -A clip(r, 1 - e, 1 + e)) with r = p / p_old, and the share
    of tokens where the clipped term is the larger (clip fraction)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 x the mean of max((v - R)^2, (v_clipped - R)^2), v_clipped within cliprange_value of the rollout's value,
    and the share of tokens where the clipped error is the larger."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def response_mask(responses: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 on each response's tokens through its first stop token (all of them if it has none), 0 after."""
    stops = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    after_stop = (stops.cumsum(dim=1) - stops.long()) > 0
    return (~after_stop).long()


# --- the trainer ------------------------------------------------------------------------------------------------


class _PPO(Trainer):
    """The PPO loop on transformers' Trainer (see the module docstring); a rollout is generated in training_step."""

    def __init__(self, *, value_head: nn.Module, ref_model, objective, reward_funcs: list, **kwargs):
        super().__init__(**kwargs)
        self.value_head = value_head.to(self.args.device)
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
        self.objective = objective
        self.rewards = reward_funcs
        self.reward_weights = objective.reward_weights or [1.0] * len(reward_funcs)
        self.stop_ids = stop_token_ids(self.processing_class)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # Sampling and scoring must see the same network, or the policy ratio of an unchanged policy is not 1.
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            optimizer.add_param_group({"params": list(self.value_head.parameters()), "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model):
        params = [*model.parameters(), *self.value_head.parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        objective = self.objective
        rollout = self._rollout(model, self._prepare_inputs(inputs))
        n = rollout["mask"].size(0)
        size = n // objective.minibatches
        updates = [
            order[start : start + size]
            for _ in range(objective.ppo_epochs)
            for order in [torch.randperm(n)]
            for start in range(0, n, size)
        ]
        self.value_head.zero_grad(set_to_none=True)  # the Trainer zeroes the model's gradients, not the head's
        model.train()
        losses = []
        for k, rows in enumerate(updates):
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, {key: v[rows] for key, v in rollout.items()})
            self.accelerator.backward(loss)
            losses.append(loss.detach())
            if k < len(updates) - 1:  # the last step is the Trainer's: its clipping, schedule, logging and saving
                if self.args.max_grad_norm > 0:
                    self._clip_grad_norm(model)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        objective, mask = self.objective, inputs["mask"]
        logprobs, values, entropy = self._forward(model, inputs["input_ids"], inputs["attention_mask"], mask.size(1))
        policy_loss, clip_fraction = clipped_policy_loss(
            logprobs, inputs["logprobs"], inputs["advantages"], mask, objective.cliprange
        )
        value_loss, value_clip_fraction = clipped_value_loss(
            values, inputs["values"], inputs["returns"], mask, objective.cliprange_value
        )
        loss = policy_loss + objective.vf_coef * value_loss
        for key, value in (
            ("policy_loss", policy_loss),
            ("value_loss", value_loss),
            ("clip_fraction", clip_fraction),
            ("value_clip_fraction", value_clip_fraction),
            ("entropy", masked_mean(entropy, mask)),
            ("approx_kl", 0.5 * masked_mean((logprobs - inputs["logprobs"]) ** 2, mask)),
        ):
            self._metrics[key].append(value.item())
        return (loss, None) if return_outputs else loss

    def _forward(self, model, input_ids, attention_mask, width: int, value_head: bool = True):
        """Per response token (the last `width` positions): its log-probability at the sampling temperature, the
        value of the state before it and the entropy of the distribution it was drawn from."""
        # Rows are left-padded prompts: positions count real tokens only, as generation counted them.
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, output_hidden_states=value_head
        )
        logits = out.logits[:, -width - 1 : -1].float() / self.objective.temperature
        logps = logits.log_softmax(dim=-1)
        token_logps = logps.gather(-1, input_ids[:, -width:, None]).squeeze(-1)
        if not value_head:
            return token_logps, None, None
        values = self.value_head(out.hidden_states[-1][:, -width - 1 : -1].float()).squeeze(-1)
        entropy = -(logps.exp() * logps).sum(dim=-1)
        return token_logps, values, entropy

    @torch.no_grad()
    def _rollout(self, model, inputs) -> dict[str, torch.Tensor]:
        """Sample a completion to each prompt, score it and compute its advantages and returns."""
        objective, tokenizer = self.objective, self.processing_class
        policy = self.accelerator.unwrap_model(model)
        policy.eval()
        prompts, prompt_attention = inputs["input_ids"], inputs["attention_mask"]
        sampling = GenerationConfig(
            max_new_tokens=objective.max_completion_length,
            do_sample=True,
            temperature=objective.temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=self.stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,  # training switched the model's cache off
        )
        sequences = policy.generate(input_ids=prompts, attention_mask=prompt_attention, generation_config=sampling)
        responses = sequences[:, prompts.size(1) :]
        mask = response_mask(responses, self.stop_ids)
        attention = torch.cat([prompt_attention, mask], dim=1)
        width = responses.size(1)
        with self.compute_loss_context_manager():
            logprobs, values, _ = self._forward(model, sequences, attention, width)
            ref_logprobs = self._reference_logprobs(policy, sequences, attention, width)

        lengths = mask.sum(dim=1).tolist()
        texts = [tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(responses, lengths, strict=True)]
        scores = self._scores(inputs["prompts"], texts, inputs["references"], mask.device)
        rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, objective.kl_coef)
        advantages, returns = gae(rewards, values, mask, objective.gamma, objective.lam)
        self._metrics["kl"].append(kl.sum(dim=1).mean().item())
        self._metrics["non_score_reward"].append((-objective.kl_coef * kl).sum(dim=1).mean().item())
        self._metrics["completions/mean_length"].append(mask.sum(dim=1).float().mean().item())
        return {
            "input_ids": sequences,
            "attention_mask": attention,
            "mask": mask,
            "logprobs": logprobs,
            "values": values * mask,
            "advantages": whiten(advantages, mask),
            "returns": returns,
        }

    def _reference_logprobs(self, policy, sequences, attention, width) -> torch.Tensor:
        if not self.objective.kl_coef:
            return torch.zeros(sequences.size(0), width, device=sequences.device)
        if self.ref_model is not None:
            return self._forward(self.ref_model, sequences, attention, width, value_head=False)[0]
        with policy.disable_adapter():
            return self._forward(policy, sequences, attention, width, value_head=False)[0]

    def _scores(self, prompts: list, texts: list[str], references: list[str], device) -> torch.Tensor:
        """The weighted sum of the rewards of each completion; each reward's mean is logged under its name."""
        completions = as_completions(prompts, texts)
        total = torch.zeros(len(texts), device=device)
        for reward, weight in zip(self.rewards, self.reward_weights, strict=True):
            values = torch.tensor(
                reward(prompts=prompts, completions=completions, reference=references),
                dtype=torch.float32,
                device=device,
            )
            self._metrics[f"rewards/{reward.__name__}/mean"].append(values.mean().item())
            total += weight * values
        self._metrics["reward"].append(total.mean().item())
        return total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs = {**logs, **{key: sum(v) / len(v) for key, v in self._metrics.items()}}
            self._metrics.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            save_value_head(self.value_head, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / VALUE_HEAD_FILE
        if not path.is_file():
            raise LLMTuneError(
                f"{path.parent}: no {VALUE_HEAD_FILE}, so ppo cannot resume from it; start again with --overwrite"
            )
        self.value_head.load_state_dict(load_file(path, device=str(self.args.device)))

    def save_beside_weights(self, run_dir: Path) -> None:
        """The value head in the run directory, so a later stage can continue from it."""
        save_value_head(self.value_head, run_dir)


class PPOTrainer(GuardedTrainerMixin, _PPO):
    """llmtune's PPO with llmtune's checkpoints and guards."""


def save_value_head(head: nn.Module, directory: Path) -> None:
    path = directory / VALUE_HEAD_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def build_ppo(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LLMTuneError("objective ppo trains its value head in one process; launch it without --nproc or torchrun")
    objective = recipe.objective
    args = training_args(TrainingArguments, recipe, plan, output_dir, remove_unused_columns=False)
    # Zero-initialised: every state starts valued at 0, so the first advantages are the rewards themselves.
    value_head = nn.Linear(model.config.get_text_config().hidden_size, 1)
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    return online_trainer(
        PPOTrainer,
        args,
        recipe,
        model,
        tokenizer,
        data,
        output_dir,
        callbacks,
        objective.kl_coef,
        data_collator=_prompt_collator(tokenizer),
        value_head=value_head,
        objective=objective,
    )


def _prompt_collator(tokenizer: PreTrainedTokenizerBase):
    """Prompts encoded as generation sees them and left-padded, with the prompts and references the rewards read."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [row["prompt"] for row in rows]
        ids, attention = pad_batch(
            [encode_prompt(prompt_sample(p), tokenizer) for p in prompts], tokenizer.pad_token_id, left=True
        )
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "prompts": prompts,
            "references": [row["reference"] for row in rows],
        }

    return collate
