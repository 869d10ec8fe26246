"""A diffusers folder's own samplers: DDIM as diffusers' DDIMScheduler, ancestral sampling as its DDPMScheduler.

    sampler = SchedulerSampler(config, path)       # config: the folder's scheduler_config.json as a dict
    sampler.describe("DDIM", steps=50, eta=0.0)    # 'diffusers DDIMScheduler(...)'; a UserError for an option
                                                   # we do not run
    x = sampler.sample(diffusion.denoise, x_T, "DDIM", steps=50, eta=0.0, noise=noise)

Each scheduler reads the options it knows from the folder's config, with its own defaults for the missing ones,
as ``DDIMScheduler.from_config`` and ``DDPMScheduler.from_config`` do (DDIMPipeline turns a folder's
DDPMScheduler into a DDIMScheduler that way), and runs the steps diffusers' pipelines run with their defaults:
DDIM keeps the network's noise prediction after clipping x0 (``use_clipped_model_output=False``) and, at eta > 0,
draws noise at every step including the last; the ancestral sampler draws noise wherever the timestep is above 0.
Timesteps are diffusers' 0-based indices into ``alphas_cumprod``, index k being our timestep t = k + 1.
The network's output becomes (eps, x0) in ``denoise(x, t, schedule)`` (``DDPM.denoise``: the DDPM's prediction
target, which the folder's ``prediction_type`` set), with ``schedule``'s sqrtab and sqrtmab at t: the folder's
``alphas_cumprod[k] ** 0.5`` and ``(1 - alphas_cumprod[k]) ** 0.5``, so every operation is the one diffusers'
``step`` does for epsilon, sample and v_prediction alike. ``rescale_betas_zero_snr`` gives the last alphabar 0
(diffusers' rescale): a v or sample prediction is finite there, an epsilon one gives x0 = inf as in diffusers.
"""
import numpy as np
import torch

from utils.errors import UserError

# The options each scheduler reads, with diffusers' defaults (beta schedule and prediction are checked at load).
DDIM_OPTIONS = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": True,
                "clip_sample_range": 1.0}
DDPM_OPTIONS = {"timestep_spacing": "leading", "steps_offset": 0, "variance_type": "fixed_small",
                "clip_sample": True, "clip_sample_range": 1.0}
SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
# Options whose non-default value we refuse, with the default we run.
UNSUPPORTED = {"thresholding": False, "trained_betas": None}
# The DDPMScheduler keys that make alphas_cumprod.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr")
SCHEDULER_NAMES = {"DDIM": "DDIMScheduler", "DDPM": "DDPMScheduler"}


def inference_timesteps(n_T, steps, spacing, offset):
    """The descending timesteps (0-based) diffusers' ``set_timesteps(steps)`` gives for ``timestep_spacing``."""
    if spacing == "linspace":
        times = np.linspace(0, n_T - 1, steps).round()[::-1]
    elif spacing == "leading":
        times = (np.arange(steps) * (n_T // steps))[::-1] + offset
    else:  # trailing: from the last index down in float strides
        times = np.round(np.arange(n_T, 0, -n_T / steps)) - 1
    return [int(t) for t in times]


class SchedulerSampler:
    """The DDIM and ancestral samplers of a diffusers scheduler config.

    Args:
        config: the scheduler_config.json dict (num_train_timesteps, beta_start, beta_end, beta_schedule and
            the options above); a missing key takes diffusers' default.
        path: the file it came from, for messages.
    """

    def __init__(self, config, path):
        self.config = dict(config)
        self.path = path
        self.n_T = int(self.config.get("num_train_timesteps", 1000))
        from diffusers import DDPMScheduler  # the folder's alphas_cumprod, exactly as diffusers computes it

        self.alphas_cumprod = DDPMScheduler.from_config(self._known(self.config)).alphas_cumprod  # (n_T,) float32

    @staticmethod
    def _known(config):
        """The keys DDPMScheduler takes (from_config warns about the others)."""
        return {key: config[key] for key in SCHEDULE_KEYS if key in config}

    def options(self, mode):
        """The options of ``mode``'s scheduler: the folder's values over diffusers' defaults."""
        defaults = DDIM_OPTIONS if mode == "DDIM" else DDPM_OPTIONS
        return {key: self.config.get(key, default) for key, default in defaults.items()}

    def timesteps(self, mode, steps):
        """The descending timesteps of ``steps`` sampling steps (None: the ancestral sampler's n_T)."""
        options = self.options(mode)
        return inference_timesteps(self.n_T, self.n_T if steps is None else steps, options["timestep_spacing"],
                                   options["steps_offset"])

    def describe(self, mode, steps, eta):
        """The sampler in words for sampling.json, e.g. "diffusers DDIMScheduler(steps=100, eta=0.0, ...)"; a
        UserError naming the file and key for an option this sampler does not run."""
        for key, default in UNSUPPORTED.items():
            if self.config.get(key) not in (None, default):
                raise UserError(f"{self.path}: {key} {self.config[key]!r} is not supported by DDAE's diffusers "
                                f"samplers (they run {key} {default!r}); use a folder without it")
        options = self.options(mode)
        if options["timestep_spacing"] not in SPACINGS:
            raise UserError(f"{self.path}: timestep_spacing {options['timestep_spacing']!r} is not one of "
                            f"{', '.join(SPACINGS)}; fix the folder's scheduler config")
        if mode == "DDPM" and options["variance_type"] not in VARIANCES:
            raise UserError(f"{self.path}: variance_type {options['variance_type']!r} is not supported by DDAE's "
                            f"ancestral sampler (it runs {', '.join(VARIANCES)}); use --mode DDIM")
        steps = self.n_T if steps is None else steps
        times = self.timesteps(mode, steps)
        if not 0 <= min(times) <= max(times) < self.n_T:
            raise UserError(f"--steps {steps}: with {self.path}'s timestep_spacing {options['timestep_spacing']!r} "
                            f"and steps_offset {options['steps_offset']} the timesteps reach {max(times)}, past the "
                            f"last index {self.n_T - 1}; pass fewer --steps")
        settings = {"steps": steps, **({"eta": eta} if mode == "DDIM" else {}), **options}
        return f"diffusers {SCHEDULER_NAMES[mode]}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"

    def schedule(self, device):
        """sqrtab and sqrtmab of the folder's alphas_cumprod at our timesteps t = index + 1, as (n_T + 1,) tensors
        on ``device`` (t = 0, the clean image, is never read), computed as diffusers' ``step`` computes them."""
        alphas_cumprod = torch.cat([torch.ones(1), self.alphas_cumprod]).to(device)
        return {"sqrtab": alphas_cumprod ** 0.5, "sqrtmab": (1 - alphas_cumprod) ** 0.5}

    def sample(self, denoise, x, mode, steps, eta, noise):
        """Run ``mode`` ("DDIM" or "DDPM") from ``x`` (B, C, H, W) in [-1, 1] space; ``denoise(x, t, schedule) ->
        (eps, x0)`` as ``DDPM.denoise`` (x0 not clipped), asked at t = index + 1 with ``self.schedule``; ``noise``
        as in model/noise.py. Returns the final sample (not clipped)."""
        alphas_cumprod, schedule = self.alphas_cumprod.to(x.device), self.schedule(x.device)
        options = self.options(mode)
        times = self.timesteps(mode, steps)
        clip = options["clip_sample_range"] if options["clip_sample"] else None
        if mode == "DDIM":
            final = torch.tensor(1.0) if options["set_alpha_to_one"] else alphas_cumprod[0]
            stride = self.n_T // len(times)  # diffusers steps back by this whatever the spacing
            for t in times:
                eps, x0 = denoise(x, t + 1, schedule)
                x = self._ddim_step(x0, eps, alphas_cumprod[t], alphas_cumprod[t - stride] if t >= stride else final,
                                    eta, clip, noise)
            return x
        for t, previous in zip(times, times[1:] + [-1]):
            _, x0 = denoise(x, t + 1, schedule)
            x = self._ancestral_step(x, x0, alphas_cumprod[t],
                                     alphas_cumprod[previous] if previous >= 0 else torch.tensor(1.0),
                                     t > 0, options["variance_type"], clip, noise)
        return x

    @staticmethod
    def _ddim_step(x0, eps, alphabar, alphabar_prev, eta, clip, noise):
        """One DDIM step (Song et al. 2021, eq. 12) from alphabar to alphabar_prev with the predicted x0 (clipped
        to ``clip``) and eps."""
        x0 = x0 if clip is None else x0.clamp(-clip, clip)
        variance = (1 - alphabar_prev) / (1 - alphabar) * (1 - alphabar / alphabar_prev)
        sigma = eta * variance ** 0.5
        x = alphabar_prev ** 0.5 * x0 + (1 - alphabar_prev - sigma ** 2) ** 0.5 * eps
        return x + sigma * noise(x.shape[1:]) if eta > 0 else x

    @staticmethod
    def _ancestral_step(x, x0, alphabar, alphabar_prev, add_noise, variance_type, clip, noise):
        """One step of the posterior q(x_prev | x, x0) (Ho et al. 2020, eq. 7) with the predicted x0, clipped."""
        alpha = alphabar / alphabar_prev
        beta = 1 - alpha
        x0 = x0 if clip is None else x0.clamp(-clip, clip)
        mean = (alphabar_prev ** 0.5 * beta / (1 - alphabar)) * x0 + (alpha ** 0.5 * (1 - alphabar_prev)
                                                                       / (1 - alphabar)) * x
        if not add_noise:
            return mean
        posterior = torch.clamp((1 - alphabar_prev) / (1 - alphabar) * beta, min=1e-20)
        if variance_type == "fixed_small":
            std = posterior ** 0.5
        elif variance_type == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(posterior))
        else:  # fixed_large: the step's beta
            std = beta ** 0.5
        return mean + std * noise(x.shape[1:])
