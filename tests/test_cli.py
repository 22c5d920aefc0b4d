"""tests for ckaqad/cli.py: flags mirror the config dataclasses, `--config` YAML, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckaqad import cli, distill, evaluate
from ckaqad.checkpoint import CheckpointConfig
from ckaqad.data import DataConfig
from ckaqad.demo import DemoConfig
from ckaqad.diagnose import DiagnoseConfig
from ckaqad.distill import DistillConfig
from ckaqad.evaluate import CompareConfig, EvalConfig
from ckaqad.export import ExportConfig
from ckaqad.losses import LossConfig
from ckaqad.quantize import QuantConfig

# The spec: which dataclasses each subcommand is built from, and the fields it does not expose.
COMMANDS = {
    "diagnose": (DiagnoseConfig, QuantConfig, DataConfig),
    "distill": (DistillConfig, LossConfig, QuantConfig, DataConfig, CheckpointConfig),
    "demo": (DemoConfig,),
    "export": (ExportConfig,),
    "eval": (EvalConfig,),
    "compare": (CompareConfig,),
}
# diagnose takes comma-separated --format/--scheme lists (DiagnoseConfig's), one PTQ student per pair.
SKIPS = {("diagnose", QuantConfig): {"format", "scheme"}}
POSITIONALS = {"compare": ["dirs"]}

FIELD_DOC = re.compile(r'^    (\w+): [^\n]*\n    """([^\n]*)"""$', re.M)


def documented_fields(cls: type) -> dict[str, str]:
    """{field: docstring} read from the class source, independently of cli.field_docs."""
    return dict(FIELD_DOC.findall(inspect.getsource(cls)))


def exposed_fields(command: str) -> list[tuple[type, dataclasses.Field]]:
    return [(cls, f) for cls in COMMANDS[command] for f in dataclasses.fields(cls)
            if f.name not in SKIPS.get((command, cls), set())]


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@functools.cache
def parser() -> argparse.ArgumentParser:
    """Built once: building imports every command's module and reads the dataclass sources."""
    return cli.build_parser()


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_actions(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{first option string: action} for every option but --help and --config."""
    return {a.option_strings[0]: a for a in sub._actions
            if a.option_strings and a.option_strings[0] not in ("-h", "--config")}


def parsed_values(argv: list[str]) -> dict:
    """What a handler receives for `argv` (flags merged over --config), without running it."""
    args = parser().parse_args(argv)
    classes = args.classes
    del args.classes
    return cli.merged_values(args, classes)


def cli_error(capsys, argv: list[str]) -> str:
    """Run `ckaqad argv`; assert exit code 2 with exactly one `ckaqad: error:` line and no traceback."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("ckaqad")] == err.splitlines()[-1:], err
    last = err.splitlines()[-1]  # the message is the last line: nothing of it spills onto further lines
    assert last.startswith("ckaqad: error: "), err
    return last


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
    registry = cli._commands()
    assert set(subparsers()) == set(COMMANDS) == set(registry)
    for name, (_, classes, _, *positional) in registry.items():
        assert [cls for cls, _ in classes] == list(COMMANDS[name])
        assert {cls: set(skip) for cls, skip in classes if skip} == \
            {cls: skip for (cmd, cls), skip in SKIPS.items() if cmd == name}
        assert positional == POSITIONALS.get(name, [])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flags_equal_the_dataclass_fields(command):
    sub = subparsers()[command]
    names = [f.name for _, f in exposed_fields(command)]
    assert len(names) == len(set(names)), f"two dataclasses of {command} share a field"
    actions = option_actions(sub)
    assert set(actions) == {"--" + n.replace("_", "-") for n in names}
    assert {a.dest for a in actions.values()} == set(names)
    assert [a.dest for a in sub._actions if not a.option_strings] == POSITIONALS.get(command, [])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_the_field_docstring_and_default(command):
    actions = {a.dest: a for a in option_actions(subparsers()[command]).values()}
    for cls, f in exposed_fields(command):
        doc = documented_fields(cls).get(f.name)
        assert doc, f"{cls.__name__}.{f.name} has no docstring"
        assert actions[f.name].help == f"{doc} (default: {default_of(f)})"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_flag_parses_its_default_back_to_the_field_type(command):
    extra = ["somewhere"] if command == "compare" else []
    for _, f in exposed_fields(command):
        default, option = default_of(f), "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            assert parsed_values([command, *extra, option])[f.name] is True
            assert parsed_values([command, *extra, "--no-" + option[2:]])[f.name] is False
            continue
        if default is None:
            continue
        text = ",".join(default) if isinstance(default, tuple) else str(default)
        value = parsed_values([command, *extra, option, text])[f.name]
        assert value == default and type(value) is type(default), (option, value)


def test_optional_int_flag_parses_an_int():
    assert parsed_values(["eval", "--limit", "3"])["limit"] == 3
    assert "limit" not in parsed_values(["eval"])  # not given: the dataclass default applies


def test_flags_not_given_leave_the_dataclass_defaults(monkeypatch):
    seen = {}
    monkeypatch.setattr(distill, "run_distill", lambda *configs: seen.setdefault("configs", configs))
    assert cli.main(["distill"]) == 0
    assert seen["configs"] == tuple(cls() for cls in COMMANDS["distill"])


# ------------------------------------------------------------------------------------------- --config


def test_config_values_are_used_and_flags_win(tmp_path, monkeypatch):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 7\n"
                         "lr: 1e-4\n"            # YAML 1.1 reads this as a string; the flag parser makes it a float
                         "seq-len: 64\n"         # flag spelling works too
                         "exclude: [lm_head, '*.mlp.*']\n"
                         "loss: kl\n"
                         "progress: false\n"
                         "teacher: from-yaml\n"
                         "save_every: 3\n")
    seen = {}
    monkeypatch.setattr(distill, "run_distill", lambda *configs: seen.setdefault("configs", configs))
    assert cli.main(["distill", "--config", str(yaml_file), "--steps", "9", "--progress",
                     "--teacher", "from-flag"]) == 0
    run, loss, quant, data, checkpoint = seen["configs"]
    assert run.steps == 9 and run.progress is True and run.teacher == "from-flag"  # flags win
    assert run.lr == 1e-4 and isinstance(run.lr, float)
    assert data.seq_len == 64 and quant.exclude == ("lm_head", "*.mlp.*") and loss.loss == "kl"
    assert checkpoint.save_every == 3
    assert run.batch_size == DistillConfig().batch_size  # neither YAML nor flag: the default


def test_config_for_eval_and_compare(tmp_path, monkeypatch):
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("suite: fidelity\nlimit: 2\nout: from-yaml\n")
    seen = {}
    monkeypatch.setattr(evaluate, "run_eval", lambda config: seen.setdefault("eval", config))
    monkeypatch.setattr(evaluate, "run_compare", lambda dirs, config: seen.setdefault("compare", (dirs, config)))
    assert cli.main(["eval", "--config", str(yaml_file), "--out", "from-flag"]) == 0
    assert seen["eval"] == EvalConfig(suite="fidelity", limit=2, out="from-flag")
    (tmp_path / "compare.yaml").write_text("out: cmp\n")
    assert cli.main(["compare", "a", "b", "--config", str(tmp_path / "compare.yaml")]) == 0
    assert seen["compare"] == (["a", "b"], CompareConfig(out="cmp"))


@pytest.mark.parametrize("text, message", [
    ("stepz: 3\n", "unknown option(s) stepz"),
    ("steps: [\n", "is not valid YAML"),
    ("- steps\n- 3\n", "must hold a mapping"),
    ("steps: ten\n", "steps must be int, got 'ten'"),
    ("steps: 2.5\n", "steps must be int"),
    ("lr: [1]\n", "lr must be float"),
    ("progress: maybe\n", "progress must be bool"),
    ("steps: null\n", "steps must be int, got None"),
    ("1: 2\n", "unknown option(s) 1"),
])
def test_bad_config_file_is_exit_2(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.setattr(distill, "run_distill", lambda *configs: pytest.fail("ran despite a bad --config"))
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text(text)
    line = cli_error(capsys, ["distill", "--config", str(yaml_file)])
    assert message in line and str(yaml_file) in line


def test_missing_config_file_is_exit_2(tmp_path, capsys):
    assert "--config file does not exist" in cli_error(capsys, ["distill", "--config", str(tmp_path / "no.yaml")])


# ------------------------------------------------------------------------------------ bad input: exit 2


def test_usage_errors_exit_2_like_argparse(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["distill", "--steps", "ten"])
    assert info.value.code == 2 and "invalid int value: 'ten'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["compare"])
    assert info.value.code == 2 and "required: dirs" in capsys.readouterr().err


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
        assert line == f"ckaqad: error: {d} has no eval.json, diagnosis.json or report.json to compare"
    (tmp_path / "data.txt").write_text("\n\n".join(f"document number {i} " * 8 for i in range(6)))
    line = cli_error(capsys, ["diagnose", "--teacher", str(teacher_dir), "--student", str(missing),
                              "--data", str(tmp_path / "data.txt"), "--seq-len", "16", *out])
    assert line == f"ckaqad: error: student path is not a directory: {missing}"
    nothing_written(tmp_path, {"empty", "data.txt"})


def test_multi_line_library_message_is_printed_on_one_line(tmp_path, capsys, monkeypatch):
    from ckaqad.errors import ModelError

    def fail(*configs):
        raise ModelError("cannot load the model:\n  first detail\n  second detail")

    monkeypatch.setattr(distill, "run_distill", fail)
    assert cli_error(capsys, ["distill"]) == "ckaqad: error: cannot load the model: first detail second detail"


def test_other_exceptions_keep_their_traceback(monkeypatch):
    def bug(*configs):
        raise ZeroDivisionError("an internal bug")

    monkeypatch.setattr(distill, "run_distill", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["distill"])


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
