"""Training objectives: `base` (the protocol, LossParts, the registry), `kl`, `cka`, `ce`, and `compose`
(`--loss kl+cka` as a weighted sum of registered terms), `ranks` (a term's share of the global batch under
torchrun)."""
