"""Text data: `documents` (local files, the built-in corpus) and `blocks` (packing, splits, batches)."""
