"""Classifier guidance by the model's own DDAE head: the noise-conditional MLP that noisy_classifier_DDAE.py
trains on a frozen DDPM's features classifies the model's own x_t, so its gradient steers that model's samplers
toward a class (Dhariwal & Nichol 2021; the arithmetic of openai/guided-diffusion's cond_fn, condition_score and
condition_mean).

    guidance = load_head_guidance(head_path, checkpoint, diffusion, class_index=3, scale=2.0)
    images = diffusion.sample(16, (3, 16, 16), guidance=guidance)               # DDIM
    images = diffusion.sample(16, (3, 16, 16), mode="DDPM", guidance=guidance)  # ancestral

``guidance(x_t, t)`` is scale * grad_{x_t} log p(class | x_t) at integer timestep t. The samplers add it as
guided-diffusion does: DDIM shifts the noise prediction, eps' = eps - sqrt(1 - alphabar_t) * guidance (the score
of p(x_t) p(class | x_t)^scale); the ancestral samplers shift the mean of p(x_{t-1} | x_t) by its variance times
guidance. The gradient runs through the network's feature pass at (x_t, t) up to the head's block, then the head;
neither is trained.

The head is one network for every noise level: its time embedding takes the integer timestep, and training drew
timesteps uniformly from 1..n_T, so there is no grid of trained levels to round to: each sampler step asks the
head at its own timestep t, the one the network is called with (a respaced or DDIM step's t is one of 1..n_T).
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

from model.ddpm import pool_features
from model.heads import NoiseConditionalHead
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.provenance import file_sha256, weights_identity

HEAD_KEYS = ("head", "feature_dim", "blockname", "weights")  # what noisy_classifier_DDAE.py saves in head.pth
MAKE_HEAD = "python noisy_classifier_DDAE.py --config CONFIG --ckpt {checkpoint}"


class HeadGuidance(nn.Module):
    """scale * grad_{x_t} log p(class_index | x_t) from a noise-conditional head on a DDPM network's block.

    Args:
        nn_model: the diffusion network (``forward_features(x, t / n_T, [blockname])``), frozen.
        head: a ``NoiseConditionalHead`` trained on the average-pooled ``blockname`` feature.
        blockname: the probed block.
        class_index: the class K to steer toward.
        scale: S; 0 leaves the samplers unguided, a negative S steers away from K.
        n_T: the diffusion's steps (the network takes t / n_T).
    """

    def __init__(self, nn_model, head, blockname, class_index, scale, n_T):
        super().__init__()
        self.nn_model, self.head = nn_model, head
        self.blockname, self.class_index, self.scale, self.n_T = blockname, int(class_index), float(scale), int(n_T)

    def log_prob(self, x, t):
        """(B,) float32 (float64 for a float64 model) log p(class_index | x_t) for x (B, C, H, W) in the sampler's [-1, 1] scale at integer t."""
        batch = x.shape[0]
        t_input = torch.full((batch,), t / self.n_T, device=x.device, dtype=x.dtype)
        activations = self.nn_model.forward_features(x, t_input, [self.blockname])
        features = pool_features(activations, self.blockname, False, self.nn_model.feature_axis)  # (B, d)
        levels = torch.full((batch,), t, device=x.device, dtype=torch.long)
        logits = self.head(features.to(next(self.head.parameters()).dtype), levels)  # (B, classes)
        return F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))[:, self.class_index]

    def forward(self, x, t):
        """scale * grad_{x_t} log p(class | x_t), in x's dtype; computed with gradients on inside a no_grad sampler."""
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x_in, t).sum(), x_in)
        return self.scale * grad.to(x.dtype)

    def describe(self):
        return f"classifier guidance toward class {self.class_index}, scale {self.scale}"


def read_head(path):
    """The dict of a head.pth written by noisy_classifier_DDAE.py; a UserError naming ``--classifier_head``."""
    fix = "pass the head.pth that noisy_classifier_DDAE.py wrote (save_dir/noisy_DDAE_*/head.pth)"
    if not os.path.isfile(path):
        raise UserError(f"--classifier_head {path}: no such file; {fix}")
    try:
        record = load_checkpoint(path)
    except UserError as err:
        raise UserError(f"--classifier_head {path} is not a readable head file ({err}); {fix}") from None
    missing = [key for key in HEAD_KEYS if key not in record]
    if missing:
        raise UserError(f"--classifier_head {path} has no '{missing[0]}' entry, so it is not a head of "
                        f"noisy_classifier_DDAE.py; {fix}")
    return record


def load_head_guidance(path, checkpoint, diffusion, class_index, scale):
    """A ``HeadGuidance`` from ``path`` for the DDPM ``diffusion`` loaded from ``checkpoint``.

    Refuses, in one line each: a file that is no head of noisy_classifier_DDAE.py, a head trained on other
    weights than ``checkpoint``'s (by their SHA-256), a head of another block or width, and a class outside
    0..classes-1.

    Returns:
        (guidance on the diffusion's device, frozen; {"head", "head_sha256", "class", "scale"} for sampling.json).
    """
    record = read_head(path)
    identity = weights_identity(checkpoint)
    trained_on = record["weights"]
    if not isinstance(trained_on, dict) or trained_on.get("sha256") != identity["sha256"]:
        what = (f"{trained_on.get('path')} (sha256 {str(trained_on.get('sha256'))[:12]}...)"
                if isinstance(trained_on, dict) else "unrecorded weights")
        raise UserError(f"--classifier_head {path} was trained on {what}, not on {identity['path']} (sha256 "
                        f"{identity['sha256'][:12]}...); train a head on this model: "
                        f"{MAKE_HEAD.format(checkpoint=checkpoint)}")
    blockname, feature_dim = record["blockname"], int(record["feature_dim"])
    if blockname not in diffusion.nn_model.block_names:
        raise UserError(f"--classifier_head {path} reads block {blockname!r}, which this network lacks; pass a "
                        f"head of this model")
    state = record["head"]
    num_classes = state["classifier.2.weight"].shape[0] if "classifier.2.weight" in state else 0
    head = NoiseConditionalHead(feature_dim, max(num_classes, 1))
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"--classifier_head {path}: its weights do not fit a noise-conditional head of width "
                        f"{feature_dim} ({str(err).splitlines()[0]}); pass a head.pth of noisy_classifier_DDAE.py") \
            from None
    if not 0 <= class_index < num_classes:
        raise UserError(f"--class {class_index}: the head classifies {num_classes} classes; pass --class 0 to "
                        f"{num_classes - 1}")
    if not torch.isfinite(torch.tensor(float(scale))):
        raise UserError(f"--classifier_scale {scale}: pass a finite number (0 is unguided)")
    device = next(diffusion.nn_model.parameters()).device
    head = head.to(device).eval().requires_grad_(False)
    diffusion.nn_model.requires_grad_(False)  # gradients flow to x_t only
    guidance = HeadGuidance(diffusion.nn_model, head, blockname, class_index, scale, diffusion.n_T)
    described = {"head": os.path.abspath(path), "head_sha256": file_sha256(path), "class": int(class_index),
                 "scale": float(scale)}
    return guidance, described
