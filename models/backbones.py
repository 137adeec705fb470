"""A frozen classifier cut at named graph nodes, each node's output reduced to one vector per image.

The cutting is torchvision's own (``torchvision.models.feature_extraction``): no hand-written slicing.
A reduction turns a node's output into (B, dim):

- ``none``: (B, D) as it is;
- ``flatten``: (B, ...) -> (B, prod(...)), AlexNet's pool5 as DeCAF caches it;
- ``mean_hw``: (B, C, H, W) averaged over H and W, as the CNNs' own global average pool does;
- ``mean_hw_channels_last``: Swin's (B, H, W, C) averaged over H and W;
- ``class_token``: ViT tokens (B, N, D) -> the class token (B, D), as torchvision's ViT head does.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import fx, nn
from torchvision.models import feature_extraction

REDUCTIONS = ("none", "flatten", "mean_hw", "mean_hw_channels_last", "class_token")


def reduce_to_vector(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """A node's output -> (B, dim) by the named reduction (see the module docstring)."""
    if reduction == "none":
        return x  # (B, D)
    if reduction == "flatten":
        return torch.flatten(x, 1)  # (B, C*H*W)
    if reduction == "mean_hw":
        return x.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
    if reduction == "mean_hw_channels_last":
        return x.mean(dim=(1, 2))  # (B, H, W, C) -> (B, C)
    if reduction == "class_token":
        return x[:, 0]  # (B, N, D) -> (B, D)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")


def graph_node_names(model: nn.Module) -> list[str]:
    """The eval-mode graph's node names, in execution order (what ``create_feature_extractor`` accepts)."""
    return feature_extraction.get_graph_node_names(model, suppress_diff_warning=True)[1]


def last_linear_name(model: nn.Module) -> str | None:
    """The qualified name of the model's last ``nn.Linear`` (its classifier), None when it has none."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def penultimate_node(model: nn.Module) -> str | None:
    """The graph node whose output feeds the model's last ``nn.Linear``: what linear probes train on.

    Found from the traced eval graph (torchvision's own tracer, as ``get_graph_node_names`` uses it), so
    the answer is the node the classifier really reads (``flatten`` on ResNet, the class token on ViT,
    fc7's ReLU on AlexNet). None when the model has no Linear layer (SqueezeNet's classifier is a conv).
    """
    linear = last_linear_name(model)
    if linear is None:
        return None
    kwargs = feature_extraction._set_default_tracer_kwargs(None)  # the tracer settings torchvision uses
    tracer = feature_extraction.NodePathTracer(**kwargs)
    was_training = model.training
    graph = tracer.trace(model.eval())
    model.train(was_training)
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target == linear]
    if len(calls) != 1 or not isinstance(calls[0].args[0], fx.Node):
        return None  # called twice or not at all in eval mode: no single penultimate node
    return tracer.node_to_qualname.get(calls[0].args[0])


def node_extractor(model: nn.Module, nodes: list[str]) -> fx.GraphModule:
    """torchvision's feature extractor returning ``{node: output}`` for each node, stopping at the deepest."""
    nodes = list(dict.fromkeys(nodes))
    return feature_extraction.create_feature_extractor(model.eval(), return_nodes={node: node for node in nodes})


class LayerFeatures(nn.Module):
    """Frozen backbone computing several named layers in one pass: ``forward(x) -> {layer: (B, dim)}``.

    ``layers`` maps each layer name to (graph node, reduction); several names may share a node (AlexNet's
    ``fc7`` and ``penultimate``). The pass stops at the deepest node asked for. Always in eval mode.
    """

    def __init__(self, model: nn.Module, layers: dict[str, tuple[str, str]], *, extractor: fx.GraphModule | None = None):
        super().__init__()
        for name, (_, reduction) in layers.items():
            if reduction not in REDUCTIONS:
                raise ValueError(f"layer {name!r}: reduction must be one of {REDUCTIONS}, not {reduction!r}")
        # ``extractor``: one already made by ``node_extractor`` for these nodes (tracing costs seconds)
        self.extractor = extractor or node_extractor(model, [node for node, _ in layers.values()])
        self.layers = dict(layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LayerFeatures":
        return super().train(False)  # always eval: dropout off, BatchNorm uses its running statistics

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.eval()  # a deep copy of torchvision's extractor comes back in training mode (GraphModule.__deepcopy__)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the weights are cast once (``.to(torch.bfloat16)``), never per call."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.extractor(x.to(self.dtype))
        return {name: reduce_to_vector(outputs[node], reduction) for name, (node, reduction) in self.layers.items()}

    def forward_layers(self, x: torch.Tensor, layers: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """{layer: (B, dim)} for the requested layers (the graph computes them all in one pass)."""
        return {name: rows for name, rows in self(x).items() if name in layers}


class LayerClassifier(nn.Module):
    """A frozen ``LayerFeatures`` and the head trained on one of its layers, as one network: the layer computed
    in the backbone's dtype, as extraction computed it, then the head in fp32, as it ran on the cache."""

    def __init__(self, features: LayerFeatures, layer: str, head: nn.Linear, *, normalize: bool = False):
        """``normalize``: the head reads the layer's vectors scaled to unit L2 norm (CLIP's zero-shot head, whose
        logits are logit_scale * cosine)."""
        super().__init__()
        if layer not in features.layers:
            raise ValueError(f"layer {layer!r} is not one of the backbone's {sorted(features.layers)}")
        self.backbone, self.layer, self.head, self.normalize = features, layer, head, normalize
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)[self.layer].float()  # (B, D)
        if self.normalize:
            features = nn.functional.normalize(features, dim=1)  # x / max(||x||, 1e-12)
        return self.head(features)  # (B, C) float32 logits


def reduction_for(shape: tuple[int, ...], *, channels_last: bool = False, class_token: bool = False) -> str | None:
    """The reduction for a node output of ``shape`` (batch first), None when there is no sensible one.

    ``channels_last``: 4-d outputs may be (B, H, W, C) (Swin); one is taken as such when its two middle
    sides are equal and the last differs. ``class_token``: 3-d outputs are ViT tokens with the class token first.
    """
    if len(shape) == 2:
        return "none"
    if len(shape) == 4:
        if channels_last and shape[1] == shape[2] != shape[3]:
            return "mean_hw_channels_last"
        return "mean_hw"
    if len(shape) == 3 and class_token:
        return "class_token"
    return None


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the tensors the model holds (names, shapes, dtypes and bytes, in state_dict order, as float32)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:float32;".encode())
        digest.update(tensor.numpy())  # buffer protocol: no copy
    return digest.hexdigest()


def parameter_count(model: nn.Module) -> int:
    """How many numbers the model's parameters hold."""
    return sum(math.prod(p.shape) for p in model.parameters())


__all__ = ["REDUCTIONS", "LayerClassifier", "LayerFeatures", "graph_node_names", "last_linear_name", "node_extractor",
           "parameter_count", "penultimate_node", "reduce_to_vector", "reduction_for", "weights_fingerprint"]
