"""Turning votes into weights: reward-model ensemble, PPO with KL on LoRA, the gate, merge, and
the app-side loop that runs a cycle in a worker process and hot-swaps the result.

Pure pieces (`losses`, `ppo_math`, `kl_controller`, `stats`, `config`) are small functions and
dataclasses tested against hand-computed values; the stages (`reward_model`, `ppo`, `gate`,
`merge`, `cycle`, `sft`) import torch, transformers, peft and TRL only where they run. Around
them: Constitutional AI (`constitution`, `critic`, `labels`), the users' verdict on a new version
(`canary`, `ratings`, `monitors`), the hand-off to the worker process (`job`, `worker`), and which
version serves (`serving`, `pruning`). `docs/architecture.md` has the full map.
"""
