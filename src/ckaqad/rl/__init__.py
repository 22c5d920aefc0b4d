"""RL post-training: GRPO and ABC-GRPO on tasks with verifiable rewards (`ckaqad rl`).

- `objectives`: the per-token objectives (`grpo_token_objective`, `abc_token_objective`), group-normalised
  advantages, clip and quadrant statistics.
- `task`, `arithmetic`, `code`, `tasks`: what a task is, the two shipped tasks, their registry.
- `rollout`: generation with transformers and the policy's per-token log-probabilities and entropies.
- `trainer`: the loop, on the project's checkpointer and metrics log.
- `plots`: a run's curves, and several runs' mean and spread.
"""

from ckaqad.rl.objectives import abc_token_objective, group_advantages, grpo_token_objective

__all__ = ["abc_token_objective", "grpo_token_objective", "group_advantages"]
