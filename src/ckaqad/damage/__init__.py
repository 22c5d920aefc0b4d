"""Damage to a model, made reproducible, and its recovery by self-distillation (docs/recovery.md).

The model before the damage is the teacher; the damaged model the student. `kinds` names the damage kinds
(`ckaqad damage --kind`); `pruning` scores and masks weights (magnitude, Wanda, N:M), `depth` removes decoder
blocks (listed, or the least important by ShortGPT's block influence), `forget` fine-tunes on a narrow corpus;
`constraints` keeps a pruned weight exactly zero while the student recovers; `narrow` is the optional CE term
on the narrow corpus during recovery; `recovery` holds the study's arithmetic (recovery fractions, the
CKA–recovery correlation with its bootstrap interval).
"""
