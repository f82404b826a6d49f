"""The Bradley-Terry preference loss, and the per-sequence KL-regularised objective.

Both are the formulas of the explainer the product was conceived from:
  L_BT = -log sigma(r_w - r_l)           (reward gap 2.8 -> 0.059)
  J    = R(x, y) - beta * log(pi(y|x) / pi_ref(y|x))   (R 1.8, p 0.07 vs 0.03, beta 0.2 -> 1.63)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_w - r_l) over the batch; `logsigmoid` keeps large gaps stable."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs the reward model orders like the voter did (ties count as wrong)."""
    return (r_chosen > r_rejected).float().mean().item()


def kl_regularised_objective(
    reward: torch.Tensor, logp_policy: torch.Tensor, logp_ref: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-sequence J = R - beta * (log pi(y|x) - log pi_ref(y|x))."""
    return reward - beta * (logp_policy - logp_ref)
