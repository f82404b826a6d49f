"""Train and use the Bradley-Terry reward model (loss -log sigmoid(r_w - r_l)).

Training is TRL's `RewardTrainer` with a LoRA adapter on `AutoModelForSequenceClassification`
(num_labels=1) over the base checkpoint; the score head is trained in full (peft's SEQ_CLS task
saves it with the adapter). The pairs are decisive votes: ties and both-bad carry no preference
(see `storage.export`); with `reward.verdict_pairs` their replies join as pairs across prompts
(`alignment.verdicts`). Part of the pairs is held out, split by a hash of their content so the same
pair lands on the same side in every cycle, and the held-out accuracy is reported.

Ensemble: `RewardConfig.ensemble` members, each trained on its own bootstrap resample of the
training pairs (Coste et al. 2023), or with `bootstrap` off on all of them with its own seed.
They agree where the votes say something and disagree where the votes are silent, which is
exactly where PPO finds replies that fool one model. PPO optimises the conservative score
mean - penalty * std, and the gate counts a comparison only when every member agrees. Members
share one base model in memory (one LoRA adapter and score head each).

Input is TRL's conversational preference format; scoring uses the same chat template as training.

The package: `data` (the held-out split, each member's votes; no torch), `train` (the ensemble's
training and its `RewardResult`), `score` (`RewardScorer` and the head's pooling).
"""

from __future__ import annotations

from alignment.reward_model.data import split_heldout
from alignment.reward_model.score import RewardScorer, pool_scores
from alignment.reward_model.train import RewardResult, lora_targets, train_reward_model

__all__ = [
    "RewardResult",
    "RewardScorer",
    "lora_targets",
    "pool_scores",
    "split_heldout",
    "train_reward_model",
]
