"""Frozen timm and open_clip networks computing named layers in one pass: ``forward(x) -> {layer: (B, dim)}``.

The graph cutting of models.backbones does not suit them: timm and open_clip each have their own API for what a
probe reads, and that API is used as it is.

- timm (``TimmLayers``): ``penultimate`` is ``forward_head(forward_features(x), pre_logits=True)``, the pooled and
  normed vector timm's own classifier and linear probes read; intermediate blocks come from
  ``forward_intermediates(x, indices=...)`` (not normed), each reduced as the model's head pools: its class token
  where the head reads that (``global_pool == 'token'``), else the mean of its patch tokens (a token model) or of
  its map over H and W (a CNN). The pass stops early when no penultimate is asked for.
- open_clip (``ImageEmbedding``): ``embedding`` is the image tower's output, what ``encode_image(x)`` returns
  unnormalised (CoCa's tower returns (pooled, tokens): the pooled vector).

Reductions, as a cache records them (``REDUCTIONS``): ``pre_logits`` (the head's own pooling), ``class_token``,
``mean_patch_tokens``, ``mean_hw``, ``none`` (already one vector per image).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

REDUCTIONS = ("pre_logits", "class_token", "mean_patch_tokens", "mean_hw", "none")
PRE_LOGITS = "forward_head(pre_logits=True)"  # the node a timm penultimate is read from
EMBEDDING_NODE = "encode_image"  # the node open_clip's embedding is read from


class FrozenLayers(nn.Module):
    """A frozen network computing named layers: always in eval mode, also after a deep copy, no gradients."""

    layers: dict[str, tuple[str, str]]  # layer name -> (node, reduction)

    def train(self, mode: bool = True) -> "FrozenLayers":
        return super().train(False)  # always eval: dropout off, BatchNorm uses its running statistics

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the weights are cast once (``.to(torch.bfloat16)``), never per call."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def forward_layers(self, x: torch.Tensor, layers: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """{layer: (B, dim)} for the requested layers (one pass computes them all)."""
        return {name: rows for name, rows in self(x).items() if name in layers}


class TimmLayers(FrozenLayers):
    """A timm model's penultimate vector and intermediate blocks, in one pass: ``forward(x) -> {layer: (B, dim)}``.

    ``layers``: name -> (node, reduction), the node being ``PRE_LOGITS`` or a block's name; ``block_index``: each
    block's index in ``forward_intermediates``.
    """

    def __init__(self, model: nn.Module, layers: dict[str, tuple[str, str]], block_index: dict[str, int]):
        super().__init__()
        for name, (node, reduction) in layers.items():
            if reduction not in REDUCTIONS or (node != PRE_LOGITS and node not in block_index):
                raise ValueError(f"layer {name!r}: node {node!r} with reduction {reduction!r} is not one this model has")
        self.model = model
        self.layers = dict(layers)
        self.block_index = {node: index for node, index in block_index.items()
                            if any(node == n for n, _ in self.layers.values())}
        self.requires_grad_(False)
        self.eval()

    def _intermediates(self, x: torch.Tensor, head: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(the final features when ``head``, {block: (B, dim) reduced}) from one forward_intermediates pass."""
        blocks = sorted(self.block_index, key=self.block_index.get)  # timm returns them in network order
        reductions = {node: reduction for node, reduction in self.layers.values()}
        accepts = inspect.signature(self.model.forward_intermediates).parameters
        options = {"indices": [self.block_index[b] for b in blocks], "intermediates_only": not head}
        if any(reductions[b] == "class_token" for b in blocks):
            options["return_prefix_tokens"] = True  # (map (B, D, H, W), prefix tokens (B, P, D)) per block
        if not head and "stop_early" in accepts:
            options["stop_early"] = True
        result = self.model.forward_intermediates(x, **options)
        final, outputs = result if head else (None, result)
        reduced = {}
        for block, output in zip(blocks, outputs):
            tokens, prefix = output if isinstance(output, (tuple, list)) else (output, None)
            if reductions[block] == "class_token":
                reduced[block] = prefix[:, 0]  # (B, P, D) -> (B, D)
            else:  # (B, D, H, W): patch tokens laid out as a map, or a CNN's feature map
                reduced[block] = tokens.mean(dim=(2, 3))
        return final, reduced

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.dtype)
        head = any(node == PRE_LOGITS for node, _ in self.layers.values())
        final, outputs = self._intermediates(x, head) if self.block_index else (self.model.forward_features(x), {})
        if head:
            outputs[PRE_LOGITS] = self.model.forward_head(final, pre_logits=True)  # (B, D)
        return {name: outputs[node] for name, (node, _) in self.layers.items()}


class ImageEmbedding(FrozenLayers):
    """open_clip's image tower: ``forward(x) -> {layer: (B, embed_dim)}``, encode_image's unnormalised output."""

    def __init__(self, tower: nn.Module, layers: tuple[str, ...] = ("embedding",)):
        super().__init__()
        self.tower = tower
        self.layers = {name: (EMBEDDING_NODE, "none") for name in layers}
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.tower(x.to(self.dtype))
        embedding = out[0] if isinstance(out, (tuple, list)) else out  # CoCa: (pooled, tokens)
        return {name: embedding for name in self.layers}


__all__ = ["EMBEDDING_NODE", "PRE_LOGITS", "REDUCTIONS", "FrozenLayers", "ImageEmbedding", "TimmLayers"]
