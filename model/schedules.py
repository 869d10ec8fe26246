"""The named noise schedules of DDPM, in one place: add an entry to SCHEDULES for a new one.

    schedule = make_schedule(1e-4, 0.02, 1000, leading_zero=True, kind="cosine")   # {"alphabar_t": (1001,), ...}
    schedule = make_schedule(1e-4, 0.02, 1000, True, "linear", zero_terminal_snr=True)   # alphabar_T = 0

Timestep t runs over 1..T and index 0 is the clean image (alphabar_0 = 1, the leading zero beta).
"""
import math

import torch

SCHEDULE_KEYS = ("alpha_t", "oneover_sqrta", "sqrt_beta_t", "alphabar_t", "sqrtab", "sqrtmab", "ma_over_sqrtmab")


def linear_betas(beta1, beta2, T, leading_zero):
    """The original's betas, linear from ``beta1`` to ``beta2``: T of them after a zero (leading_zero, the
    "DDPM" schedule), or T + 1 (the "DDIM" schedule of its DDIM sampler)."""
    if leading_zero:
        return torch.cat([torch.zeros(1), torch.linspace(beta1, beta2, T)])
    return torch.linspace(beta1, beta2, T + 1)


def cosine_betas(beta1, beta2, T, leading_zero):
    """improved-diffusion's cosine schedule (diffusers' ``squaredcos_cap_v2``): alphabar(s) = f(s) / f(0),
    f(s) = cos^2((s + 0.008) / 1.008 * pi / 2) with s = t / T, betas clipped at 0.999; computed in float64.
    Our timestep t is its index t - 1 after the leading zero. ``beta1`` and ``beta2`` are not used, and the
    DDIM sampler uses this same schedule (``leading_zero`` is ignored)."""
    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    return torch.tensor([0.0] + betas, dtype=torch.float64)


def scaled_linear_betas(beta1, beta2, T, leading_zero):
    """Latent diffusion's schedule (diffusers' ``scaled_linear``): betas whose square roots run linearly
    from sqrt(``beta1``) to sqrt(``beta2``), after the leading zero; the DDIM sampler uses this same
    schedule (``leading_zero`` is ignored)."""
    roots = torch.linspace(beta1 ** 0.5, beta2 ** 0.5, T, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), roots ** 2])


def minimal_cosine_betas(beta1, beta2, T, leading_zero):
    """The cosine schedule of the author's sister codebase (FutureXiang/Diffusion, "Minimal Diffusion"; its
    ``betas: 'cosine'``): ``cosine_betas``' formula in float32, T betas after a zero for the "DDPM" schedule but
    T + 1 of them for the "DDIM" one (as the original's linear schedule), so its DDIM samples as its own does.
    ``beta1`` and ``beta2`` are not used."""
    steps = T + (0 if leading_zero else 1)
    s = torch.linspace(0, steps, steps + 1) / steps
    alphabar = torch.cos((s + 0.008) / 1.008 * math.pi * 0.5) ** 2
    betas = torch.clip(1 - alphabar[1:] / alphabar[:-1], 0, 0.999)
    return torch.cat([torch.zeros(1), betas]) if leading_zero else betas


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas,
             "minimal_cosine": minimal_cosine_betas}


def rescale_zero_terminal_snr(alphabar):
    """Lin et al. 2024's zero terminal SNR (their Algorithm 1; diffusers' ``rescale_betas_zero_snr``) of a (T + 1,)
    alphabar: sqrt(alphabar) over indices 1..T shifted so that the last is 0 and scaled so that the first is
    unchanged; index 0 is kept. Float64; alphabar_T is exactly 0."""
    root = alphabar[1:].double().sqrt()
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))  # a new tensor: first and last keep their values
    return torch.cat([alphabar[:1].double(), root ** 2])


def make_schedule(beta1, beta2, T, leading_zero, kind="linear", zero_terminal_snr=False):
    """The noise schedule ``kind`` of SCHEDULES over T steps, as (T + 1,) float32 tensors; with
    ``zero_terminal_snr`` rescaled so that alphabar_T = 0 (``rescale_zero_terminal_snr``), each beta_t then
    1 - alphabar_t / alphabar_{t-1} (beta_T = 1, so ``oneover_sqrta`` is inf at T).

    Returns:
        dict of the entries in SCHEDULE_KEYS. ``ma_over_sqrtmab`` is (1 - alpha) / sqrt(1 - alphabar),
        NaN at t = 0 when beta_0 = 0, which no sampler reads.
    """
    # The linear one is float32 throughout, alphabar as exp(cumsum(log alpha)): this reproduces the
    # original's values (a float64 computation differs from them by up to 1e-4 relative in sqrtmab at small t).
    beta = SCHEDULES[kind](beta1, beta2, T, leading_zero)
    alpha = 1 - beta
    alphabar = torch.exp(torch.cumsum(torch.log(alpha), dim=0)) if beta.dtype == torch.float32 \
        else torch.cumprod(alpha, dim=0)
    if zero_terminal_snr:
        alphabar = rescale_zero_terminal_snr(alphabar)
        alpha = torch.cat([alpha[:1].double(), alphabar[1:] / alphabar[:-1]])
        beta = 1 - alpha
    sqrtmab = torch.sqrt(1 - alphabar)
    schedule = {
        "alpha_t": alpha,
        "oneover_sqrta": 1 / torch.sqrt(alpha),
        "sqrt_beta_t": torch.sqrt(beta),
        "alphabar_t": alphabar,
        "sqrtab": torch.sqrt(alphabar),
        "sqrtmab": sqrtmab,
        "ma_over_sqrtmab": (1 - alpha) / sqrtmab,
    }
    return {key: value.to(torch.float32) for key, value in schedule.items()}


def published_index(t, n_T, batch_size):
    """The 0-based index into a published model's n_T-step schedule (diffusers', OpenAI's) of our ``t / n_T``
    (a scalar or (B,) tensor): round(t * n_T) - 1, so that our t = 1 is index 0; a (batch_size,) float tensor.
    Rounded, not truncated: t / n_T * n_T is not always an integer in float32 (t = 251 of 1000)."""
    index = torch.round(torch.as_tensor(t).float() * n_T) - 1
    return index.expand(batch_size) if index.dim() == 0 else index
