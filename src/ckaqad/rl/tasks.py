"""The registered RL tasks (`--task`): each a `task.Task` with prompts, a verifiable reward and a held-out
split."""

from __future__ import annotations

from ckaqad.registry import Registry
from ckaqad.rl import arithmetic, code
from ckaqad.rl.task import Task

TASKS = Registry[Task]("RL task", flag="--task")
TASKS.register("arithmetic", arithmetic.TASK)
TASKS.register("code", code.TASK)
