"""tests for ckaqad/cli.py: flags mirror the commands' Config dataclasses (nested fields flattened), `--config`
YAML, `--resume` over the run's saved config, the documented command lines, and one-line errors (exit 2)."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shlex
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from ckaqad import __version__, cli
from ckaqad.commands import COMMANDS
from ckaqad.errors import ConfigError, LostPeerError, ModelError
from ckaqad.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
# The spec: every command of `ckaqad`, in the order `ckaqad --help` lists them.
COMMAND_NAMES = ["diagnose", "distill", "demo", "eval", "compare", "export", "rl", "damage", "recover", "study", "plan",
                 "upcycle", "gsm-sem"]
# Flags each command's Config needs before it validates (exactly one export source, at least one compare dir).
REQUIRED = {"export": ["--ptq"], "compare": ["somewhere"], "damage": ["--kind", "magnitude"],
            "recover": ["--student", "somewhere"], "study": ["study.yaml"],
            "gsm-sem": ["generate"]}

FIELD_DOC = re.compile(r'^    (\w+): [^\n]*\n    """([^\n]*)"""$', re.M)


def documented_fields(cls: type) -> dict[str, str]:
    """{field: docstring} read from the class source, independently of tyro's docstring reader."""
    return dict(FIELD_DOC.findall(inspect.getsource(cls)))


def leaf_fields(cls: type) -> list[tuple[type, dataclasses.Field]]:
    """(owning dataclass, field) of every leaf field, nested dataclasses flattened in order."""
    out = []
    for f in dataclasses.fields(cls):
        default = default_of(f)
        if dataclasses.is_dataclass(default):
            out += leaf_fields(type(default))
        else:
            out.append((cls, f))
    return out


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_text(capsys, monkeypatch, argv: list[str]) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # one column of boxes, as in a usual terminal
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def help_entries(text: str) -> dict[str, str]:
    """{first flag, or positional name: help} from tyro's --help boxes (utf-8 `│ ... │` or ascii `  ...` lines),
    wrapped help lines joined."""
    entries: dict[str, str] = {}
    current = None
    for raw in text.splitlines():
        match = re.match(r"│ (.*?)\s*│$", raw) or re.match(r"  (.*?)\s*$", raw)
        if not match or not match.group(1):
            current = None
            continue
        inner = match.group(1)
        if not inner.startswith(" "):
            invocation, *rest = re.split(r"\s{2,}", inner, maxsplit=1)
            first = invocation.split()[0]
            if not re.fullmatch(r"--?[A-Za-z][\w-]*,?|\[?[A-Z][A-Z_]*\]?", first):  # a group's description or a rule
                current = None
                continue
            current = first.rstrip(",").strip("[]").lower()
            entries[current] = " ".join(rest).strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {inner.strip()}".strip()
    entries.pop("-h", None)
    return entries


def tyro_default_text(value) -> str:
    """How tyro prints a default in `(default: ...)`."""
    if isinstance(value, tuple):
        return " ".join(shlex.quote(str(v)) for v in value)
    return shlex.quote(value) if isinstance(value, str) else str(value)


def cli_error(capsys, argv: list[str]) -> str:
    """Run `ckaqad argv`; assert exit code 2 with exactly one `ckaqad: error:` line and no traceback."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "╭" not in err
    assert [line for line in err.splitlines() if line.startswith("ckaqad")] == err.splitlines()[-1:], err
    last = err.splitlines()[-1]  # the message is the last line: nothing of it spills onto further lines
    assert last.startswith("ckaqad: error: "), err
    return last


def record_runs(monkeypatch, name: str) -> list:
    """Replace command `name`'s run with one that records its config; the list of configs it was given."""
    seen: list = []
    monkeypatch.setattr(COMMANDS.get(name), "run", seen.append)
    return seen


def nothing_written(parent: Path, keep: set[str]) -> None:
    """No output and no temp directory (`.NAME.tmp-*`) appeared in `parent` beyond `keep`."""
    assert {p.name for p in parent.iterdir()} == keep


@pytest.fixture(autouse=True)
def _isolated(tmp_path, tmp_path_factory, monkeypatch):
    """Default --out paths (runs/...) land in tmp_path, where nothing_written sees them; caches stay private."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CKAQAD_CACHE", str(tmp_path_factory.getbasetemp() / "ckaqad-cache"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import make_tiny_model, make_tiny_tokenizer

    path = tmp_path_factory.mktemp("teacher")
    make_tiny_model().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- flags = fields


def test_registry_is_the_spec():
    assert COMMANDS.names() == COMMAND_NAMES
    for name, module in COMMANDS.items():
        assert module.__name__ == f"ckaqad.commands.{name.replace('-', '_')}"
        assert isinstance(module.HELP, str) and module.HELP and "\n" not in module.HELP
        assert dataclasses.is_dataclass(module.Config) and callable(module.run)


def test_top_level_help_lists_every_command_and_version(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, module in COMMANDS.items():
        assert re.search(rf"^  {name} +{re.escape(module.HELP)}$", out, re.M), name
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ckaqad {__version__}"


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_command_help_exits_0_on_stdout(capsys, monkeypatch, command):
    out = help_text(capsys, monkeypatch, [command, "--help"])
    assert out.startswith(f"usage: ckaqad {command} ")
    assert COMMANDS.get(command).HELP in out and "--config FILE" in out


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_flags_equal_the_dataclass_fields(capsys, monkeypatch, command):
    leaves = [f for _, f in leaf_fields(COMMANDS.get(command).Config)]
    names = [f.name for f in leaves]
    assert len(names) == len(set(names)), f"two nested dataclasses of {command} share a field"
    entries = help_entries(help_text(capsys, monkeypatch, [command, "--help"]))
    expected = {flag(f.name) if default_of(f) is not dataclasses.MISSING else f.name for f in leaves}
    assert set(entries) == expected


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_help_is_the_field_docstring_and_default(capsys, monkeypatch, command):
    entries = help_entries(help_text(capsys, monkeypatch, [command, "--help"]))
    # The command's own defaults: a nested config may be built with other values than its class defaults.
    base = REQUIRED.get(command, [])
    defaults = cli.parse(command, base)
    for cls, f in leaf_fields(COMMANDS.get(command).Config):
        doc = documented_fields(cls).get(f.name)
        assert doc, f"{cls.__name__}.{f.name} has no docstring"
        required = default_of(f) is dataclasses.MISSING
        key = f.name if required else flag(f.name)
        default = default_of(f) if required or key in base else get_leaf(defaults, f.name)
        # tyro marks a required positional "(required)" or, for a variadic one, shows an empty default
        shown = ["(required)", "(default: )"] if required else [f"(default: {tyro_default_text(default)})"]
        # tyro wraps help at spaces and after commas: compare without the whitespace
        assert re.sub(r"\s", "", entries[key]) in {re.sub(r"\s", "", f"{doc} {s}") for s in shown}, key


def get_leaf(config, name: str):
    """The value of leaf field `name` anywhere in a nested config."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == name and not dataclasses.is_dataclass(value):
            return value
        if dataclasses.is_dataclass(value):
            try:
                return get_leaf(value, name)
            except KeyError:
                pass
    raise KeyError(name)


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_each_flag_parses_its_default_back_to_the_field_type(command):
    base = REQUIRED.get(command, [])
    for _, f in leaf_fields(COMMANDS.get(command).Config):
        default, option = default_of(f), flag(f.name)
        if default is dataclasses.MISSING or option in base:
            continue
        if isinstance(default, bool):
            assert get_leaf(cli.parse(command, [*base, option]), f.name) is True
            assert get_leaf(cli.parse(command, [*base, "--no-" + option[2:]]), f.name) is False
            continue
        if default is None:
            assert get_leaf(cli.parse(command, [*base, option, "None"]), f.name) is None
            continue
        tokens = [option, *map(str, default)] if isinstance(default, tuple) else [option, str(default)]
        value = get_leaf(cli.parse(command, [*base, *tokens]), f.name)
        assert value == default and type(value) is type(default), (option, value)


def test_optional_int_flag_parses_an_int():
    assert cli.parse("eval", ["--limit", "3"]).limit == 3
    assert cli.parse("eval", []).limit is None  # not given: the dataclass default applies


def test_flags_not_given_leave_the_dataclass_defaults(monkeypatch):
    seen = record_runs(monkeypatch, "distill")
    assert cli.main(["distill"]) == 0
    assert seen == [COMMANDS.get("distill").Config()]


def test_nested_fields_take_flat_flags_and_sequences_take_several_values():
    config = cli.parse("distill", ["--batch-size", "2", "--temperature", "2", "--cka-alpha", "0.5",
                                   "--exclude", "lm_head", "*.mlp.*", "--no-progress", "--seq-len", "64"])
    assert config.train.batch_size == 2 and config.train.progress is False
    assert config.objective.kl.temperature == 2.0 and config.objective.cka.cka_alpha == 0.5
    assert config.quant.exclude == ("lm_head", "*.mlp.*") and config.data.seq_len == 64
    assert cli.parse("distill", ["--batch_size=3"]).train.batch_size == 3  # tyro's spellings, as argparse's


def test_positional_arguments_and_flags_in_any_order():
    compare = COMMANDS.get("compare").Config
    assert cli.parse("compare", ["a", "b", "--out", "x"]) == compare(dirs=("a", "b"), out="x")
    assert cli.parse("compare", ["--out", "x", "a", "b"]) == compare(dirs=("a", "b"), out="x")


# ------------------------------------------------------------------------------------------- --config


def test_config_values_are_used_and_flags_win(tmp_path, monkeypatch):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 7\n"
                         "lr: 1e-4\n"            # YAML 1.1 reads this as a string; tyro makes it a float
                         "seq-len: 64\n"         # flag spelling works too
                         "exclude: [lm_head, '*.mlp.*']\n"
                         "loss: kl\n"
                         "progress: false\n"
                         "teacher: from-yaml\n"
                         "save_every: 3\n"
                         "kl: {temperature: 2}\n"          # a section named after a nested field
                         "objective: {cka: {cka_alpha: 0.5}}\n"
                         "layers: 0,4\n"
                         "device: null\n")
    seen = record_runs(monkeypatch, "distill")
    assert cli.main(["distill", "--config", str(yaml_file), "--steps", "9", "--progress",
                     "--teacher", "from-flag"]) == 0
    (config,) = seen
    assert config.train.steps == 9 and config.train.progress is True and config.teacher == "from-flag"  # flags win
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.data.seq_len == 64 and config.quant.exclude == ("lm_head", "*.mlp.*")
    assert config.objective.loss == "kl" and config.objective.kl.temperature == 2.0
    assert config.objective.cka.cka_alpha == 0.5 and config.checkpoint.save_every == 3
    assert config.layers == "0,4" and config.device is None
    assert config.train.batch_size == COMMANDS.get("distill").Config().train.batch_size  # neither: the default
    assert cli.parse("distill", ["--config", str(yaml_file), "--exclude", "x"]).quant.exclude == ("x",)
    assert cli.parse("distill", [f"--config={yaml_file}"]).train.steps == 7


def test_config_for_eval_and_compare(tmp_path, monkeypatch):
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("suite: fidelity\nlimit: 2\nout: from-yaml\n")
    seen = record_runs(monkeypatch, "eval")
    assert cli.main(["eval", "--config", str(yaml_file), "--out", "from-flag"]) == 0
    assert seen == [COMMANDS.get("eval").Config(suite="fidelity", limit=2, out="from-flag")]
    (tmp_path / "compare.yaml").write_text("out: cmp\n")
    seen = record_runs(monkeypatch, "compare")
    assert cli.main(["compare", "a", "b", "--config", str(tmp_path / "compare.yaml")]) == 0
    assert seen == [COMMANDS.get("compare").Config(dirs=("a", "b"), out="cmp")]


@pytest.mark.parametrize("text, message", [
    ("stepz: 3\n", "unknown option(s) stepz (did you mean: steps"),
    ("steps: [\n", "not valid YAML"),
    ("- steps\n- 3\n", "must hold a mapping"),
    ("steps: ten\n", "argument --steps: invalid literal for int() with base 10: 'ten'"),
    ("steps: 2.5\n", "argument --steps"),
    ("lr: [1]\n", "lr must be float, got [1]"),
    ("progress: maybe\n", "progress must be bool, got 'maybe'"),
    ("steps: null\n", "steps must be int, got None"),
    ("teacher: null\n", "teacher must be str, got None"),
    ("exclude: [[a]]\n", "exclude must be tuple[str, ...]"),
    ("1: 2\n", "unknown option(s) 1"),
    ("kl: {stepz: 1}\n", "unknown option(s) kl.stepz"),
    ("kl: {temperature: hot}\n", "argument --temperature"),
    ("steps: 3\ntrain: {steps: 4}\n", "steps is given twice"),
])
def test_bad_config_file_is_exit_2(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.setattr(COMMANDS.get("distill"), "run", lambda config: pytest.fail("ran despite a bad --config"))
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(text)
    line = cli_error(capsys, ["distill", "--config", str(yaml_file)])
    assert line.startswith(f"ckaqad: error: --config {yaml_file}: ") and message in line


def test_config_file_cannot_give_positional_arguments(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("dirs: [a]\n")
    assert "dirs is a positional argument" in cli_error(capsys, ["compare", "x", "--config", str(tmp_path / "c.yaml")])


def test_missing_config_file_is_exit_2(tmp_path, capsys):
    line = cli_error(capsys, ["distill", "--config", str(tmp_path / "no.yaml")])
    assert line == f"ckaqad: error: --config {tmp_path / 'no.yaml'}: no such file"
    assert "--config needs a YAML file" in cli_error(capsys, ["distill", "--config"])


# ------------------------------------------------------------------------------------------- --resume


def saved_run(tmp_path: Path, **changes) -> tuple[Path, dict]:
    """A run directory holding the config.yaml distill writes for a run started with non-default flags."""
    distill = COMMANDS.get("distill")
    config = cli.parse("distill", ["--teacher", "t0", "--steps", "7", "--lr", "3e-5", "--loss", "kl",
                                   "--exclude", "lm_head", "--seq-len", "64", "--no-progress"])
    run = tmp_path / "run"
    run.mkdir()
    saved = {**distill.flat_fields(config), **changes}
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=True))
    return run, saved


def test_resume_takes_the_runs_saved_config_as_base(tmp_path, monkeypatch):
    distill = COMMANDS.get("distill")
    run, saved = saved_run(tmp_path)
    seen = record_runs(monkeypatch, "distill")
    assert cli.main(["distill", "--resume", str(run)]) == 0
    assert distill.flat_fields(seen[-1]) == {**saved, "resume": str(run)}
    assert cli.main(["distill", "--resume", str(run), "--steps", "9", "--progress"]) == 0
    assert distill.flat_fields(seen[-1]) == {**saved, "resume": str(run), "steps": 9, "progress": True}
    assert {"steps", "progress", "resume"} <= distill.RESUME_MAY_CHANGE


def test_resume_rejects_a_changed_field_that_may_not_change(tmp_path, capsys):
    run, _ = saved_run(tmp_path)
    line = cli_error(capsys, ["distill", "--resume", str(run), "--lr", "1e-4", "--loss", "kl+cka"])
    assert line.startswith(f"ckaqad: error: --resume {run}: the config differs from the run's")
    assert "lr: 3e-05 -> 0.0001" in line and "loss: 'kl' -> 'kl+cka'" in line
    # Fields that may change pass the config check; this run then has no checkpoint to continue from.
    line = cli_error(capsys, ["distill", "--resume", str(run), "--steps", "9", "--device", "cpu"])
    assert "the run has no complete checkpoint" in line
    nothing_written(run, {"config.yaml"})


def test_resume_with_a_bad_saved_config(tmp_path, capsys):
    run, _ = saved_run(tmp_path, stepz=3)
    line = cli_error(capsys, ["distill", "--resume", str(run)])
    assert line.startswith(f"ckaqad: error: --resume {run}: {run / 'config.yaml'}: unknown option(s) stepz")


# ----------------------------------------------------------------------------- documented command lines

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Documented lines that are templates, not command lines: left out of test_documented_command_line_parses.
NOT_COMMAND_LINES = {
    "ckaqad COMMAND --help": "COMMAND stands for any command",
    "ckaqad eval --model default|HF dir|.gguf|run|student|export": "lists the kinds of --model",
    "ckaqad compare DIR...": "DIR... stands for result directories",
    "ckaqad study": "names the command (its YAML file is required)",
}


def documented_command_lines() -> list[tuple[str, str]]:
    """(file:line, command line) of every `ckaqad ...` in a code block or in backticks, shell comments cut."""
    found = []
    for path in DOCS:
        in_block, continued = False, ""
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            if in_block and continued:
                line = continued + " " + line.lstrip()
            continued = line[:-1].rstrip() if in_block and line.endswith("\\") else ""
            if continued:
                continue
            pieces = [line.split(" #")[0]] if in_block else re.findall(r"`([^`]*)`", line)
            for piece in pieces:
                match = re.search(r"(?:^|\s)(ckaqad\s+\S.*?)\s*$", piece)
                if match and "$" not in match.group(1):  # a line of a shell loop is a template
                    found.append((where, match.group(1)))
    return found


def test_documentation_has_command_lines():
    """The extraction finds the documented command lines, and each template left out is still documented."""
    lines = [text for _, text in documented_command_lines()]
    assert len(lines) >= 20 and set(NOT_COMMAND_LINES) <= set(lines)
    commands = {shlex.split(text)[1] for text in lines if text not in NOT_COMMAND_LINES}
    assert {"diagnose", "distill", "eval", "compare", "export"} <= commands <= set(COMMAND_NAMES)


@pytest.mark.parametrize("where, text", [(w, t) for w, t in documented_command_lines() if t not in NOT_COMMAND_LINES])
def test_documented_command_line_parses(monkeypatch, where, text):
    _, command, *argv = shlex.split(text)
    seen = record_runs(monkeypatch, command)
    assert cli.main([command, *argv]) == 0, where
    assert isinstance(seen[0], COMMANDS.get(command).Config)


# ------------------------------------------------------------------------------------ bad input: exit 2


@dataclasses.dataclass
class FakeInner:
    temperature: float = 1.0
    """softmax temperature"""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0")


@dataclasses.dataclass
class FakeConfig:
    mode: Literal["fast", "slow"] = "fast"
    """how fast"""
    where: Path = Path("here")
    """a path"""
    inner: FakeInner = dataclasses.field(default_factory=FakeInner)


@pytest.fixture
def fake_command(monkeypatch):
    """`ckaqad fake`: a command of its own, the real ones left out."""
    module = types.ModuleType("fake")
    module.HELP, module.Config, module.seen = "a fake command", FakeConfig, []
    module.run = module.seen.append
    registry = Registry[types.ModuleType]("command")
    registry.register("fake", module)
    monkeypatch.setattr(cli, "COMMANDS", registry)
    return module


def test_usage_errors_exit_2_on_one_line(capsys, fake_command):
    line = cli_error(capsys, ["fake", "--mode", "medium"])
    assert "invalid choice 'medium' for argument '--mode'" in line and "'fast', 'slow'" in line
    assert cli_error(capsys, ["fake", "--modes", "fast"]).startswith(
        "ckaqad: error: unrecognized options: --modes, fast (did you mean: --mode?)")
    assert "argument --temperature: could not convert string to float: 'hot'" in \
        cli_error(capsys, ["fake", "--temperature", "hot"])
    assert "--temperature must be > 0" in cli_error(capsys, ["fake", "--temperature", "-1"])  # __post_init__
    assert cli.main(["fake", "--mode", "slow", "--where", "a/b"]) == 0
    assert fake_command.seen == [FakeConfig(mode="slow", where=Path("a/b"))]


def test_usage_errors_of_real_commands(capsys):
    assert "argument --steps: invalid literal for int() with base 10: 'ten'" in \
        cli_error(capsys, ["distill", "--steps", "ten"])
    assert "unrecognized options: --stepz" in cli_error(capsys, ["distill", "--stepz", "3"])
    assert "compare needs at least one result directory" in cli_error(capsys, ["compare"])
    assert "unknown command 'distil' (did you mean: distill" in cli_error(capsys, ["distil"])
    assert "missing command" in cli_error(capsys, [])
    assert "unknown option --verbose" in cli_error(capsys, ["--verbose"])


def test_usage_message_reads_both_box_drawings():
    utf8 = ("╭─ Value error ─────────╮\n│ Error parsing --steps: invalid │\n│ value 'ten' │\n│ ───── │\n"
            "│ Argument helptext: │\n╰───────╯\n")
    ascii_box = (" Invalid choice \n ------------- \n  invalid choice 'x' for argument '--mode'.\n  ---------\n"
                 "  For full helptext, run prog --help\n \n")
    assert cli.usage_message(utf8) == "argument --steps: invalid value 'ten'"
    assert cli.usage_message("\x1b[31m" + ascii_box + "\x1b[0m") == "invalid choice 'x' for argument '--mode'."


def test_nonexistent_teacher(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    for command in ("distill", "diagnose", "demo"):
        line = cli_error(capsys, [command, "--teacher", str(missing), "--out", str(tmp_path / "out")])
        assert line == f"ckaqad: error: model path does not exist: {missing}"
    nothing_written(tmp_path, set())


def test_directory_without_config_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = cli_error(capsys, ["distill", "--teacher", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "is not an HF model directory (no config.json)" in line
    nothing_written(tmp_path, {"empty"})


def test_non_causal_model_is_refused(tmp_path, capsys):
    import transformers

    t5 = tmp_path / "t5"
    transformers.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    line = cli_error(capsys, ["diagnose", "--teacher", str(t5), "--out", str(tmp_path / "out")])
    assert "holds a 't5' model, which is not a causal language model" in line
    nothing_written(tmp_path, {"t5"})


def test_unknown_format_lists_close_matches(tmp_path, capsys, teacher_dir):
    line = cli_error(capsys, ["distill", "--teacher", str(teacher_dir), "--format", "nvfp5",
                              "--out", str(tmp_path / "out")])
    assert "unknown format (--format) 'nvfp5' (did you mean: nvfp4?); choose from: int4, mxfp4, nvfp4" in line
    line = cli_error(capsys, ["diagnose", "--teacher", str(teacher_dir), "--format", "nvfp4,mxfp5"])
    assert "'mxfp5' (did you mean: mxfp4" in line
    nothing_written(tmp_path, set())


def test_invalid_scheme(tmp_path, capsys):
    line = cli_error(capsys, ["distill", "--scheme", "w4a8", "--out", str(tmp_path / "out")])
    assert "unknown scheme (--scheme) 'w4a8' (did you mean: w4a4" in line and "choose from: w4a16, w4a4" in line
    assert "--scheme" in cli_error(capsys, ["export", "--ptq", "--scheme", "w8a8", "--out", str(tmp_path / "out")])
    nothing_written(tmp_path, set())


def test_other_config_checks_name_the_flag(capsys):
    assert "--suite" in cli_error(capsys, ["eval", "--suite", "fidelty"])
    assert "--limit must be at least 1" in cli_error(capsys, ["eval", "--limit", "0"])
    assert "exactly one of --run DIR, --student DIR or --ptq" in cli_error(capsys, ["export"])
    assert "--layout" in cli_error(capsys, ["export", "--ptq", "--layout", "vllm"])
    assert "--seq-len must be at least 8" in cli_error(capsys, ["distill", "--seq-len", "4"])


def test_unusable_device(tmp_path, capsys, monkeypatch, teacher_dir):
    line = cli_error(capsys, ["distill", "--teacher", str(teacher_dir), "--device", "gpu0",
                              "--out", str(tmp_path / "out")])
    assert "--device 'gpu0' is not a device" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = cli_error(capsys, ["eval", "--model", str(teacher_dir), "--teacher", str(teacher_dir),
                              "--device", "cuda", "--out", str(tmp_path / "out")])
    assert "--device cuda: CUDA is not available" in line
    nothing_written(tmp_path, set())


# (command line before --out): each one's output check runs before it loads or computes anything.
OUT_COMMANDS = {
    "distill": ["distill", "--teacher", "/nonexistent"],
    "diagnose": ["diagnose", "--teacher", "/nonexistent"],
    "demo": ["demo", "--teacher", "/nonexistent"],
    "eval": ["eval", "--model", "/nonexistent"],
    "export": ["export", "--student", "/nonexistent"],
    "compare": ["compare", "/nonexistent"],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_file_in_the_way_of_out(tmp_path, capsys, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    line = cli_error(capsys, [*OUT_COMMANDS[command], "--out", str(blocker)])
    assert f"{blocker} exists and is not a directory" in line
    line = cli_error(capsys, [*OUT_COMMANDS[command], "--out", str(blocker / "sub" / "dir")])
    assert f"--out {blocker / 'sub' / 'dir'} cannot be created: {blocker} is a file" in line
    assert blocker.read_text() == "keep me"
    nothing_written(tmp_path, {"blocker"})


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_out_in_a_read_only_directory(tmp_path, capsys, monkeypatch, command):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root's access() ignores mode bits: answer as the directory's (non-root) owner would
        def owner_access(path, mode, **_):
            return not mode & os.W_OK or bool(os.stat(path).st_mode & stat.S_IWUSR)

        monkeypatch.setattr(os, "access", owner_access)
    try:
        line = cli_error(capsys, [*OUT_COMMANDS[command], "--out", str(read_only / "out")])
        assert line == f"ckaqad: error: --out {read_only / 'out'} is not writable"
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


def test_missing_data_file(tmp_path, capsys, teacher_dir):
    out = tmp_path / "out"
    line = cli_error(capsys, ["distill", "--teacher", str(teacher_dir), "--data", str(tmp_path / "no.txt"),
                              "--out", str(out), "--no-progress"])
    assert line == f"ckaqad: error: data path does not exist: {tmp_path / 'no.txt'}"
    nothing_written(tmp_path, set())


def test_nonexistent_run_or_student_dirs(tmp_path, capsys, teacher_dir):
    missing, empty = tmp_path / "no-run", tmp_path / "empty"
    empty.mkdir()
    out = ["--out", str(tmp_path / "out")]
    assert cli_error(capsys, ["export", "--run", str(missing), *out]) == f"ckaqad: error: {missing} is not a directory"
    line = cli_error(capsys, ["export", "--student", str(empty), "--teacher", str(teacher_dir), *out])
    assert f"{empty} has no student checkpoint" in line
    line = cli_error(capsys, ["eval", "--model", str(missing), "--teacher", str(teacher_dir), *out])
    assert line == f"ckaqad: error: model path does not exist: {missing}"
    line = cli_error(capsys, ["eval", "--model", str(empty), "--teacher", str(teacher_dir), *out])
    assert f"{empty} is not an HF model directory" in line
    for d in (missing, empty):
        line = cli_error(capsys, ["compare", str(d), *out])
        assert line == f"ckaqad: error: {d} has no results.json, eval.json, diagnosis.json or report.json to compare"
    (tmp_path / "data.txt").write_text("\n\n".join(f"document number {i} " * 8 for i in range(6)))
    line = cli_error(capsys, ["diagnose", "--teacher", str(teacher_dir), "--student", str(missing),
                              "--data", str(tmp_path / "data.txt"), "--seq-len", "16", *out])
    assert line == f"ckaqad: error: student path is not a directory: {missing}"
    nothing_written(tmp_path, {"empty", "data.txt"})


# ------------------------------------------------------------------------------ what leaves cli.main


def test_multi_line_library_message_is_printed_on_one_line(capsys, monkeypatch):
    def fail(config):
        raise ModelError("cannot load the model:\n  first detail\n  second detail")

    monkeypatch.setattr(COMMANDS.get("distill"), "run", fail)
    assert cli_error(capsys, ["distill"]) == "ckaqad: error: cannot load the model: first detail second detail"


def test_other_exceptions_keep_their_traceback(monkeypatch):
    def bug(config):
        raise ZeroDivisionError("an internal bug")

    monkeypatch.setattr(COMMANDS.get("distill"), "run", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["distill"])


def test_a_lost_peer_ends_the_process_at_once_only_inside_a_process_group(capsys, monkeypatch):
    def lost(config):
        raise LostPeerError("rank 1 of 2: lost contact with the other processes (Timed out)")

    monkeypatch.setattr(COMMANDS.get("distill"), "run", lost)
    assert cli.main(["distill"]) == 2  # no group (this test process): a plain return
    ended = []
    monkeypatch.setattr(cli, "group_is_joined", lambda: True)
    monkeypatch.setattr(cli, "exit_without_teardown", ended.append)
    cli.main(["distill"])
    assert ended == [2]
    assert capsys.readouterr().err.splitlines() == [
        "ckaqad: error: rank 1 of 2: lost contact with the other processes (Timed out)"] * 2


def test_ctrl_c_is_exit_130(capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(COMMANDS.get("distill"), "run", interrupted)
    assert cli.main(["distill"]) == 130
    assert capsys.readouterr().err == "ckaqad: interrupted\n"


def test_console_script_exits_2_without_traceback(tmp_path):
    script = Path(sys.executable).with_name("ckaqad")
    assert script.is_file(), "the ckaqad console script is not installed in this environment"
    env = {**os.environ, "CKAQAD_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    result = subprocess.run([str(script), "distill", "--teacher", str(tmp_path / "missing"), "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"ckaqad: error: model path does not exist: {tmp_path / 'missing'}"]
    assert not out.exists()


def test_python_m_ckaqad_with_an_ascii_terminal(tmp_path):
    """`python -m ckaqad` is the same command line; a non-UTF-8 terminal (ascii boxes) gives the same one line."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "CKAQAD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "ckaqad", "distill", "--steps", "ten"],
                            capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["ckaqad: error: argument --steps: invalid literal for int() with base 10: "
                                          "'ten'"]
