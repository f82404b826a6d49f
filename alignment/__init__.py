"""Turning votes into weights: reward model, PPO with KL on LoRA, merge, and the loop.

So far: the pure math (`losses`, `ppo_math`, `kl_controller`), tested against hand-computed values.
"""
