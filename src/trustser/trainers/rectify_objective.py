"""The RL objective of SED rectification (paper section 3.2), beside the trainer that uses it:
per-decision log-probabilities, advantages (one per policy, GRPO-style, or one per field and
policy), the PPO/GRPO clipped surrogate, the entropy bonus and the KL to the initial policy; and
the single-field credit (``advantage="single_field"``): every one-field modification scored, and
the controller fitted to the best response to those measured gains instead of a sampled surrogate
(online, or once to the whole training set's gains with an early-stopped fit).

The controller's policy is five independent retain/modify decisions per utterance (logits
(B, 5, 2)); K policies are sampled per utterance (``trustser.models.sed_controller.sample_policies``)
and each gets one reward (minus the SER-SLM's emotion cross-entropy with its rectified caption).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

ADVANTAGES = ("group", "per_field", "single_field")


def action_log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(B, K, 5) log-probabilities of ``actions`` (B, K, 5) under (B, 5, 2) ``logits`` (differentiable)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    b, k, nf = actions.shape
    return torch.gather(logp.unsqueeze(1).expand(b, k, nf, 2), -1, actions.unsqueeze(-1)).squeeze(-1)


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, 5) entropy of each field's retain/modify distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def group_normalize(rewards: torch.Tensor, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """GRPO advantages within each row (one utterance's K policies): r - mean, divided by the
    group's std (``scale="group"``, the paper's GRPO-style normalisation), by the std of all
    rewards given (``"batch"``), or not at all (``"none"``, Dr. GRPO): the same choices as TRL's
    ``GRPOConfig.scale_rewards``. Dividing by the group std turns differences of a few hundredths
    of a nat between K near-identical captions into unit-size advantages; ``batch``/``none`` keep
    the size of the reward difference. NaN rewards (e.g. an empty emotion span) are ignored and
    get advantage 0; a group with a single valid reward has no spread and gets 0 too."""
    from trl.trainer.utils import nanstd

    rewards = rewards.float()
    mean = torch.nanmean(rewards, dim=-1, keepdim=True)
    centered = rewards - mean
    if scale == "group":
        centered = centered / (nanstd(rewards, dim=-1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (nanstd(rewards.flatten()) + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}; choose 'group', 'batch' or 'none'")
    valid = torch.isfinite(rewards).sum(-1, keepdim=True) > 1
    return torch.nan_to_num(torch.where(valid, centered, torch.zeros_like(centered)), nan=0.0)


def clipped_policy_loss(
    new_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_epsilon: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO clipped surrogate, to minimise. Log-probs are (B, K, 5): each field's decision is
    one "token" of the policy and gets its own clipped ratio (as GRPO clips per token); the
    advantage (B, K) is shared by the policy's five decisions, or (B, K, 5) is one per decision
    (``per_field_advantages``). Returns (loss, clip fraction)."""
    ratio = torch.exp(new_log_probs - old_log_probs.detach())
    adv = advantages.detach()
    adv = (adv if adv.dim() == ratio.dim() else adv.unsqueeze(-1)).to(ratio.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    clip_frac = ((ratio - 1.0).abs() > clip_epsilon).float().mean()
    return loss, clip_frac.detach()


def per_field_advantages(
    rewards: torch.Tensor,
    actions: torch.Tensor,
    eps: float = 1e-4,
    scale: str = "group",
    batch_std: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """(B, K, 5) advantages, one per policy and field, from (B, K) rewards and (B, K, 5) actions:
    field f of policy k is credited with ``r_k - b_kf``, where the baseline ``b_kf`` is the mean
    reward of the group's *other* policies that made the same choice as k on the four other
    fields (whatever they chose on f). A policy that differs from the group in field f alone is
    thus compared with the policies it equals elsewhere, so a field whose choice does not change
    the reward gets zero credit, while ``group_normalize`` shares one advantage over all five.

    The baseline depends on k's other decisions and on the other, independently sampled policies,
    never on k's decision on f: the action-dependent factorised baseline of Wu et al. (2018), so
    the policy gradient stays unbiased. A decision with no such comparison policy (or a NaN
    reward) gets 0, which reweights but does not bias the gradient. ``scale`` divides as in
    ``group_normalize``: by the group's reward std (``"group"``), by ``batch_std`` (``"batch"``;
    default: the std of the rewards given) or not at all (``"none"``)."""
    from trl.trainer.utils import nanstd

    rewards = rewards.float()
    b, k, nf = actions.shape
    if rewards.shape != (b, k):
        raise ValueError(f"rewards {tuple(rewards.shape)} and actions {tuple(actions.shape)} disagree on (B, K)")
    finite = torch.isfinite(rewards)
    r = torch.nan_to_num(rewards, nan=0.0)
    differ = actions[:, :, None, :] != actions[:, None, :, :]  # (B, K, K, 5): policy k vs policy j, per field
    # j agrees with k on every field but (possibly) f
    same_elsewhere = (differ.sum(-1, keepdim=True) - differ.long()) == 0
    others = ~torch.eye(k, dtype=torch.bool, device=actions.device)
    match = same_elsewhere & others[None, :, :, None] & finite[:, None, :, None]
    count = match.sum(2)  # (B, K, 5)
    baseline = (match * r[:, None, :, None]).sum(2) / count.clamp(min=1)
    adv = torch.where((count > 0) & finite[..., None], r[..., None] - baseline, torch.zeros_like(baseline))
    if scale == "group":
        adv = adv / (nanstd(rewards, dim=-1, keepdim=True)[..., None] + eps)
    elif scale == "batch":
        adv = adv / (batch_std if batch_std is not None else (nanstd(rewards.flatten()) + eps))
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r}; choose 'group', 'batch' or 'none'")
    return torch.nan_to_num(adv, nan=0.0)


def single_field_variants(sed_ids: torch.Tensor, fields: Sequence[int]) -> torch.Tensor:
    """(B, 1 + 2F, 5) label sets for the single-field credit: row 0 the annotated labels, then for
    each field index f in ``fields`` two rows that modify f alone, one to each adjacent value (the
    lower, then the higher; an end value has one neighbour, which fills both rows). Averaging the
    two rows' rewards is the expected reward of "modify f" under ``modify_labels(strategy="adjacent")``."""
    from ..models.sed_controller.modeling_sed_controller import FIELD_SIZES

    variants = sed_ids[:, None, :].repeat(1, 1 + 2 * len(fields), 1)
    for i, f in enumerate(fields):
        ids, top = sed_ids[:, f], FIELD_SIZES[f] - 1
        down = torch.where(ids > 0, ids - 1, ids + 1)
        up = torch.where(ids < top, ids + 1, ids - 1)
        variants[:, 1 + 2 * i, f] = down
        variants[:, 2 + 2 * i, f] = up
    return variants


def single_field_gains(rewards: torch.Tensor, num_fields: int) -> torch.Tensor:
    """(B, F) expected reward change of modifying each field alone, from the (B, 1 + 2F) rewards of
    ``single_field_variants``' rows; NaN where a reward is NaN (e.g. an empty emotion span)."""
    b, m = rewards.shape
    if m != 1 + 2 * num_fields:
        raise ValueError(f"{m} rewards per utterance do not match {num_fields} fields (expected {1 + 2 * num_fields})")
    rewards = rewards.float()
    return rewards[:, 1:].view(b, num_fields, 2).mean(-1) - rewards[:, :1]


def best_response_loss(
    logits: torch.Tensor,
    gains: torch.Tensor,
    fields: Sequence[int],
    modify_cost: float = 0.0,
    temperature: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy between the controller's modify probability of each field in ``fields`` and the
    entropy-regularised best response to the measured gains (B, F): the p maximising
    p (gain - cost) + temperature x H(p) is sigmoid((gain - cost) / temperature) (a step at
    gain = cost when temperature is 0). Fitting that target by cross-entropy is policy improvement
    with exactly measured action values; unlike ascending the expected reward sum_f p_f (gain_f -
    cost), whose gradient p (1 - p) (gain - cost) vanishes once p nears 0, it keeps learning where
    the policy has already collapsed to "retain". NaN gains (an empty emotion span) give no loss."""
    from ..models.sed_controller.modeling_sed_controller import MODIFY, RETAIN

    logits = logits.float()[:, list(fields)]
    margin = logits[..., MODIFY] - logits[..., RETAIN]  # log-odds of "modify"
    value = gains.detach().float() - modify_cost
    known = torch.isfinite(value)
    value = torch.nan_to_num(value, nan=0.0)
    if temperature > 0:
        target = torch.sigmoid(value / temperature)
    else:
        target = (value > 0).float() + 0.5 * (value == 0).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(margin, target, reduction="none")
    return (bce * known).sum() / known.sum().clamp(min=1)


# controller_fit="table": the share of utterances held out to stop the fit, and its patience (updates)
TABLE_HOLDOUT = 0.2
TABLE_PATIENCE = 100


def hold_out_gains(gains: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitted, held_out): copies of the (B, F) gains with a seeded ``TABLE_HOLDOUT`` share of the
    utterances hidden (NaN, so ``best_response_loss`` skips them) from the first and kept only in the second."""
    held = (torch.rand(len(gains), generator=generator) < TABLE_HOLDOUT).to(gains.device)[:, None]
    return gains.masked_fill(held, float("nan")), gains.masked_fill(~held, float("nan"))


def early_stopped_fit(
    module: torch.nn.Module,
    update: Callable[[], None],
    heldout_loss: Callable[[], float],
    max_updates: int,
    patience: int = TABLE_PATIENCE,
    progress: bool = False,
) -> tuple[int, float]:
    """Calls ``update()`` (one optimizer step of ``module``) up to ``max_updates`` times, measuring
    ``heldout_loss()`` before the first and after each; stops once ``patience`` updates have not
    lowered it and leaves ``module`` in its best state. Returns (updates to the best state, its
    held-out loss): how ``controller_fit="table"`` fits the controller to a fixed table of gains."""
    from tqdm.auto import trange

    best, best_at = heldout_loss(), 0
    best_state = copy.deepcopy(module.state_dict())
    for n in trange(1, max_updates + 1, desc="controller table: fit", disable=not progress):
        update()
        loss = heldout_loss()
        if loss < best - 1e-6:
            best, best_at, best_state = loss, n, copy.deepcopy(module.state_dict())
        elif n - best_at >= patience:
            break
    module.load_state_dict(best_state)
    return best_at, best


def bernoulli_kl(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """(B, 5) KL(policy || reference) of each field's retain/modify distribution; with the
    controller's initial (retain-heavy) policy as reference it is a penalty toward "retain"."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(reference_logits.detach().float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


__all__ = [
    "ADVANTAGES",
    "early_stopped_fit",
    "hold_out_gains",
    "TABLE_HOLDOUT",
    "TABLE_PATIENCE",
    "action_log_probs",
    "bernoulli_entropy",
    "bernoulli_kl",
    "clipped_policy_loss",
    "best_response_loss",
    "group_normalize",
    "per_field_advantages",
    "single_field_gains",
    "single_field_variants",
]
