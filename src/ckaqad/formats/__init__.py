"""Number formats. Each module holds its constants, its fp32 reference quantizer and `fake_quantize`.

`FORMATS` is the one registry of format names: `get_format(name)` returns the module. On a CUDA machine
with Triton, importing this package registers the fused NVFP4 kernel as the fast path (`backends`); on CPU the
compiled loops of `cpu_fused` are registered for every format and the served NVFP4 arithmetic.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ckaqad.formats import backends, int4, mxfp4, nvfp4
from ckaqad.registry import Registry

FORMATS: Registry[ModuleType] = Registry("format", flag="--format")
for _module in (nvfp4, mxfp4, int4):
    FORMATS.register(_module.__name__.rsplit(".", 1)[-1], _module)
# Formats with a per-tensor global scale that activations calibrate (max-calibration, then frozen).
CALIBRATED_FORMATS = frozenset({"nvfp4"})

def _register_cpu_fused() -> None:
    """The compiled CPU loops (formats/cpu_fused.py) as the CPU fast paths; compiling waits for a first call."""
    from ckaqad.formats import cpu_fused

    for name, function in cpu_fused.FUNCTIONS.items():
        backends.register_cpu_fast_path(name, function, cpu_fused.MIN_ELEMENTS)


_register_cpu_fused()

if torch.cuda.is_available() and backends.triton_available():
    from ckaqad.formats import nvfp4_triton  # noqa: F401  (registers the CUDA fast path)


def get_format(name: str) -> ModuleType:
    """The format module registered as `name` (ConfigError listing the valid names otherwise)."""
    return FORMATS.get(name)
