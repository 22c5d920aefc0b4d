"""Number formats. Each module holds its constants, its fp32 reference quantizer and `fake_quantize`.

`FORMATS` is the one registry of format names: `get_format(name)` returns the module.
"""

from __future__ import annotations

from types import ModuleType

from ckaqad.errors import unknown_name
from ckaqad.formats import int4, mxfp4, nvfp4

FORMATS: dict[str, ModuleType] = {"nvfp4": nvfp4, "mxfp4": mxfp4, "int4": int4}
# Formats with a per-tensor global scale that activations calibrate (max-calibration, then frozen).
CALIBRATED_FORMATS = frozenset({"nvfp4"})


def get_format(name: str) -> ModuleType:
    """The format module registered as `name` (ConfigError listing the valid names otherwise)."""
    if name not in FORMATS:
        raise unknown_name("format", name, FORMATS)
    return FORMATS[name]
