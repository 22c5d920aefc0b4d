"""The fake-quantized student: `linear` (the layer and its config), `apply` (building and scales)."""
