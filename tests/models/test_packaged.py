"""Packaged teachers by name: the GGUF a package assembles is checked against the SHA-256 ckaqad pins, once."""

from __future__ import annotations

import hashlib
import sys
import types

import pytest

from ckaqad.errors import MissingDependencyError, ModelError
from ckaqad.models import packaged
from ckaqad.models.load import resolve_model_dir

CONTENT = b"GGUF fake model bytes"


@pytest.fixture
def fake_package(monkeypatch):
    """A module `fake_gguf_pkg` whose assemble() writes CONTENT, registered as packaged teacher `fake`."""
    calls = []
    module = types.ModuleType("fake_gguf_pkg")
    module.MODEL_NAME = "fake.gguf"

    def assemble(target, overwrite=False):
        calls.append(target)
        target.write_bytes(CONTENT)
        return target

    module.assemble = assemble
    module.__spec__ = types.SimpleNamespace(name="fake_gguf_pkg")
    monkeypatch.setitem(sys.modules, "fake_gguf_pkg", module)
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name: object() if name == "fake_gguf_pkg" else None)
    entry = packaged.PackagedGGUF("fake", "fake_gguf_pkg", "pip install fake", hashlib.sha256(CONTENT).hexdigest(), "")
    monkeypatch.setitem(packaged.PACKAGED, "fake", entry)
    return calls


def test_assembled_once_and_checked(fake_package, tmp_path):
    path = packaged.packaged_gguf_path("fake", tmp_path)
    assert path.read_bytes() == CONTENT and path.parent == tmp_path / "gguf-files"
    assert packaged.packaged_gguf_path("fake", tmp_path) == path
    assert len(fake_package) == 1  # the second call trusts the digest stamp written after the check


def test_a_wrong_digest_is_refused_and_removed(fake_package, tmp_path, monkeypatch):
    entry = packaged.PACKAGED["fake"]
    monkeypatch.setitem(packaged.PACKAGED, "fake", packaged.PackagedGGUF(
        entry.name, entry.package, entry.install, "0" * 64, ""))
    with pytest.raises(ModelError, match="expected 0000"):
        packaged.packaged_gguf_path("fake", tmp_path)
    assert not (tmp_path / "gguf-files" / "fake.gguf").exists()


def test_a_missing_package_names_its_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("CKAQAD_CACHE", str(tmp_path))
    with pytest.raises(MissingDependencyError, match=r"ckaqad\[gemma\]"):
        resolve_model_dir("gemma3-270m")
