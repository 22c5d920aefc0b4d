"""The constraint a pruned student keeps while it recovers: every pruned weight stays exactly zero.

The mask is part of the student: each masked weight gets a gradient hook that multiplies its gradient by
the mask, so a pruned entry has zero gradient, zero Adam moments and therefore a zero update (AdamW's
decoupled weight decay multiplies it, and it is zero). Nothing re-zeroes weights after the fact, which is why
the tests can check that the entries *stay* zero. The weights keep their ordinary names and shapes, so a
checkpoint of a masked student is an ordinary student directory and a resumed run rebuilds the same mask
from its zeros. (torch.nn.utils.prune and parametrizations rename the weight to `weight_orig` /
`parametrizations.weight.original`, which HF loaders and student directories do not read.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ckaqad.damage.pruning import prunable_linears
from ckaqad.errors import CheckpointError

# A dense layer has essentially no exact zeros; a pruned one at least this share (the lowest sparsity is
# a fraction of a percent only for a pruning nobody would run).
MIN_PRUNED_SHARE = 0.01


def masks_from_zeros(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """{layer name: keep mask} from the exact zeros of the prunable layers `names`, or of every prunable layer
    with at least MIN_PRUNED_SHARE zeros when `names` is None."""
    layers = prunable_linears(model)
    if names is not None:
        missing = [n for n in names if n not in layers]
        if missing:
            raise CheckpointError(f"the damage report names layers the student does not have: {missing[:3]}")
        chosen = list(names)
    else:
        chosen = [n for n, layer in layers.items() if float((layer.weight == 0).float().mean()) >= MIN_PRUNED_SHARE]
    return {name: layers[name].weight.detach() != 0 for name in chosen}


class SparsityMask:
    """Keeps the masked weights of `model` at exactly zero during training (gradient hooks); `remove()`
    takes the hooks off."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.model = model
        modules = dict(model.named_modules())
        self.masks = {name: mask.to(modules[name].weight.device) for name, mask in masks.items()}
        self._handles = []
        with torch.no_grad():
            for name, mask in self.masks.items():
                weight = modules[name].weight
                weight.mul_(mask.to(weight.dtype))
                self._handles.append(weight.register_hook(self._masker(mask)))

    @staticmethod
    def _masker(mask: torch.Tensor):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * mask.to(grad.dtype)
        return hook

    @property
    def pruned(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())

    def violations(self) -> int:
        """Masked entries that are not exactly zero (0 while the constraint holds)."""
        modules = dict(self.model.named_modules())
        return sum(int((modules[name].weight.detach()[~mask] != 0).sum()) for name, mask in self.masks.items())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
