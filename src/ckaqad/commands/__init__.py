"""The commands of `ckaqad COMMAND [flags]`, by name. Each module defines `HELP` (one line for `ckaqad --help`),
`Config` (a dataclass whose fields, nested ones flattened, are the command's flags) and `run(config)`.
`cli.py` reads only this registry."""

from __future__ import annotations

from types import ModuleType

from ckaqad.commands import compare, damage, demo, diagnose, distill, export, recover, rl, study, upcycle
from ckaqad.commands import eval as eval_
from ckaqad.commands import gsm_sem as gsm_sem_
from ckaqad.commands import plan as plan_
from ckaqad.registry import Registry

COMMANDS = Registry[ModuleType]("command")
COMMANDS.register("diagnose", diagnose)
COMMANDS.register("distill", distill)
COMMANDS.register("demo", demo)
COMMANDS.register("eval", eval_)
COMMANDS.register("compare", compare)
COMMANDS.register("export", export)
COMMANDS.register("rl", rl)
COMMANDS.register("damage", damage)
COMMANDS.register("recover", recover)
COMMANDS.register("study", study)
COMMANDS.register("plan", plan_)
COMMANDS.register("upcycle", upcycle)
COMMANDS.register("gsm-sem", gsm_sem_)
