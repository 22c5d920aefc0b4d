"""Deployable NVFP4 checkpoints of a fake-quantized student and the way back
(docs/method.md#export-layouts).

- `layouts`: one entry per on-disk layout (compressed-tensors, modelopt) in the `LAYOUTS` registry: local
  tensor names, global-scale encodings, config files, `detect`.
- `compress`: pure state dict -> export tensors (`compress`) and back (`decompress`), with the exactness
  record `ckaqad_scales.json`.
- `writer`: `export_student` writes a directory atomically (shards, configs, tokenizer, summary).
- `reader`: `inspect_export`, `is_export_dir`, `load_export`.
- `verify`: `verify_export` reads an export the way serving stacks do and compares it with the student.
"""
