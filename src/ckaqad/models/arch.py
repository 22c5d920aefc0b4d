"""What ckaqad needs to know about a model family's structure: its decoder blocks, its depth, its tied
output head. One adapter per family; Llama-like models (`model.layers`), GPT-2 (`transformer.h`) and
encoder-decoder style `decoder.layers` are covered.
"""

from __future__ import annotations

from torch import nn

from ckaqad.errors import ModelError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (`model.model.layers` for Llama-like models)."""
    base = getattr(model, "model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    decoder = getattr(base, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def max_sequence_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def tied_output_name(model: nn.Module) -> str | None:
    """State-dict key of the output embedding when it is tied to the input embedding (one tensor, two names),
    else None."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out_emb, in_emb = (get_out() if get_out else None), (get_in() if get_in else None)
    if out_emb is None or in_emb is None:
        return None
    name = next(n for n, mod in model.named_modules() if mod is out_emb)
    return f"{name}.weight"
