"""Linear heads trained together, one per probed (timestep, block) cell, and their test accuracy.

    heads = ProbeHeads(feature_dims(diffusion, cfg.image_shape), timesteps, blocks, cfg.classes)
    logits = heads([features[cell] for cell in heads.cells])   # (n_cells, B, classes)
"""
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.accuracy import AccuracyCounter
from evaluation.cells import cell_label
from evaluation.features import extract_grid_features
from evaluation.frozen import to_device


class ProbeHeads(nn.Module):
    """One linear classifier per probed (timestep, block) cell, trained together.

    Args:
        dims: ``{block: channels}`` (see ``model.models.feature_dims``).
        timesteps, blocks: the probed cells are every (timestep, block) pair, in that order.
        num_classes: outputs of each head.

    ``cells`` lists the (t, block) pairs in the order of the heads; ``forward`` takes one (B, C)
    feature per cell in that order and returns (n_cells, B, num_classes) logits.
    """

    def __init__(self, dims, timesteps, blocks, num_classes):
        super().__init__()
        self.timesteps = [int(t) for t in timesteps]
        self.blocks = list(blocks)
        self.cells = [(t, block) for t in self.timesteps for block in self.blocks]
        self.num_classes = num_classes
        self.heads = nn.ModuleList(nn.Linear(dims[block], num_classes) for _, block in self.cells)

    @property
    def labels(self):
        return [cell_label(t, block) for t, block in self.cells]

    def forward(self, features):
        return torch.stack([head(feature) for head, feature in zip(self.heads, features)])

    def losses(self, logits, labels):
        """Cross-entropy of every head: (n_cells, B, classes) logits and (B,) labels -> (n_cells,)."""
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
        (accuracy list in percent, one per cell; number of test images counted over all processes).
    """
    was_training = heads.training
    heads.eval()
    counter = AccuracyCounter(len(heads.cells), device)
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        features = extract_grid_features(diffusion, images, heads.timesteps, heads.blocks, precision=precision)
        counter.update(heads([features[cell] for cell in heads.cells]), labels)
    heads.train(was_training)
    return counter.reduce()
