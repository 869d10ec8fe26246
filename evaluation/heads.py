"""Probe heads trained together, one per probed (timestep, block) cell or one for them all, and their test
accuracy.

    heads = ProbeHeads(feature_dims(diffusion, cfg.image_shape), timesteps, blocks, cfg.classes,
                       head_class(cfg.linear.head), cfg.linear.head_args)
    features = extract_grid_features(diffusion, x0, heads.timesteps, heads.blocks, tokens=heads.tokens)
    logits = heads([features[cell] for cell in heads.cells])   # (n_heads, B, classes)
"""
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.accuracy import AccuracyCounter
from evaluation.cells import cell_label
from evaluation.features import extract_grid_features
from evaluation.frozen import to_device
from model.heads import LinearHead, is_fused, takes_tokens

FUSED_LABEL = "fused"  # the one head of a fused head class, in result tables


class ProbeHeads(nn.Module):
    """The probe heads of every probed (timestep, block) cell, trained together: one head per cell, or one
    head for all of them when the head class is fused (model/heads.py).

    Args:
        dims: ``{block: channels}`` (see ``model.models.feature_dims``).
        timesteps, blocks: the probed cells are every (timestep, block) pair, in that order.
        num_classes: outputs of each head.
        head: the head class (``model.heads.head_class(cfg.linear.head)``); the original's linear one by default.
        settings: its keyword settings (``cfg.linear.head_args``).

    ``cells`` lists the (t, block) pairs; ``forward`` takes one feature per cell in that order, (B, C) or,
    when ``tokens``, (B, T, C), and returns (n_heads, B, num_classes) logits; ``labels`` names the heads.
    """

    def __init__(self, dims, timesteps, blocks, num_classes, head=LinearHead, settings=None):
        super().__init__()
        self.timesteps = [int(t) for t in timesteps]
        self.blocks = list(blocks)
        self.cells = [(t, block) for t in self.timesteps for block in self.blocks]
        self.num_classes = num_classes
        self.tokens, self.fused = takes_tokens(head), is_fused(head)
        settings = dict(settings or {})
        if self.fused:
            self.heads = nn.ModuleList([head([dims[block] for _, block in self.cells], num_classes, **settings)])
        else:
            self.heads = nn.ModuleList(head(dims[block], num_classes, **settings) for _, block in self.cells)

    @property
    def labels(self):
        return [FUSED_LABEL] if self.fused else [cell_label(t, block) for t, block in self.cells]

    def forward(self, features):
        if self.fused:
            return self.heads[0](list(features))[None]
        return torch.stack([head(feature) for head, feature in zip(self.heads, features)])

    def losses(self, logits, labels):
        """Cross-entropy of every head: (n_heads, B, classes) logits and (B,) labels -> (n_heads,)."""
        n_cells, batch = logits.shape[:2]
        per_image = F.cross_entropy(logits.flatten(0, 1), labels.repeat(n_cells), reduction="none")
        return per_image.view(n_cells, batch).mean(dim=1)


@torch.no_grad()
def evaluate_heads(diffusion, heads, loader, device, precision="fp32"):
    """Test accuracy of every head, over all processes, each test image counted once.

    Args:
        diffusion: the frozen model the features come from (fresh noise per batch).
        heads: a ``ProbeHeads`` (not the DDP wrapper).
        loader: this process's shard of the test set (``utils.data.build_loader(train=False)``).

    Returns:
        (accuracy list in percent, one per head; number of test images counted over all processes).
    """
    was_training = heads.training
    heads.eval()
    counter = AccuracyCounter(len(heads.labels), device)
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        features = extract_grid_features(diffusion, images, heads.timesteps, heads.blocks, precision=precision,
                                         tokens=heads.tokens, labels=labels)
        counter.update(heads([features[cell] for cell in heads.cells]), labels)
    heads.train(was_training)
    return counter.reduce()
