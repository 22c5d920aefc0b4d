"""`ckaqad` command line. Flags mirror the config dataclasses field for field (help = the field docstring);
`--config run.yaml` supplies any of them, flags given on the command line win.

This is the one place that catches `CkaqadError`: it prints `ckaqad: error: …` and exits with code 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path

from ckaqad.errors import CkaqadError, ConfigError

# ------------------------------------------------------------------------ dataclass <-> argparse mapping


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(annotation) -> tuple[Callable, bool]:
    """(parser, is_bool) for a field annotation such as `int`, `str | None`, `tuple[str, ...]`."""
    text = str(annotation)
    if "bool" in text:
        return (lambda v: v), True
    if "tuple" in text:
        return (lambda v: tuple(p.strip() for p in v.split(",") if p.strip())), False
    if "int" in text and "str" not in text:
        return int, False
    if "float" in text and "str" not in text:
        return float, False
    return str, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        parse, is_bool = _arg_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        if is_bool:
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag(f.name), dest=f.name, type=parse, default=argparse.SUPPRESS, help=help_text)


def build_config(cls: type, values: dict, skip: tuple[str, ...] = ()):
    names = {f.name for f in dataclasses.fields(cls)} - set(skip)
    return cls(**{k: v for k, v in values.items() if k in names})


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config file does not exist: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def yaml_value(name: str, value, annotation, yaml_path: str):
    """A --config value converted as its flag's argument would be (YAML reads `1e-5` as a string); ConfigError
    naming the option when it does not fit the field's type."""
    parse, is_bool = _arg_type(annotation)
    text = str(annotation)
    if value is None and "None" in text:
        return None
    if is_bool:
        if isinstance(value, bool):
            return value
    elif "tuple" in text and isinstance(value, list):
        return tuple(str(v) for v in value)
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            return parse(str(value))
        except ValueError:
            pass
    kind = getattr(annotation, "__name__", text)
    raise ConfigError(f"--config {yaml_path}: {name} must be {kind}, got {value!r}")


def merged_values(args: argparse.Namespace, classes: list[type]) -> dict:
    """YAML values overridden by explicit flags; unknown YAML keys are an error."""
    values = dict(vars(args))
    yaml_path = values.pop("config", None)
    values.pop("command", None)
    values.pop("handler", None)
    if yaml_path:
        from_yaml = load_yaml(yaml_path)
        known = {f.name for cls in classes for f in dataclasses.fields(cls)}
        unknown = sorted(set(from_yaml) - known)
        if unknown:
            raise ConfigError(f"--config {yaml_path}: unknown option(s) {', '.join(unknown)}")
        hints = {name: hint for cls in classes for name, hint in typing.get_type_hints(cls).items()}
        for key, value in from_yaml.items():
            values.setdefault(key, yaml_value(key, value, hints[key], yaml_path))
    return values


# ---------------------------------------------------------------------------------------- subcommands


def _diagnose(values: dict) -> int:
    from ckaqad.data import DataConfig
    from ckaqad.diagnose import DiagnoseConfig, run_diagnose
    from ckaqad.quantize import QuantConfig

    config = build_config(DiagnoseConfig, values)
    data = build_config(DataConfig, values)
    quant = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(QuantConfig)}
             and k not in ("format", "scheme")}
    QuantConfig(**quant)  # validate before any work
    run_diagnose(config, data, quant)
    return 0


def _distill(values: dict) -> int:
    from ckaqad.checkpoint import CheckpointConfig
    from ckaqad.data import DataConfig
    from ckaqad.distill import DistillConfig, run_distill
    from ckaqad.losses import LossConfig
    from ckaqad.quantize import QuantConfig

    configs = [build_config(cls, values) for cls in (DistillConfig, LossConfig, QuantConfig, DataConfig,
                                                      CheckpointConfig)]
    run_distill(*configs)
    return 0


def _demo(values: dict) -> int:
    from ckaqad.demo import DemoConfig, run_demo

    run_demo(build_config(DemoConfig, values))
    return 0


def _commands() -> dict[str, tuple[str, list[tuple[type, tuple[str, ...]]], Callable[[dict], int]]]:
    """Every subcommand: (help, [(config dataclass, fields not exposed)], handler). The one registry of names."""
    from ckaqad.checkpoint import CheckpointConfig
    from ckaqad.data import DataConfig
    from ckaqad.demo import DemoConfig
    from ckaqad.diagnose import DiagnoseConfig
    from ckaqad.distill import DistillConfig
    from ckaqad.losses import LossConfig
    from ckaqad.quantize import QuantConfig

    return {
        "diagnose": ("layerwise CKA, KL and perplexity of NVFP4 (or other) students against the teacher",
                     [(DiagnoseConfig, ()), (QuantConfig, ("format", "scheme")), (DataConfig, ())], _diagnose),
        "distill": ("quantization-aware distillation of the student: KL-only QAD or CKA-QAD",
                    [(DistillConfig, ()), (LossConfig, ()), (QuantConfig, ()), (DataConfig, ()),
                     (CheckpointConfig, ())], _distill),
        "demo": ("embedded model -> PTQ -> KL-QAD and CKA-QAD -> diagnosis -> report.md/report.html",
                 [(DemoConfig, ())], _demo),
        **_export_eval_commands(),
    }


def _export_eval_commands() -> dict:
    from ckaqad import evaluate, export

    return {**export.cli_commands(), **evaluate.cli_commands()}


def build_parser() -> argparse.ArgumentParser:
    from ckaqad import __version__

    parser = argparse.ArgumentParser(prog="ckaqad", description="NVFP4 students, CKA diagnosis and CKA-QAD")
    parser.add_argument("--version", action="version", version=f"ckaqad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, classes, handler, *positional) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for arg in positional:
            p.add_argument(arg, nargs="+", help="result directories")
        p.add_argument("--config", default=None, help="YAML file with any of the options below (flags win)")
        for cls, skip in classes:
            add_dataclass_args(p, cls, skip)
        p.set_defaults(handler=handler, classes=[c for c, _ in classes])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler, classes = args.handler, args.classes
    del args.classes
    try:
        return handler(merged_values(args, classes))
    except CkaqadError as exc:
        message = " ".join(str(exc).split())  # one line, even when it quotes a multi-line library error
        print(f"ckaqad: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ckaqad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
