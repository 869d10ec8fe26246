"""Probe heads trained together, one per probed (timestep, block) cell or one for them all, and their test
accuracy.

    heads = ProbeHeads(feature_dims(diffusion, cfg.image_shape), timesteps, blocks, cfg.classes,
                       head_class(cfg.linear.head), cfg.linear.head_args, name=cfg.linear.head)
    check_heads(heads, diffusion, test_set, device)  # before training: a head that cannot train is one line
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
from utils.errors import UserError, describe_error

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
        name: how the user named the head (``cfg.linear.head``), for messages; default: its import path.

    ``cells`` lists the (t, block) pairs; ``forward`` takes one feature per cell in that order, (B, C) or,
    when ``tokens``, (B, T, C), and returns (n_heads, B, num_classes) logits; ``labels`` names the heads.
    """

    def __init__(self, dims, timesteps, blocks, num_classes, head=LinearHead, settings=None, name=None):
        super().__init__()
        path = f"{head.__module__}.{head.__qualname__}"
        self.what = f"linear.head {path}" if name in (None, path) else f"linear.head {name} ({path})"
        self.timesteps = [int(t) for t in timesteps]
        self.blocks = list(blocks)
        self.cells = [(t, block) for t in self.timesteps for block in self.blocks]
        self.num_classes = num_classes
        self.tokens, self.fused = takes_tokens(head), is_fused(head)
        settings = dict(settings or {})
        try:
            if self.fused:
                self.heads = nn.ModuleList([head([dims[block] for _, block in self.cells], num_classes, **settings)])
            else:
                self.heads = nn.ModuleList(head(dims[block], num_classes, **settings) for _, block in self.cells)
        except Exception as err:  # a researcher's class: any error of its constructor is theirs to fix
            called = f"{head.__name__}({'channels of every cell' if self.fused else 'channels'}, {num_classes}" + \
                     "".join(f", {key}={value!r}" for key, value in settings.items()) + ")"
            raise UserError(f"{self.what}: {called} failed ({describe_error(err)}); give the class the probe head "
                            f"contract of docs/DESIGN.md") from None
        if not any(p.requires_grad for p in self.parameters()):
            raise UserError(f"{self.what}: the head has no trainable parameters, so the probe would learn nothing; "
                            f"give it a layer with weights (e.g. an nn.Linear)")

    @property
    def labels(self):
        return [FUSED_LABEL] if self.fused else [cell_label(t, block) for t, block in self.cells]

    def forward(self, features):
        if self.fused:
            return self.heads[0](list(features))[None]
        return torch.stack([head(feature) for head, feature in zip(self.heads, features)])

    @torch.no_grad()
    def check(self, features):
        """One forward of every head on ``features`` (one per cell, a batch of B): a UserError naming the head
        when its forward raises or returns anything but (B, num_classes) logits."""
        batch, wanted = features[0].shape[0], (features[0].shape[0], self.num_classes)
        for head, feature in ([(self.heads[0], list(features))] if self.fused else zip(self.heads, features)):
            try:
                logits = head(feature)
            except Exception as err:
                raise UserError(f"{self.what}: its forward fails on a batch of {batch} ({describe_error(err)}); "
                                f"fix its forward") from None
            got = f"shape {tuple(logits.shape)}" if torch.is_tensor(logits) else f"a {type(logits).__name__}"
            if not torch.is_tensor(logits) or tuple(logits.shape) != wanted:
                raise UserError(f"{self.what}: its forward returns {got} for a batch of {batch}, not "
                                f"(batch, classes) = {wanted}; fix its forward")

    def losses(self, logits, labels):
        """Cross-entropy of every head: (n_heads, B, classes) logits and (B,) labels -> (n_heads,)."""
        n_cells, batch = logits.shape[:2]
        per_image = F.cross_entropy(logits.flatten(0, 1), labels.repeat(n_cells), reduction="none")
        return per_image.view(n_cells, batch).mean(dim=1)


def check_heads(heads, diffusion, dataset, device, precision="fp32"):
    """Run ``heads.check`` on the features of the first images of ``dataset`` (2, or 3 for 2 classes, so
    that a (classes, batch) output is told apart), before any training. Its feature pass draws noise from
    torch's generator: the caller seeds the run after it."""
    size = min(3 if heads.num_classes == 2 else 2, len(dataset))
    images, labels = to_device(torch.stack([torch.as_tensor(dataset[i][0]) for i in range(size)]),
                               torch.as_tensor([int(dataset[i][1]) for i in range(size)]), device)
    was_training = heads.training
    heads.eval()
    features = extract_grid_features(diffusion, images, heads.timesteps, heads.blocks, precision=precision,
                                     tokens=heads.tokens, labels=labels)  # as training reads them (--feature_label)
    heads.check([features[cell] for cell in heads.cells])
    heads.train(was_training)


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
