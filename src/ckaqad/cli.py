"""`ckaqad COMMAND [flags]`: the command line over `commands.COMMANDS`, parsed by tyro.

Each command's flags are the fields of its `Config` dataclass, nested dataclasses flattened
(`tyro.conf.OmitArgPrefixes`: `train.batch_size` is `--batch-size`); the help of a flag is the docstring under
its field, followed by the default. `--config FILE` reads a YAML mapping of the same options, flat
(`seq-len: 64`) or in sections named after the nested fields (`kl: {temperature: 2}`). The YAML values become
flag tokens placed before the command line's own flags, so tyro converts both the same way and the later
flags win. `--resume DIR` (distill) puts the run's saved `config.yaml` under both; the command itself checks
which fields may change on resume.

This is the one place that catches `CkaqadError`: it prints `ckaqad: error: ...` on one line and returns 2,
as it does for a command line tyro rejects (after a lost peer of a torchrun job it ends the process with code 2
at once: `parallel.dist.exit_without_teardown`). Ctrl-C returns 130; any other exception keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path

import tyro
import yaml

from ckaqad import __version__
from ckaqad.commands import COMMANDS
from ckaqad.errors import CkaqadError, ConfigError, LostPeerError
from ckaqad.parallel.dist import exit_without_teardown, group_is_joined
from ckaqad.paths import RunDir
from ckaqad.registry import close_matches

DESCRIPTION = "NVFP4 students, layerwise CKA diagnosis and CKA-QAD"
# Flat flags (`--batch-size`, not `--train.batch-size`); a field without a default (compare's `dirs`) is positional.
MARKERS = (tyro.conf.OmitArgPrefixes, tyro.conf.PositionalRequiredArgs, tyro.conf.PositionalMetavarFromFieldName)
CONFIG_FLAG = "--config"

# ------------------------------------------------------------------------------------- the fields of a Config


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One option of a command: a leaf field of its (nested) Config."""

    name: str
    hint: typing.Any  # the resolved annotation, tyro's Annotated markers kept
    field: dataclasses.Field
    positional: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _unannotated(hint) -> tuple[typing.Any, tuple]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *markers = typing.get_args(hint)
        return base, tuple(markers)
    return hint, ()


@functools.cache
def layout(cls: type) -> tuple[dict[str, Leaf], dict[str, type]]:
    """({field name: Leaf} of every leaf at any depth, {field name: dataclass} of every nested section).

    With OmitArgPrefixes a leaf's flag is its own name wherever it is nested, so no two leaves may share one.
    """
    leaves: dict[str, Leaf] = {}
    sections: dict[str, type] = {}

    def add(leaf: Leaf) -> None:
        if leaf.name in leaves:
            raise TypeError(f"{cls.__qualname__}: two nested fields share the flag {leaf.flag}")
        leaves[leaf.name] = leaf

    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        base, markers = _unannotated(hints[f.name])
        if dataclasses.is_dataclass(base):
            sections.setdefault(f.name, base)
            inner_leaves, inner_sections = layout(base)
            for leaf in inner_leaves.values():
                add(leaf)
            for name, section in inner_sections.items():
                sections.setdefault(name, section)
        else:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            add(Leaf(f.name, hints[f.name], f, required or any(m is tyro.conf.Positional for m in markers)))
    return leaves, sections


def _shape(hint) -> tuple[str, bool]:
    """('bool' | 'sequence' | 'scalar', whether None is allowed) of a field annotation."""
    base, _ = _unannotated(hint)
    optional = False
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        args = typing.get_args(base)
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        base = rest[0] if len(rest) == 1 else base
    if base is bool:
        return ("scalar" if optional else "bool"), optional  # `bool | None` is spelled --x True|False|None
    if typing.get_origin(base) in (tuple, list, set, frozenset) or base in (tuple, list, set, frozenset):
        return "sequence", optional
    return "scalar", optional


def _type_name(hint) -> str:
    base, _ = _unannotated(hint)
    return base.__name__ if isinstance(base, type) else str(base).replace("typing.", "")


# ---------------------------------------------------------------------------------------- YAML -> flag tokens


def _read_yaml(path: Path, where: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must hold a mapping of option: value")
    return data


def _flat_values(data: dict, cls: type, where: str) -> dict[str, typing.Any]:
    """{field name: YAML value}: keys spelled as fields or flags (`seq_len`, `seq-len`), flat or in sections."""
    values: dict[str, typing.Any] = {}
    unknown: list[str] = []

    def walk(mapping: dict, node: type, prefix: str) -> None:
        leaves, sections = layout(node)
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if isinstance(value, dict) and name in sections:
                walk(value, sections[name], f"{prefix}{key}.")
            elif name in leaves:
                if leaves[name].positional:
                    raise ConfigError(f"{where}: {name} is a positional argument; give it on the command line")
                if name in values:
                    raise ConfigError(f"{where}: {name} is given twice")
                values[name] = value
            else:
                unknown.append(f"{prefix}{key}")

    walk(data, cls, "")
    if unknown:
        hint = close_matches(unknown[0].rpartition(".")[2].replace("-", "_"), layout(cls)[0]) \
            if len(unknown) == 1 else ""
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}{hint}")
    return values


def _leaf_tokens(leaf: Leaf, value, where: str) -> list[str]:
    """The flag tokens that say `leaf: value`. Only the shape is checked here (a bool is a bool, a list goes to a
    sequence field, None to an optional one); tyro converts the values, as it does the command line's."""
    kind, optional = _shape(leaf.hint)
    nested = list | tuple | dict
    items = list(value) if isinstance(value, list | tuple) else [value]
    if (value is None and not optional) or (kind == "bool" and not isinstance(value, bool | None)) \
            or (kind == "sequence" and any(isinstance(v, nested) or v is None for v in items)) \
            or (kind == "scalar" and isinstance(value, nested)):
        raise ConfigError(f"{where}: {leaf.name} must be {_type_name(leaf.hint)}, got {value!r}")
    if value is None:
        return [f"{leaf.flag}=None"]
    if kind == "bool":
        return [leaf.flag if value else "--no-" + leaf.flag[2:]]
    if kind == "sequence":
        return [leaf.flag, *map(str, items)]
    return [f"{leaf.flag}={value}"]  # `=`: a value that starts with "-" stays a value


def file_tokens(path: Path, cls: type, where: str, prog: str) -> list[str]:
    """The flag tokens of a YAML options file, checked: an unknown key or a value that does not convert to its
    field's type is a ConfigError naming `where`."""
    values = _flat_values(_read_yaml(path, where), cls, where)
    leaves = layout(cls)[0]
    tokens = [token for name, value in values.items() for token in _leaf_tokens(leaves[name], value, where)]
    # tyro converts them alone first, into a flat dataclass of just these fields (their types and defaults,
    # without the commands' checks), so that a bad value is reported against the file, not the command line.
    # Every field here has a default: a field without one is positional, and positionals are not read from YAML.
    fields = [(name, leaves[name].hint, dataclasses.field(default=leaves[name].field.default,
                                                          default_factory=leaves[name].field.default_factory))
              for name in values]
    try:
        _tyro(dataclasses.make_dataclass("Options", fields), tokens, prog)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return tokens


def _pop_config(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """(argv without `--config FILE`, FILE or None)."""
    rest: list[str] = []
    found: str | None = None
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
            break
        if arg == CONFIG_FLAG or arg.startswith(CONFIG_FLAG + "="):
            if found is not None:
                raise ConfigError(f"{CONFIG_FLAG} is given twice")
            found = arg.partition("=")[2] if "=" in arg else next(args, None)
            if not found:
                raise ConfigError(f"{CONFIG_FLAG} needs a YAML file")
            continue
        rest.append(arg)
    return rest, found


def _with_base(argv: list[str], base: list[str]) -> list[str]:
    """`base` tokens before the command line's flags, so those win; after its leading positional arguments, so
    a sequence flag at the end of `base` does not take them as its values."""
    first_flag = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    return [*argv[:first_flag], *base, *argv[first_flag:]]


# ------------------------------------------------------------------------------------------- tyro, one line


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RULE = set("─-╰╯ ")


def usage_message(text: str) -> str:
    """tyro's error box (utf-8 or ascii drawing) reduced to its message on one line: the box's first section,
    plus the first flag of a "Perhaps you meant" section."""
    title: str | None = None
    sections: list[list[str]] = [[]]
    for raw in _ANSI.sub("", text).splitlines():
        line = raw.strip()
        if line.startswith("╭"):
            title = line.strip("╭╮─ ")
            continue
        line = line.strip("│").strip()
        if not line:
            continue
        if set(line) <= _RULE:
            sections.append([])
        elif title is None:
            title = line
        else:
            sections[-1].append(line)
    sections = [s for s in sections if s]
    if not sections:
        return title or "the command line is not valid (see --help)"
    message = re.sub(r"^Error parsing (\S+):", r"argument \1:", " ".join(sections[0]))
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]  # "Unrecognized options: ..." reads on as "error: unrecognized"
    if len(sections) > 1 and sections[1][0].startswith("Perhaps you meant"):
        near = [line.split()[0] for line in sections[1][1:] if line.startswith("-")]
        message += f" (did you mean: {near[0]}?)" if near else ""
    return message


@contextlib.contextmanager
def _wide_terminal(wide: bool) -> Iterator[None]:
    """tyro wraps an error box to the terminal's width; a wide terminal keeps each message on one line."""
    if not wide:
        yield
        return
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100000"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def _tyro(cls: type, args: list[str], prog: str, description: str | None = None):
    """tyro.cli, with a rejected command line as a ConfigError holding tyro's message. `--help` goes to
    stdout as SystemExit(0), which passes through."""
    asks_help = any(arg in ("-h", "--help") for arg in args[: args.index("--") if "--" in args else len(args)])
    captured = io.StringIO()
    rejected = False
    try:
        with contextlib.redirect_stderr(captured), _wide_terminal(not asks_help):
            return tyro.cli(cls, args=args, prog=prog, description=description, config=MARKERS)
    except SystemExit as exc:
        if not exc.code:
            raise
        rejected = True
        raise ConfigError(usage_message(captured.getvalue())) from None
    finally:
        if not rejected:
            sys.stderr.write(captured.getvalue())  # warnings and anything else, as they were


# ----------------------------------------------------------------------------------------------- commands


def describe(module) -> str:
    return (f"{module.HELP}\n{CONFIG_FLAG} FILE: a YAML mapping of any of these options, flat (seq-len: 64) or "
            "in sections (kl: {temperature: 2}); the flags given here win.")


def parse(name: str, argv: Sequence[str]):
    """The Config of command `name` from its flags over `--config FILE` over, when the config has `resume`
    set, the run's saved config.yaml. Nothing runs; tyro's `--help` raises SystemExit(0)."""
    module = COMMANDS.get(name)
    cls, prog = module.Config, f"ckaqad {name}"
    args, config_file = _pop_config(argv)
    base = file_tokens(Path(config_file).expanduser(), cls, f"{CONFIG_FLAG} {config_file}", prog) \
        if config_file else []
    config = _tyro(cls, _with_base(args, base), prog, describe(module))
    resume = getattr(config, "resume", None)
    if resume:
        saved = RunDir(Path(resume).expanduser()).config
        if saved.is_file():  # otherwise the command reports that DIR is not a run
            run_base = file_tokens(saved, cls, f"--resume {resume}: {saved}", prog)
            config = _tyro(cls, _with_base(args, run_base + base), prog, describe(module))
    return config


def usage() -> str:
    width = max(map(len, COMMANDS.names()))
    return "\n".join([
        "usage: ckaqad [-h] [--version] COMMAND [flags]", "", DESCRIPTION, "", "commands:",
        *(f"  {name:<{width}}  {module.HELP}" for name, module in COMMANDS.items()), "",
        f"`ckaqad COMMAND --help` lists a command's flags; `{CONFIG_FLAG} FILE` (YAML) supplies any of them and the "
        "flags given on the command line win."])


def _main(argv: list[str]) -> int:
    if not argv:
        raise ConfigError(f"missing command; choose from: {', '.join(COMMANDS.names())} (see ckaqad --help)")
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"ckaqad {__version__}")
        return 0
    if argv[0].startswith("-"):
        raise ConfigError(f"unknown option {argv[0]}; usage: ckaqad COMMAND [flags] (see ckaqad --help)")
    module = COMMANDS.get(argv[0])
    try:
        config = parse(argv[0], argv[1:])
    except SystemExit as exc:  # tyro printed the command's --help
        return exc.code if isinstance(exc.code, int) else 0
    module.run(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except CkaqadError as exc:
        message = " ".join(str(exc).split())  # one line, even when it quotes a multi-line library error
        print(f"ckaqad: error: {message}", file=sys.stderr)
        if isinstance(exc, LostPeerError) and group_is_joined():
            exit_without_teardown(2)  # a backend thread may still wait on the lost peer: no clean exit exists
        return 2
    except KeyboardInterrupt:
        print("ckaqad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
