"""Training across processes with torch's own engine: `dist` (the torchrun process group, rank-0 output,
collectives, lost peers), `fsdp` (FSDP2 sharding per decoder block, activation checkpointing, full state dicts),
`config` (the flags). docs/distributed.md says how to launch and what was verified where."""
