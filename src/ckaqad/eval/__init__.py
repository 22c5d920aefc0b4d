"""Evaluation: `fidelity` (a student against its teacher), `suites` (the registry `ckaqad eval` runs),
`lmeval` (lm-evaluation-harness, offline) and `humaneval` (problems, generation, scoring, sandbox)."""
