"""The training objective's three seams: what the network predicts, how the loss is weighted per sample, and
how training draws its timesteps (noise levels). Each is a key of the ``diffusion`` section that takes a short
name of a registry below or the import path of your own (``package.module.name``, as heads and networks):

    diffusion: {prediction: v, loss_weighting: min_snr, loss_weighting_args: {gamma: 5.0},
                t_sampling: logit_normal, t_sampling_args: {loc: 0.0, scale: 1.0}}

Contracts (docs/DESIGN.md, "Training objective"):

- a prediction target is a class (or module) with ``target(x0, eps, sqrtab, sqrtmab)``, what the network is
  trained to output; ``eps_and_x0(x_t, output, sqrtab, sqrtmab) -> (eps, x0)``, what an output means; and
  ``x0_loss_scale(snr)``, how much its squared error weighs against the x0 error (min-SNR divides by it).
  x_t = sqrtab x0 + sqrtmab eps, with sqrtab^2 + sqrtmab^2 = 1.
- a loss weighting is ``weighting(diffusion, t, **loss_weighting_args)`` -> a (B,) weight per sample, or None
  for the plain mean squared error; ``t`` is what the timestep distribution drew (DDPM: integer timesteps;
  EDM: sigmas), ``diffusion.snr(t)`` its signal-to-noise ratio.
- a timestep distribution is ``draw(diffusion, batch_size, device, **t_sampling_args)`` -> (B,) timesteps
  (DDPM: integers in 1..n_T; EDM: sigmas > 0).
"""
import inspect

import torch

from utils.config import find_entry
from utils.errors import UserError


class EpsPrediction:
    """The network predicts the noise (the original DDAE, DDPM)."""

    @staticmethod
    def target(x0, eps, sqrtab, sqrtmab):
        return eps

    @staticmethod
    def eps_and_x0(x_t, output, sqrtab, sqrtmab):
        return output, (x_t - sqrtmab * output) / sqrtab

    @staticmethod
    def x0_loss_scale(snr):
        return snr  # |eps - eps'|^2 = snr |x0 - x0'|^2


class X0Prediction:
    """The network predicts the clean image."""

    @staticmethod
    def target(x0, eps, sqrtab, sqrtmab):
        return x0

    @staticmethod
    def eps_and_x0(x_t, output, sqrtab, sqrtmab):
        return (x_t - sqrtab * output) / sqrtmab, output

    @staticmethod
    def x0_loss_scale(snr):
        return torch.ones_like(snr)


class VPrediction:
    """The network predicts the velocity v = sqrtab eps - sqrtmab x0 (Salimans & Ho 2022)."""

    @staticmethod
    def target(x0, eps, sqrtab, sqrtmab):
        return sqrtab * eps - sqrtmab * x0

    @staticmethod
    def eps_and_x0(x_t, output, sqrtab, sqrtmab):
        return sqrtmab * x_t + sqrtab * output, sqrtab * x_t - sqrtmab * output

    @staticmethod
    def x0_loss_scale(snr):
        return snr + 1  # |v - v'|^2 = (snr + 1) |x0 - x0'|^2


def no_weighting(diffusion, t):
    """The plain mean squared error (the original's DDPM loss)."""
    return None


def min_snr(diffusion, t, gamma: float = 5.0):
    """Min-SNR-gamma (Hang et al. 2023): the x0 error weighted by min(snr, gamma), written for the prediction
    target: eps min(snr, gamma) / snr, x0 min(snr, gamma), v min(snr, gamma) / (snr + 1)."""
    snr = diffusion.snr(t)
    return snr.clamp(max=gamma) / diffusion.prediction_target.x0_loss_scale(snr)


def edm_weighting(diffusion, sigma):
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022)."""
    return (sigma ** 2 + diffusion.sigma_data ** 2) / (sigma * diffusion.sigma_data) ** 2


def uniform_timesteps(diffusion, batch_size, device):
    """Timesteps uniform on 1..n_T: the original's draw, bit for bit."""
    return torch.randint(1, diffusion.n_T + 1, (batch_size,), device=device)


def logit_normal_timesteps(diffusion, batch_size, device, loc: float = 0.0, scale: float = 1.0):
    """u = sigmoid(loc + scale z), z standard normal (Esser et al. 2024), on DDPM's steps: timestep k of
    1..n_T takes u in [(k - 1) / n_T, k / n_T), i.e. floor(u n_T) + 1 (u = 1, reachable in float32, is n_T).
    u near 1 is the noisy end; loc > 0 draws noisier timesteps."""
    u = torch.sigmoid(loc + scale * torch.randn(batch_size, device=device))
    return (u * diffusion.n_T).long().clamp(max=diffusion.n_T - 1) + 1


def log_normal_sigmas(diffusion, batch_size, device):
    """EDM's ln(sigma) ~ N(p_mean, p_std^2), bit for bit the original's draw."""
    return (torch.randn((batch_size, 1, 1, 1), device=device) * diffusion.p_std + diffusion.p_mean).exp().flatten()


PREDICTIONS = {"eps": EpsPrediction, "x0": X0Prediction, "v": VPrediction}
DDPM_WEIGHTINGS = {"none": no_weighting, "min_snr": min_snr}
DDPM_T_SAMPLINGS = {"uniform": uniform_timesteps, "logit_normal": logit_normal_timesteps}
EDM_WEIGHTINGS = {"edm": edm_weighting, "min_snr": min_snr, "none": no_weighting}
EDM_T_SAMPLINGS = {"log_normal": log_normal_sigmas}

# key -> (what it names, the leading parameters of a function that are not its *_args keys)
SEAMS = {"prediction": ("prediction target class", None), "loss_weighting": ("loss weighting function", 2),
         "t_sampling": ("timestep distribution function", 3)}


def resolve(name, registry, key, owner):
    """The object ``name`` gives for ``diffusion.key``; a UserError naming ``owner`` (the diffusion class) if none."""
    entry, problem = find_entry(name, registry, SEAMS[key][0])
    if problem:
        raise UserError(f"{owner.__name__}: key 'diffusion.{key}' {problem}")
    return entry


def check_seams(settings, registries, require):
    """At config load: each seam key names an entry (``registries``: key -> registry) whose signature takes its
    ``*_args`` keys, a prediction target has its three methods, and the built-ins' values are in range."""
    for key, registry in registries.items():
        what, fixed = SEAMS[key]
        name = getattr(settings, key)  # a class that lacks the key: one line naming it (utils.config.MissingKey)
        entry, problem = find_entry(name, registry, what)
        require(problem is None, f"diffusion.{key}", problem)
        if fixed is None:
            missing = [m for m in ("target", "eps_and_x0", "x0_loss_scale") if not hasattr(entry, m)]
            require(not missing, f"diffusion.{key}", f"{name!r} lacks {', '.join(missing)}; a prediction "
                                                     f"target has target, eps_and_x0 and x0_loss_scale "
                                                     f"(model/objectives.py)")
            continue
        args = getattr(settings, f"{key}_args")
        parameters = list(inspect.signature(entry).parameters.values())[fixed:]
        try:
            inspect.signature(entry).bind(*[None] * fixed, **args)
        except TypeError:
            takes = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            require(False, f"diffusion.{key}_args", f"{args} does not fit {name!r}, which takes "
                                                    f"{', '.join(takes) or 'no arguments'}")
        if entry is min_snr:
            require(args.get("gamma", 5.0) > 0, f"diffusion.{key}_args", f"gamma must be positive, got {args}")
        if entry is logit_normal_timesteps:
            require(args.get("scale", 1.0) > 0, f"diffusion.{key}_args", f"scale must be positive, got {args}")
