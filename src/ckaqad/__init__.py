"""ckaqad: NVFP4 students, layerwise CKA diagnosis and CKA-regularised quantization-aware distillation."""

__version__ = "0.1.0"
