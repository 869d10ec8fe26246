"""Probe heads: the small classifiers linear.py trains on a frozen model's features, by name.

    cls = head_class("attention")                      # a name of HEADS, or package.module.Class
    head = cls(dim, num_classes, **cfg.linear.head_args)
    logits = head(tokens)                              # (B, T, C) -> (B, num_classes)

A head class says what it takes (docs/DESIGN.md, "Probe head contract"): ``tokens = True`` for a block's
(B, T, C) tokens (its spatial positions, or a DiT's tokens), else the average-pooled (B, C) vector;
``fused = True`` for one head over every probed (timestep, block) cell, built as ``cls(dims, num_classes,
**settings)`` with one channel count per cell and called with one feature per cell, else one head per cell,
built as ``cls(dim, num_classes, **settings)``. Its keyword parameters after those two are the YAML keys of
``linear.head_args``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import TimeEmbedding
from utils.config import import_class


class LinearHead(nn.Linear):
    """The original's probe: one linear layer on the average-pooled feature."""

    def __init__(self, dim, num_classes):
        super().__init__(dim, num_classes)


class MLPHead(nn.Module):
    """Two layers on the average-pooled feature: linear, ReLU, linear.

    Args:
        hidden: width of the hidden layer.
    """

    def __init__(self, dim, num_classes, hidden: int = 512):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    @staticmethod
    def check_settings(cfg, require):
        require(cfg.linear.head_args.hidden >= 1, "linear.head_args.hidden",
                f"must be at least 1, got {cfg.linear.head_args.hidden}")

    def forward(self, feature):  # (B, C) -> (B, classes)
        return self.layers(feature)


class AttentionPool(nn.Module):
    """A learned query attending over a set of tokens: (B, T, width) -> (B, width), multi-head."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, heads, 1, width // heads) * width ** -0.5)
        self.norm = nn.LayerNorm(width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, tokens):
        b, t, width = tokens.shape
        key, value = self.key_value(self.norm(tokens)).view(b, t, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(self.query.expand(b, -1, -1, -1), key, value)  # (B, heads, 1, d)
        return self.out(pooled.reshape(b, width))


def _check_width_and_heads(cfg, require):
    settings = cfg.linear.head_args
    require(settings.heads >= 1, "linear.head_args.heads", f"must be at least 1, got {settings.heads}")
    require(settings.width >= 1 and settings.width % settings.heads == 0, "linear.head_args.width",
            f"must be a positive multiple of linear.head_args.heads = {settings.heads}, got {settings.width}")


class AttentionHead(nn.Module):
    """Attention pooling of one block's tokens, then a linear classifier (the idea of the attention probe
    of Mukhopadhyay et al., "Do text-free diffusion models learn discriminative visual representations?").

    Args:
        width: the tokens are projected to this many channels before the attention.
        heads: attention heads of the learned query.
    """

    tokens = True

    def __init__(self, dim, num_classes, width: int = 128, heads: int = 4):
        super().__init__()
        self.project = nn.Linear(dim, width)
        self.pool = AttentionPool(width, heads)
        self.classify = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    check_settings = staticmethod(_check_width_and_heads)

    def forward(self, tokens):  # (B, T, C) -> (B, classes)
        return self.classify(self.pool(self.project(tokens)))


class FusionHead(nn.Module):
    """One classifier for several (timestep, block) cells: each cell's tokens projected to a common width
    and tagged with a learned embedding of their cell, one attention pooling over all of them, a linear
    classifier (the idea of DifFormer's fusion of blocks and noise levels, in its smallest form).

    Args:
        width, heads: as for ``AttentionHead``.
    """

    tokens = True
    fused = True

    def __init__(self, dims, num_classes, width: int = 128, heads: int = 4):
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(dim, width) for dim in dims)
        self.cell_embedding = nn.Parameter(torch.zeros(len(dims), width))
        self.pool = AttentionPool(width, heads)
        self.classify = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    check_settings = staticmethod(_check_width_and_heads)

    def forward(self, features):  # one (B, T_i, C_i) per cell -> (B, classes)
        tokens = torch.cat([project(feature) + embedding for project, feature, embedding
                            in zip(self.project, features, self.cell_embedding)], dim=1)  # (B, sum T_i, width)
        return self.classify(self.pool(tokens))


HEADS = {"linear": LinearHead, "mlp": MLPHead, "attention": AttentionHead, "fusion": FusionHead}


def head_class(name, path="linear.head"):
    """The head class ``name`` gives: a name of HEADS, or ``package.module.Class``."""
    return import_class(name, HEADS, "linear.head", path, "probe head class", base=nn.Module)


def takes_tokens(cls):
    """Whether heads of ``cls`` take (B, T, C) tokens rather than the pooled (B, C) vector."""
    return getattr(cls, "tokens", False)


def is_fused(cls):
    """Whether one head of ``cls`` covers every probed cell (else one head per cell)."""
    return getattr(cls, "fused", False)


class NoiseConditionalHead(nn.Module):
    """Classify a frozen feature (B, d) given the integer noise level of its input image.

    The level (DDPM timestep or EDM index) is embedded like the UNet embeds its time: d/4
    sinusoidal features, Linear(d/4 -> d), SiLU, Linear(d -> d). The embedding is added to the
    feature, then Linear(d -> 2d), SiLU, Linear(2d -> num_classes).

    Args:
        feature_dim: d, the channels of the probed block (a multiple of 8).
        num_classes: number of output logits.
    """

    def __init__(self, feature_dim, num_classes):
        super().__init__()
        if feature_dim % 8 or feature_dim < 16:
            raise ValueError(f"feature_dim must be a multiple of 8 and at least 16, got {feature_dim}")
        self.time_emb = TimeEmbedding(feature_dim // 4)
        self.classifier = nn.Sequential(nn.Linear(feature_dim, 2 * feature_dim), nn.SiLU(),
                                        nn.Linear(2 * feature_dim, num_classes))

    def forward(self, features, levels):
        """Logits (B, num_classes) for features (B, d) at integer levels (B,)."""
        return self.classifier(features + self.time_emb(levels))
