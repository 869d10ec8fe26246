"""EDM (Karras et al. 2022): preconditioned denoiser, training loss, features and the Heun sampler.

    diffusion = EDM(UNet(**cfg.network), **cfg.diffusion)
    loss = diffusion(x0)                              # x0 in [0, 1]
    feats = diffusion.get_feature(x0, t=4)            # noise level: index 4 of 18, counted from 0 = clean
    images = diffusion.sample(16, (3, 32, 32))        # Heun, 18 steps (35 network calls), in [0, 1]
"""
import math

import torch
from torch import nn

from model.amp import network_only
from model.ddpm import pool_features, requested_blocks
from model.noise import noise_like, starting_noise
from model.objectives import EDM_T_SAMPLINGS, EDM_WEIGHTINGS, X0Prediction, check_seams, resolve
from utils.errors import UserError
from utils.noisy import EDM_STEPS, eval_levels

AUGMENT_LABELS = 9  # labels per image produced by model.augment.AugmentPipe


def karras_schedule(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's noise levels for ``steps`` steps, sigma_max down to sigma_min, then 0: (steps + 1,) float64."""
    if steps < 2:
        raise ValueError(f"EDM needs at least 2 sampling steps, got {steps}")
    # The endpoints' rho-th roots are taken in float32 and the interpolation in float64: this
    # gives the original's values bit for bit (sigma_0 = 80.000018, not 80).
    inv_rho = torch.tensor(1 / rho, dtype=torch.float32)
    root_max = torch.tensor(sigma_max, dtype=torch.float32).pow(inv_rho).double()
    root_min = torch.tensor(sigma_min, dtype=torch.float32).pow(inv_rho).double()
    fraction = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    sigmas = (root_max + fraction * (root_min - root_max)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


class EDM(nn.Module):
    """Denoising diffusion in the EDM formulation around a network F(c_in x, c_noise, aug).

    Args:
        nn_model: network called as ``nn_model(x, c_noise, aug)``; for features it also needs
            ``forward_features(x, c_noise, names)`` and ``block_names`` (see model/unet.py).
        sigma_data: standard deviation of the data.
        p_mean, p_std: ln(sigma) ~ N(p_mean, p_std^2) during training.
        sigma_min, sigma_max, rho: the sampling schedule.
        S_min, S_max, S_noise: noise levels where the sampler adds churn, and its noise inflation.
        augment_prob: probability of each geometric augmentation in training (0 turns it off); the
            augmentation labels condition the network, which then needs ``augment_dim = 9``.
        loss_weighting, loss_weighting_args: the per-sample weight of the denoiser's squared error: "edm"
            (lambda(sigma), the original's), "min_snr" ({gamma}, snr = 1 / sigma^2, the denoiser being an x0
            prediction), "none", or an import path; and its keywords. Training only.
        t_sampling, t_sampling_args: the training noise levels: "log_normal" (ln sigma ~ N(p_mean, p_std^2),
            the original's) or an import path returning (B,) sigmas; and its keywords. Training only.

    Images are in [0, 1] outside this class and in [-1, 1] inside. Precision and the zero labels when
    augmentation is off: docs/DESIGN.md, Augmentation contract.
    """

    probe_grid = (3, 4, 5)  # the original's --grid: indices into the FEATURE_STEPS-step schedule
    FEATURE_STEPS = EDM_STEPS  # a feature timestep (linear.timestep) indexes this many steps of the schedule
    # What the network learnt (a checkpoint refuses other values); the sampler's keys are free.
    TRAINING_KEYS = ("sigma_data", "p_mean", "p_std", "augment_prob")
    # How it was trained: a resume refuses other values; sampling and probing ignore them.
    TRAINING_ONLY_KEYS = ("loss_weighting", "loss_weighting_args", "t_sampling", "t_sampling_args")
    SAMPLER = "EDM"  # Heun's sampler, in labels
    SEAMS = {"loss_weighting": EDM_WEIGHTINGS, "t_sampling": EDM_T_SAMPLINGS}
    prediction_target = X0Prediction  # the denoiser D(x; sigma) predicts the clean image

    def __init__(self, nn_model, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, S_min: float = 0.01,
                 S_max: float = 1.0, S_noise: float = 1.007, augment_prob: float = 0.0, loss_weighting: str = "edm",
                 loss_weighting_args: dict = {}, t_sampling: str = "log_normal", t_sampling_args: dict = {}):
        super().__init__()
        self.loss_weighting, self.t_sampling = loss_weighting, t_sampling
        self.loss_weighting_args, self.t_sampling_args = dict(loss_weighting_args), dict(t_sampling_args)
        self._weighting = resolve(loss_weighting, self.SEAMS["loss_weighting"], "loss_weighting", type(self))
        self._t_sampling = resolve(t_sampling, self.SEAMS["t_sampling"], "t_sampling", type(self))
        self.nn_model = nn_model
        self.sigma_data = float(sigma_data)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.S_min, self.S_max, self.S_noise = float(S_min), float(S_max), float(S_noise)
        self.augment_prob = float(augment_prob)
        self.augment_dim = getattr(nn_model, "augment_dim", 0)  # the labels the network takes
        self._sigma_cache = {}  # (steps, device) -> feature noise levels, see _feature_sigmas
        if self.augment_prob > 0:
            from model.augment import AugmentPipe  # only the augmented config needs it
            self.augment_pipe = AugmentPipe(self.augment_prob)
        else:
            self.augment_pipe = None

    @staticmethod
    def check_settings(cfg, require):
        """Checks of the ``diffusion`` section, at config load."""
        diffusion = cfg.diffusion
        for key in ("sigma_data", "sigma_min", "sigma_max", "rho", "p_std"):
            require(diffusion[key] > 0, f"diffusion.{key}", f"must be positive, got {diffusion[key]}")
        require(diffusion.sigma_min < diffusion.sigma_max, "diffusion.sigma_min",
                f"must be below diffusion.sigma_max ({diffusion.sigma_max}), got {diffusion.sigma_min}")
        require(0.0 <= diffusion.augment_prob <= 1.0, "diffusion.augment_prob",
                f"must be in [0, 1], got {diffusion.augment_prob}")
        labels = cfg.network.get("augment_dim", 0)
        require(diffusion.augment_prob == 0 or labels == AUGMENT_LABELS, "network.augment_dim",
                f"must be {AUGMENT_LABELS} when diffusion.augment_prob > 0 (the network gets "
                f"{AUGMENT_LABELS} augmentation labels), got {labels}")
        check_seams(diffusion, EDM.SEAMS, require)

    @classmethod
    def feature_timesteps(cls, settings):
        """(lowest, highest, what) timestep ``get_feature`` takes."""
        return 1, cls.FEATURE_STEPS, f"the EDM feature schedule of {cls.FEATURE_STEPS} steps"

    @staticmethod
    def sampler_name(sampler):
        """Which sampler ``sample(**sampler)`` runs, for sampling.json: "DDAE EDM" (the original's Heun)."""
        return f"DDAE {sampler['mode']}"

    @staticmethod
    def sampler_settings(settings, mode, steps, eta):
        """The sampler of sample.py's --mode/--steps/--eta: Heun, {"mode": "EDM", "steps", "eta"}."""
        if mode == "DDPM":
            raise UserError("--mode DDPM is the ancestral sampler of DDPM configs; EDM configs sample with "
                            "Heun (drop --mode)")
        steps = 18 if steps is None else steps
        if steps < 2:
            raise UserError(f"--steps {steps}: the EDM sampler needs at least 2 steps")
        eta = 0.0 if eta is None else eta
        if not 0.0 <= eta <= 1.0:
            raise UserError(f"--eta {eta}: pass a value from 0 (deterministic) to 1")
        return {"mode": "EDM", "steps": steps, "eta": float(eta)}

    @staticmethod
    def network_calls(steps):
        """Network evaluations per image of Heun's sampler with ``steps`` steps (no correction at the last)."""
        return 2 * steps - 1

    @staticmethod
    def sample_steps_range(settings):
        """(fewest, most or None) steps the sampler takes."""
        return 2, None

    @classmethod
    def noisy_levels(cls, settings):
        """The levels noisy_classifier_DDAE.py reports accuracy at: every index 1..FEATURE_STEPS."""
        return eval_levels("EDM", steps=cls.FEATURE_STEPS)

    def level_record(self, levels):
        """What the noise level indices mean, for result files: their sigmas."""
        return {"sigmas": self.schedule(self.FEATURE_STEPS).flip(0)[levels].tolist()}

    def denoise(self, x, sigma, aug=None):
        """The preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma) / 4, aug).

        Args:
            x: (B, C, H, W) noisy images in the [-1, 1] scale.
            sigma: noise level(s): a number, a 0-dim tensor or a tensor of B values (any shape).
            aug: (B, augment_dim) augmentation labels, or None.

        Returns:
            (B, C, H, W) float32 denoised images (computed in float32 whatever the input dtype).
        """
        with network_only(x.device) as network:
            return self._denoise(x, sigma, aug, network)

    def _denoise(self, x, sigma, aug, network):
        """``denoise`` with autocast off; ``network()`` is the context the network runs in."""
        x = x.to(torch.float32)
        if torch.is_tensor(sigma):
            sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
        else:  # a fill, not a host-to-device copy, so the sampling loop never waits for the GPU
            sigma = torch.full((x.shape[0], 1, 1, 1), float(sigma), device=x.device)
        c_skip, c_out, c_in, c_noise = self._preconditioning(sigma, x.shape[0])
        with network():
            F_x = self.nn_model(c_in * x, c_noise, aug)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def _preconditioning(self, sigma, batch_size):
        """c_skip, c_out, c_in (shaped like ``sigma``, (B, 1, 1, 1)) and c_noise (B,) at noise level sigma."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = (sigma.log() / 4).flatten().expand(batch_size)
        return c_skip, c_out, c_in, c_noise

    def snr(self, sigma):
        """The signal-to-noise ratio 1 / sigma^2 of x + sigma n."""
        return sigma ** -2

    def training_timesteps(self, batch_size, device):
        """(B,) training noise levels drawn by ``t_sampling`` (log_normal: the original's draw)."""
        return self._t_sampling(self, batch_size, device, **self.t_sampling_args)

    def training_sigma(self, batch_size, device, rnd_normal=None):
        """(B, 1, 1, 1) training noise levels: ``training_timesteps``, or the log-normal level of a given
        standard-normal draw ``rnd_normal`` (B, 1, 1, 1) (the golden tests fix it)."""
        if rnd_normal is None:
            return self.training_timesteps(batch_size, device).reshape(-1, 1, 1, 1)
        return (rnd_normal * self.p_std + self.p_mean).exp()

    def loss_weight(self, sigma):
        """The per-sample loss weight of ``loss_weighting`` at noise levels ``sigma``, or None (unweighted)."""
        return self._weighting(self, sigma, **self.loss_weighting_args)

    def forward(self, x0, rnd_normal=None, noise=None):
        """Training loss: the weighted squared error of the denoiser (``loss_weight``) at noise levels drawn by
        ``training_timesteps`` (the original's: lambda(sigma) at ln(sigma) ~ N(p_mean, p_std^2)).

        Args:
            x0: (B, C, H, W) clean images in [0, 1].
            rnd_normal: (B, 1, 1, 1) standard-normal draw behind ln(sigma) = p_mean + p_std rnd_normal;
                None: the noise levels come from ``training_timesteps``.
            noise: (B, C, H, W) standard-normal noise; fresh when None.

        Returns:
            scalar float32 loss (computed in float32 also under autocast).
        """
        with network_only(x0.device) as network:
            x = 2 * x0 - 1
            sigma = self.training_sigma(x.shape[0], x.device, rnd_normal)  # (B, 1, 1, 1)
            weight = self.loss_weight(sigma)
            if self.augment_pipe is not None:
                x, aug = self.augment_pipe(x)
            elif self.augment_dim:
                # zero labels, what the pipe gives at p = 0, so DDP sees the label embedding used every step
                aug = torch.zeros((x.shape[0], self.augment_dim), device=x.device)
            else:
                aug = None
            noise = noise_like(noise, x)
            denoised = self._denoise(x + sigma * noise, sigma, aug, network)
            if weight is None:
                return ((denoised - x) ** 2).mean()
            return (weight.reshape(-1, 1, 1, 1) * (denoised - x) ** 2).mean()

    def schedule(self, steps):
        """The sampler's noise levels: ``karras_schedule`` with this model's settings."""
        return karras_schedule(steps, self.sigma_min, self.sigma_max, self.rho)

    def get_feature(self, x0, t, steps=18, name=None, norm=False, noise=None, tokens=False, **conditioning):
        """``DDPM.get_feature`` (the other arguments and the result are its), at a noise level of EDM's schedule.

        Args:
            t: int or (B,) integer tensor indexing the reversed schedule of ``steps``: 1 is
                sigma_min, ``steps`` is sigma_max (0, no noise, has no network conditioning ln 0,
                so it is rejected for an int and gives NaN features in a tensor).
            steps: length of the schedule that ``t`` indexes.
        """
        if isinstance(t, int) and not 1 <= t <= steps:
            raise ValueError(f"EDM feature timestep {t} is outside 1..{steps} (the schedule of {steps} steps)")
        x = 2 * x0 - 1
        if isinstance(t, int):
            sigma_t = self.schedule(steps)[steps - t].item()
            sigma = torch.full((x.shape[0], 1, 1, 1), sigma_t, dtype=torch.float32, device=x.device)
        else:
            sigma = self._feature_sigmas(steps, t.device)[t].to(x.device).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        x_noisy = x + sigma * noise_like(noise, x)
        _, _, c_in, c_noise = self._preconditioning(sigma, x.shape[0])
        names = requested_blocks(self.nn_model, name)
        activations = self.nn_model.forward_features(c_in * x_noisy, c_noise, names, **conditioning)
        return pool_features(activations, name, norm, self.nn_model.feature_axis, tokens)

    def _feature_sigmas(self, steps, device):
        """(steps + 1,) float32 noise levels from 0 up to sigma_max on ``device``, copied there once:
        a host-to-device copy per batch would make the CPU wait for the GPU."""
        key = (steps, str(device))
        if key not in self._sigma_cache:
            self._sigma_cache[key] = self.schedule(steps).flip(0).to(torch.float32).to(device)
        return self._sigma_cache[key]

    @torch.no_grad()
    def sample(self, n_sample=None, size=None, x_T=None, steps=18, eta=0.0, noise=None, mode="EDM"):
        """Generate images with the second-order Heun sampler (2 * steps - 1 network calls).

        Args:
            n_sample, size, noise: as ``DDPM.sample``'s (``noise`` also gives the churn noise).
            x_T: (B, C, H, W) standard-normal starting draw (scaled by sigma_max here); drawn from
                ``noise`` when None.
            steps: number of noise levels.
            eta: churn, 0 (deterministic) to 1 (gamma = sqrt(2) - 1 where S_min <= sigma <= S_max).
            mode: "EDM", the only sampler (so ``sampler_settings``' dict passes as keywords).

        Returns:
            (B, C, H, W) float64 images, nominally in [0, 1] (not clipped).
        """
        if mode != "EDM":
            raise ValueError(f"EDM samples with its Heun sampler (mode 'EDM'), got mode {mode!r}")
        device = next(self.nn_model.parameters()).device
        x_T, noise = starting_noise(x_T, n_sample, size, noise, device)
        # Python floats: deciding the churn and the step sizes needs no device synchronisation.
        sigmas = self.schedule(steps).tolist()
        x = x_T.to(device=device, dtype=torch.float64) * sigmas[0]
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            gamma = (math.sqrt(2) - 1) * eta if self.S_min <= sigma <= self.S_max else 0.0
            sigma_hat = sigma * (1 + gamma)
            if gamma > 0:
                churn = math.sqrt(sigma_hat ** 2 - sigma ** 2) * self.S_noise
                x = x + churn * noise(x.shape[1:]).to(torch.float64)
            slope = self._slope(x, sigma_hat)
            x_next = x + (sigma_next - sigma_hat) * slope
            if i < steps - 1:
                slope_next = self._slope(x_next, sigma_next, correction=True)
                x_next = x + (sigma_next - sigma_hat) * (0.5 * slope + 0.5 * slope_next)
            x = x_next
        return (x + 1) / 2

    def _slope(self, x, sigma, correction=False):
        """dx/dsigma of the probability-flow ODE, with the denoised image clipped to [-1, 1]; ``correction``:
        Heun's second evaluation (the same here; a guided subclass evaluates it otherwise)."""
        denoised = self.denoise(x, sigma).to(torch.float64).clamp(-1, 1)
        return (x - denoised) / sigma
