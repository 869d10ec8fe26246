"""DDPM (variance preserving; epsilon, x0 or v prediction): training loss, features, DDIM and ancestral sampling.

    diffusion = DDPM(UNet(**cfg.network), **cfg.diffusion)
    loss = diffusion(x0)                          # x0 in [0, 1]
    feats = diffusion.get_feature(x0, t=11)       # {"out_1": (B, C), ...}
    images = diffusion.sample(16, (3, 32, 32))    # DDIM, 100 steps, in [0, 1]
    images = diffusion.sample(16, (3, 32, 32), mode="DDPM")             # ancestral, n_T steps
    images = diffusion.sample(16, (3, 32, 32), mode="DDPM", steps=50)   # ancestral over 50 respaced steps
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.noise import noise_like, starting_noise
from model.objectives import DDPM_T_SAMPLINGS, DDPM_WEIGHTINGS, PREDICTIONS, check_seams, resolve
from model.schedules import SCHEDULE_KEYS, SCHEDULES, make_schedule
from utils.errors import UserError
from utils.noisy import DDPM_LEVEL_COUNT, eval_levels


def respaced_timesteps(n_T, steps):
    """``steps`` timesteps of 1..n_T evenly spaced from 1 to n_T, rounded as improved-diffusion's
    ``space_timesteps`` rounds them (its 0-based index i is our timestep i + 1), ascending."""
    if not 2 <= steps <= n_T:
        raise ValueError(f"respaced ancestral sampling takes 2 to n_T = {n_T} steps, got {steps}")
    stride, index, taken = (n_T - 1) / (steps - 1), 0.0, set()
    for _ in range(steps):  # accumulated as there, so the rounding matches
        taken.add(1 + round(index))
        index += stride
    return sorted(taken)


def requested_blocks(nn_model, name):
    """The block names a ``get_feature(name=...)`` call needs: ``name`` as a list, or for None the network's
    ``grid_blocks`` if it has them (a UNet's out_k, the original's features), else all its blocks."""
    if name is None:
        return list(getattr(nn_model, "grid_blocks", nn_model.block_names))
    return [name] if isinstance(name, str) else list(name)


def pool_features(activations, name, norm, feature_axis=1, tokens=False):
    """Average activations over every axis but the batch and ``feature_axis`` (H and W of (B, C, H, W),
    T of (B, T, D)) into float32 (B, C) features, optionally L2-normalised; return the one feature when
    ``name`` is a string, else the dict (float64 activations stay float64). With ``tokens`` nothing is averaged: each activation becomes
    float32 (B, T, C) tokens, its positions in order (``as_tokens``; ``norm`` normalises each token)."""
    features = {}
    for key, activation in activations.items():
        if tokens:
            feature = as_tokens(activation, feature_axis).float()  # (B, T, C)
            features[key] = F.normalize(feature, dim=-1) if norm else feature
            continue
        axis = feature_axis % activation.dim()
        wide = activation.to(torch.promote_types(activation.dtype, torch.float32))  # float64 stays float64
        feature = wide.mean(dim=[d for d in range(1, activation.dim()) if d != axis])  # (B, C)
        features[key] = F.normalize(feature, dim=1) if norm else feature
    return features[name] if isinstance(name, str) else features


def as_tokens(activation, feature_axis=1):
    """An activation as (B, T, C) tokens: the channel axis last, every other axis but the batch flattened
    into T in order ((B, C, H, W) -> (B, H*W, C); (B, T, D) is kept; (B, C) is one token)."""
    if activation.dim() == 2:
        return activation[:, None]
    return activation.movedim(feature_axis % activation.dim(), -1).flatten(1, -2)


def check_steps_and_betas(diffusion, require):
    """The ``n_T`` and ``betas`` keys of a diffusion section (DDPM, DiT)."""
    require(diffusion.n_T >= 1, "diffusion.n_T", f"must be at least 1, got {diffusion.n_T}")
    require(len(diffusion.betas) == 2 and 0.0 < diffusion.betas[0] <= diffusion.betas[1] < 1.0,
            "diffusion.betas", f"must be [beta_1, beta_T] with 0 < beta_1 <= beta_T < 1, got {diffusion.betas}")


def _per_sample(values, t):
    """``values[t]`` shaped (B, 1, 1, 1) for a (B,) tensor t, or a 0-dim tensor for an int t."""
    picked = values[t]
    return picked.view(-1, 1, 1, 1) if picked.dim() else picked


def _clipped(x, x0, sqrtab, sqrtmab):
    """Clip the x0 prediction to [-1, 1], and return (x0, the eps consistent with it)."""
    x0 = x0.clamp(-1, 1)
    return x0, (x - sqrtab * x0) / sqrtmab


def weighted_mse(output, target, weight):
    """The float32 mean squared error of ``output``, per sample times ``weight`` ((B,), or None: unweighted)."""
    if weight is None:
        return F.mse_loss(output.float(), target.float())
    weight = weight.float().reshape(-1, *[1] * (output.dim() - 1))
    return (weight * (output.float() - target.float()) ** 2).mean()


class DDPM(nn.Module):
    """Denoising diffusion (Ho et al. 2020) around a network predicting the noise (or x0, or v).

    Args:
        nn_model: a network of docs/DESIGN.md's Network contract, called with t = timestep / n_T.
        betas: (first, last) beta of the linear schedule.
        n_T: number of diffusion steps.
        schedule: a name of ``model.schedules.SCHEDULES`` ("linear" is the original's).
        zero_terminal_snr: rescale the schedule so that alphabar_T = 0 (Lin et al. 2024; diffusers'
            ``rescale_betas_zero_snr``), for x0 or v prediction; DDAE's ancestral sampler then cannot run (its step
            at T divides by alpha_T = 0), DDIM and a diffusers folder's samplers can.
        prediction: what the network predicts, a name of ``model.objectives.PREDICTIONS`` ("eps", the
            original's; "x0"; "v") or an import path; sampling and probing must use the trained one.
        loss_weighting, loss_weighting_args: the per-sample loss weight ("none", the original's; "min_snr"
            with {gamma}) or an import path, and its keywords. Training only.
        t_sampling, t_sampling_args: the training timestep distribution ("uniform" on 1..n_T, the original's;
            "logit_normal" with {loc, scale}) or an import path, and its keywords. Training only.

    Images are in [0, 1] outside this class and in [-1, 1] inside. Two schedules: "DDPM" for training,
    features and ancestral sampling, "DDIM" for the DDIM sampler (``model.schedules``).
    """

    probe_grid = (1, 11, 21)  # the original's --grid timesteps, on its 1000-step linear schedule
    ORIGINAL_SCHEDULE = {"betas": (1e-4, 0.02), "n_T": 1000, "schedule": "linear"}
    # What the network learnt: a checkpoint refuses other values, for sampling and probing too.
    TRAINING_KEYS = ("betas", "n_T", "schedule", "zero_terminal_snr", "prediction")
    # How it was trained: a resume refuses other values; sampling and probing ignore them.
    TRAINING_ONLY_KEYS = ("loss_weighting", "loss_weighting_args", "t_sampling", "t_sampling_args")
    SAMPLER = "DDIM"  # the sampler of sample() without sampler arguments, in labels
    SEAMS = {"prediction": PREDICTIONS, "loss_weighting": DDPM_WEIGHTINGS, "t_sampling": DDPM_T_SAMPLINGS}

    def __init__(self, nn_model, betas: list[float] = (1e-4, 0.02), n_T: int = 1000, schedule: str = "linear",
                 zero_terminal_snr: bool = False, prediction: str = "eps", loss_weighting: str = "none",
                 loss_weighting_args: dict = {}, t_sampling: str = "uniform", t_sampling_args: dict = {}):
        super().__init__()
        self.nn_model = nn_model
        self.n_T = int(n_T)
        self.betas = tuple(float(b) for b in betas)
        self.schedule = schedule
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.prediction, self.loss_weighting, self.t_sampling = prediction, loss_weighting, t_sampling
        self.loss_weighting_args, self.t_sampling_args = dict(loss_weighting_args), dict(t_sampling_args)
        self.prediction_target = resolve(prediction, self.SEAMS["prediction"], "prediction", type(self))
        self._weighting = resolve(loss_weighting, self.SEAMS["loss_weighting"], "loss_weighting", type(self))
        self._t_sampling = resolve(t_sampling, self.SEAMS["t_sampling"], "t_sampling", type(self))
        for prefix, leading_zero in (("ddpm", True), ("ddim", False)):
            for key, value in make_schedule(*self.betas, self.n_T, leading_zero, schedule,
                                            self.zero_terminal_snr).items():
                self.register_buffer(f"{prefix}_{key}", value, persistent=False)

    @staticmethod
    def check_settings(cfg, require):
        """Checks of the ``diffusion`` section, at config load."""
        diffusion = cfg.diffusion
        require(diffusion.schedule in SCHEDULES, "diffusion.schedule",
                f"must be one of {', '.join(SCHEDULES)}, got {diffusion.schedule!r}")
        check_steps_and_betas(diffusion, require)
        check_seams(diffusion, DDPM.SEAMS, require)
        # min-SNR's eps weight min(snr, gamma) / snr is 0 / 0 where alphabar_T = 0
        require(not (getattr(diffusion, "zero_terminal_snr", False) and diffusion.loss_weighting == "min_snr"
                     and diffusion.prediction == "eps"), "diffusion.zero_terminal_snr",
                "true gives snr = 0 at t = n_T, where min_snr's weight for prediction eps is 0 / 0; use prediction "
                "v or x0 (as zero terminal SNR asks), or loss_weighting none")

    @staticmethod
    def feature_timesteps(settings):
        """(lowest, highest, what) timestep ``get_feature`` takes."""
        return 0, settings["n_T"], "diffusion.n_T"

    @classmethod
    def probe_grid_for(cls, settings):
        """The ``--grid`` timesteps of the diffusion section ``settings``: for each of the original's grid
        timesteps, the timestep of this schedule whose alphabar is nearest the original's there (same noise
        level, whatever n_T and schedule); the original's own schedule gives exactly ``probe_grid``. Repeats
        (a very short schedule) are dropped."""
        reference = make_schedule(*cls.ORIGINAL_SCHEDULE["betas"], cls.ORIGINAL_SCHEDULE["n_T"], True,
                                  cls.ORIGINAL_SCHEDULE["schedule"])["alphabar_t"]
        alphabar = make_schedule(*settings["betas"], settings["n_T"], True, settings["schedule"],
                                 settings.get("zero_terminal_snr", False))["alphabar_t"]
        nearest = [1 + int((alphabar[1:] - reference[t]).abs().argmin()) for t in cls.probe_grid]
        return tuple(dict.fromkeys(nearest))

    @staticmethod
    def sampler_settings(settings, mode, steps, eta):
        """The sampler of sample.py's --mode/--steps/--eta: {"mode", "steps", "eta"} for ``sample``."""
        n_T = settings["n_T"]
        if mode == "DDIM":
            if steps is None and n_T < 100:
                raise UserError(f"DDIM's default of 100 steps is more than diffusion.n_T = {n_T}; pass --steps N "
                                f"with N from 1 to {n_T}")
            steps = 100 if steps is None else steps
            if not 1 <= steps <= n_T:
                raise UserError(f"--steps {steps}: DDIM takes 1 to n_T = {n_T} steps")
            eta = 0.0 if eta is None else eta
            if not 0.0 <= eta <= 1.0:
                raise UserError(f"--eta {eta}: pass a value from 0 (deterministic) to 1")
            return {"mode": mode, "steps": steps, "eta": float(eta)}
        # ancestral: full noise at every step; n_T steps, or --steps respaced ones
        if eta is not None:
            raise UserError(f"--eta {eta}: the ancestral sampler (--mode DDPM) always draws full noise; drop --eta, "
                            f"or use --mode DDIM --eta {eta}")
        if steps is not None and not 2 <= steps <= n_T:
            raise UserError(f"--steps {steps}: respaced ancestral sampling takes 2 to n_T = {n_T} "
                            f"steps (or drop --steps for all n_T)")
        return {"mode": "DDPM", "steps": steps, "eta": None}

    @staticmethod
    def network_calls(steps):
        """Network evaluations per image of the DDIM sampler with ``steps`` steps."""
        return steps

    @staticmethod
    def sample_steps_range(settings):
        """(fewest, most or None) steps the default sampler takes."""
        return 1, settings["n_T"]

    @staticmethod
    def noisy_levels(settings):
        """The levels noisy_classifier_DDAE.py reports accuracy at: 20 timesteps 1, 1 + n_T/20, ... (a
        ValueError saying which key is short when n_T < 20)."""
        try:
            return eval_levels("DDPM", n_T=settings["n_T"])
        except ValueError:
            raise ValueError(f"key 'diffusion.n_T' is {settings['n_T']}; the noisy classifier reports "
                             f"{DDPM_LEVEL_COUNT} timesteps and needs n_T >= {DDPM_LEVEL_COUNT}") from None

    def guidance_refusal(self, mode):
        """Why classifier guidance (``sample(guidance=...)``) cannot run with sampler ``mode``, or None."""
        if self.published_sampler() is not None:
            return ("classifier guidance runs DDAE's own samplers, not a diffusers folder's scheduler; pass a "
                    "checkpoint of ours")
        if mode == "DDPM" and getattr(self.nn_model, "learn_sigma", False):
            return ("classifier guidance of the ancestral sampler needs a fixed variance, and this network learns "
                    "its own; pass --mode DDIM")
        return None

    def published_sampler(self):
        """The samplers the network was published with (a diffusers folder's scheduler,
        ``model.diffusers_sampling.SchedulerSampler``), or None: DDAE's own DDIM and ancestral samplers."""
        published = getattr(self.nn_model, "published_sampler", None)
        return None if published is None else published(self.n_T, self.betas, self.schedule, self.zero_terminal_snr)

    def pixel_rule(self):
        """How sample.py turns this model's samples into PNG pixels (a ``utils.images.to_uint8`` rule): "round" as
        diffusers' pipelines do for a diffusers folder, so that its PNGs are the pipeline's; else "truncate",
        the original's (torchvision's save_image)."""
        return "round" if getattr(self.nn_model, "published_sampler", None) is not None else "truncate"

    def sampler_name(self, sampler):
        """Which sampler ``sample(**sampler)`` runs, for sampling.json: "DDAE DDIM", "DDAE DDPM" (ancestral), "DDAE
        DDPM, learned variance" (a network with ``learn_sigma``) or a diffusers folder's "diffusers
        DDIMScheduler(...)"; a UserError for a scheduler option it cannot run."""
        published = self.published_sampler()
        if published is None:
            if sampler["mode"] == "DDPM" and self.zero_terminal_snr:
                raise UserError("--mode DDPM: DDAE's ancestral sampler cannot run diffusion.zero_terminal_snr: true "
                                "(its step at T divides by alpha_T = 0); use --mode DDIM")
            learned = sampler["mode"] == "DDPM" and getattr(self.nn_model, "learn_sigma", False)
            return f"DDAE {sampler['mode']}" + (", learned variance" if learned else "")
        return published.describe(sampler["mode"], sampler["steps"], sampler["eta"])

    def level_record(self, levels):
        """What a noise level index means, for result files: nothing beyond the timestep itself."""
        return {}

    @property
    def ddpm_schedule(self):
        """The "DDPM" schedule (beta_0 = 0) as a dict of (n_T + 1,) tensors."""
        return {key: getattr(self, f"ddpm_{key}") for key in SCHEDULE_KEYS}

    @property
    def ddim_schedule(self):
        """The "DDIM" schedule (no leading zero) as a dict of (n_T + 1,) tensors."""
        return {key: getattr(self, f"ddim_{key}") for key in SCHEDULE_KEYS}

    def _timesteps(self, t, batch_size, device):
        """``t`` as a (B,) long tensor on ``device``."""
        if isinstance(t, int):
            if not 0 <= t <= self.n_T:
                raise ValueError(f"timestep {t} is outside 0..{self.n_T}")
            return torch.full((batch_size,), t, dtype=torch.long, device=device)
        return t.to(device=device, dtype=torch.long).expand(batch_size)

    def perturb(self, x, t, noise=None):
        """Diffuse clean images to timestep t: sqrt(alphabar_t) x + sqrt(1 - alphabar_t) noise.

        Args:
            x: (B, C, H, W) clean images in [-1, 1].
            t: int or (B,) integer tensor of timesteps in 0..n_T (the "DDPM" schedule).
            noise: (B, C, H, W) tensor, a noise source (see model/noise.py), or None for fresh noise.

        Returns:
            (B, C, H, W) noisy images.
        """
        noise = noise_like(noise, x)
        return _per_sample(self.ddpm_sqrtab, t) * x + _per_sample(self.ddpm_sqrtmab, t) * noise

    def snr(self, t):
        """The signal-to-noise ratio alphabar_t / (1 - alphabar_t) at integer timesteps ``t``, float32."""
        alphabar = self.ddpm_alphabar_t[t]
        return alphabar / (1 - alphabar)

    def training_timesteps(self, batch_size, device):
        """(B,) integer timesteps in 1..n_T drawn by ``t_sampling`` (uniform: the original's draw)."""
        return self._t_sampling(self, batch_size, device, **self.t_sampling_args)

    def loss_weight(self, t):
        """The (B,) per-sample loss weight of ``loss_weighting`` at timesteps ``t``, or None (unweighted)."""
        return self._weighting(self, t, **self.loss_weighting_args)

    def forward(self, x0, t=None, noise=None):
        """Training loss: the (weighted) mean squared error between the prediction target (the noise, for
        ``prediction: eps``) and the network's output.

        Args:
            x0: (B, C, H, W) clean images in [0, 1].
            t: (B,) integer timesteps in 1..n_T; drawn by ``training_timesteps`` when None.
            noise: (B, C, H, W) standard-normal noise; fresh when None.

        Returns:
            scalar float32 loss (computed in float32 also under autocast).
        """
        x = 2 * x0 - 1
        if t is None:
            t = self.training_timesteps(x.shape[0], x.device)
        t = self._timesteps(t, x.shape[0], x.device)
        noise = noise_like(noise, x)
        output = self.nn_model(self.perturb(x, t, noise), t / self.n_T)
        target = self.prediction_target.target(x, noise, _per_sample(self.ddpm_sqrtab, t),
                                               _per_sample(self.ddpm_sqrtmab, t))
        return weighted_mse(output, target, self.loss_weight(t))

    def get_feature(self, x0, t, name=None, norm=False, noise=None, tokens=False, **conditioning):
        """Average-pooled activations of the network's decoder blocks on noised images.

        Args:
            x0: (B, C, H, W) clean images in [0, 1].
            t: int or (B,) integer tensor: the timestep(s) to noise to, in 0..n_T.
            name: one block name ("out_6") to get only its feature, a list of names to get a dict of
                those, or None for the grid blocks (a UNet's out_k). The network stops after the deepest one needed.
            norm: L2-normalise each feature vector.
            noise: (B, C, H, W) tensor, a noise source, or None for fresh noise.
            tokens: return each block's (B, T, C) tokens instead of their average (``pool_features``).
            conditioning: keywords of the network's ``forward_features`` (a conditional network's labels).

        Returns:
            (B, C) float32 tensor when ``name`` is a string, else ``{name: (B, C)}``.
        """
        x = 2 * x0 - 1
        t = self._timesteps(t, x.shape[0], x.device)
        names = requested_blocks(self.nn_model, name)
        activations = self.nn_model.forward_features(self.perturb(x, t, noise), t / self.n_T, names, **conditioning)
        return pool_features(activations, name, norm, self.nn_model.feature_axis, tokens)

    def eps_and_x0(self, x_t, output, sqrtab, sqrtmab):
        """What a network output means: (eps, x0) at ``x_t`` = sqrtab x0 + sqrtmab eps, for the prediction
        target (eps: the output is eps). The loss's target, every sampler and the diffusers path go through it."""
        return self.prediction_target.eps_and_x0(x_t, output, sqrtab, sqrtmab)

    def denoise(self, x_t, t, schedule=None):
        """The model's (eps, x0) for the whole batch at integer timestep ``t``, in x_t's dtype, unclipped: the
        one place every sampler asks the network (override it for guidance).

        Args:
            x_t: (B, C, H, W) noisy images in [-1, 1]'s scale.
            t: int timestep in 1..n_T, which the network gets as t / n_T.
            schedule: the schedule dict whose sqrtab / sqrtmab at t convert the output (``ddim_schedule`` for
                DDIM, as the original); None: ``ddpm_schedule``, the training one.
        """
        schedule = self.ddpm_schedule if schedule is None else schedule
        t_input = torch.full((x_t.shape[0],), t / self.n_T, device=x_t.device, dtype=x_t.dtype)
        output = self.nn_model(x_t, t_input).to(x_t.dtype)
        return self.eps_and_x0(x_t, output, schedule["sqrtab"][t], schedule["sqrtmab"][t])

    @torch.no_grad()
    def sample(self, n_sample=None, size=None, x_T=None, steps=None, eta=0.0, mode="DDIM", noise=None, guidance=None):
        """Generate images with the DDIM sampler or the ancestral DDPM sampler.

        Args:
            n_sample: number of images (ignored when ``x_T`` is given).
            size: (C, H, W) of one image (ignored when ``x_T`` is given).
            x_T: (B, C, H, W) starting noise; drawn from ``noise`` when None.
            steps: DDIM steps (mode "DDIM", default 100 or n_T if fewer); for mode "DDPM", None runs the original's
                n_T ancestral steps and a number runs that many respaced steps (``_respaced_loop``); a network
                that learns its variance (``learn_sigma``) samples with it (``_learned_variance_loop``).
            eta: DDIM stochasticity, 0 (deterministic) to 1 (DDPM-like); unused by mode "DDPM".
            mode: "DDIM" or "DDPM" (ancestral). A network with ``published_sampler`` (a diffusers folder) runs
                its own scheduler's DDIM or ancestral sampler with these settings instead of ours.
            noise: callable ``noise(shape) -> (B, *shape)`` giving x_T (when not given) and then the
                per-step noise in order, e.g. ``PerImageNoise``; ``torch.randn`` when None.
            guidance: None, or classifier guidance ``guidance(x_t, t) -> scale * grad log p(class | x_t)``
                (``model.guidance.HeadGuidance``): DDIM shifts eps by -sqrt(1 - alphabar_t) times it, the
                ancestral samplers shift the step's mean by its variance times it (guided-diffusion's
                condition_score and condition_mean), after the x0 prediction is clipped, as there: so in the
                samplers, not in ``denoise``. Not for a published sampler or a learned variance.

        Returns:
            (B, C, H, W) float32 images, nominally in [0, 1] (not clipped).
        """
        if mode not in ("DDIM", "DDPM"):
            raise ValueError(f"mode must be 'DDIM' or 'DDPM', got {mode!r}")
        if guidance is not None and self.guidance_refusal(mode):
            raise ValueError(self.guidance_refusal(mode))
        device = self.ddpm_sqrtab.device
        x_T, noise = starting_noise(x_T, n_sample, size, noise, device)
        x = x_T.to(device=device, dtype=self.ddpm_sqrtab.dtype)  # float32 unless the module was cast
        steps = min(100, self.n_T) if mode == "DDIM" and steps is None else steps
        published = self.published_sampler()
        if published is not None:  # a diffusers folder: asks denoise at its scheduler's timesteps + 1
            x = published.sample(self.denoise, x, mode, steps, eta, noise)
        elif mode == "DDIM":
            x = self._ddim_loop(x, steps, eta, noise, guidance)
        elif self.zero_terminal_snr:
            raise ValueError("DDAE's ancestral sampler cannot run a zero-terminal-SNR schedule (alpha_T = 0); "
                             "use mode 'DDIM'")
        elif getattr(self.nn_model, "learn_sigma", False):
            x = self._learned_variance_loop(x, steps, noise)
        elif steps is None:
            x = self._ancestral_loop(x, noise, guidance)
        else:
            x = self._respaced_loop(x, steps, noise, guidance)
        return (x + 1) / 2

    def _ddim_loop(self, x, steps, eta, noise, guidance=None):
        """DDIM (Song et al. 2021) over timesteps 1, 1 + k, ... <= n_T (k = n_T // steps), reversed,
        then 0: exactly ``steps`` network calls when steps divides n_T, as in the original."""
        if not 1 <= steps <= self.n_T:
            raise ValueError(f"DDIM steps must be in 1..{self.n_T}, got {steps}")
        stride = self.n_T // steps
        times = list(range(1, self.n_T + 1, stride))[::-1] + [0]
        schedule = self.ddim_schedule
        alphabar = schedule["alphabar_t"]
        for index, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
            last = index == len(times) - 2
            x0, eps = _clipped(x, self.denoise(x, t, schedule)[1], schedule["sqrtab"][t], schedule["sqrtmab"][t])
            if guidance is not None:  # condition_score: the score of p(x_t) p(class | x_t)^scale
                eps = eps - schedule["sqrtmab"][t] * guidance(x, t)
                x0 = (x - schedule["sqrtmab"][t] * eps) / schedule["sqrtab"][t]
            a, a_next = alphabar[t], alphabar[t_next]
            c1 = eta * torch.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
            c2 = torch.sqrt(1 - a_next - c1 ** 2)
            x = torch.sqrt(a_next) * x0 + c2 * eps
            if eta > 0 and not last:
                x = x + c1 * noise(x.shape[1:])
        return x

    def _ancestral_loop(self, x, noise, guidance=None):
        """Ancestral sampling over i = n_T .. 1 with the "DDPM" schedule; no noise at i = 1."""
        schedule = self.ddpm_schedule
        for i in range(self.n_T, 0, -1):
            _, eps = _clipped(x, self.denoise(x, i, schedule)[1], schedule["sqrtab"][i], schedule["sqrtmab"][i])
            mean = schedule["oneover_sqrta"][i] * (x - schedule["ma_over_sqrtmab"][i] * eps)
            if guidance is not None:  # condition_mean: the step's variance beta_i times the gradient
                mean = mean + (1 - schedule["alpha_t"][i]) * guidance(x, i)
            x = mean
            if i > 1:
                x = x + schedule["sqrt_beta_t"][i] * noise(x.shape[1:])
        return x

    def _respaced_loop(self, x, steps, noise, guidance=None):
        """Ancestral sampling over ``respaced_timesteps(n_T, steps)``, as improved-diffusion's respacing
        does: between consecutive kept timesteps s < t the step uses alpha = alphabar_t / alphabar_s and
        beta = 1 - alpha in the original's update (clipped x0, variance beta); no noise at the last step.
        With steps = n_T this is ``_ancestral_loop`` up to float rounding."""
        alphabar, sqrtab, sqrtmab = self.ddpm_alphabar_t, self.ddpm_sqrtab, self.ddpm_sqrtmab
        times = respaced_timesteps(self.n_T, steps)
        for t, s in zip(times[::-1], ([0] + times[:-1])[::-1]):
            _, eps = _clipped(x, self.denoise(x, t)[1], sqrtab[t], sqrtmab[t])
            alpha = alphabar[t] / alphabar[s]
            mean = (x - (1 - alpha) / sqrtmab[t] * eps) / torch.sqrt(alpha)
            if guidance is not None:  # condition_mean with this step's variance 1 - alpha
                mean = mean + (1 - alpha) * guidance(x, t)
            x = mean
            if s > 0:
                x = x + torch.sqrt(1 - alpha) * noise(x.shape[1:])
        return x

    def learned_variance_steps(self, times):
        """[(t, s, coef_x0, coef_xt, log beta, log beta-tilde)] for the ancestral steps from each kept timestep t
        to the one before it, s (0 before the first), as improved-diffusion's respaced schedule has them: beta =
        1 - alphabar_t / alphabar_s, beta-tilde = beta (1 - alphabar_s) / (1 - alphabar_t), and the posterior
        mean's coefficients of x0 and x_t, in float64 (the first step's beta-tilde, 0, is replaced by the
        second's, as its ``posterior_log_variance_clipped`` does)."""
        betas = SCHEDULES[self.schedule](*self.betas, self.n_T, True).double()
        alphabar = torch.cumprod(1 - betas, dim=0).tolist()
        steps = []
        for t, s in zip(times, [0] + list(times[:-1])):
            beta = 1 - alphabar[t] / alphabar[s]
            coef_x0 = beta * math.sqrt(alphabar[s]) / (1 - alphabar[t])
            coef_xt = (1 - alphabar[s]) * math.sqrt(1 - beta) / (1 - alphabar[t])
            steps.append([t, s, coef_x0, coef_xt, beta, beta * (1 - alphabar[s]) / (1 - alphabar[t])])
        steps[0][5] = steps[1][5] if len(steps) > 1 else steps[0][4]
        return [(t, s, c0, ct, math.log(beta), math.log(tilde)) for t, s, c0, ct, beta, tilde in steps]

    def learned_variance_step(self, x, step):
        """The mean and log-variance of p(x_s | x_t) for a network that learns its variance, as
        improved-diffusion's p_mean_variance (learned range): the posterior mean of the clipped x0
        prediction, and frac log beta + (1 - frac) log beta-tilde with frac = (v + 1) / 2.
        ``step`` is an entry of ``learned_variance_steps``."""
        t, _, coef_x0, coef_xt, log_beta, log_tilde = step
        t_input = torch.full((x.shape[0],), t / self.n_T, device=x.device, dtype=x.dtype)
        output, v = self.nn_model(x, t_input, with_variance=True)
        _, x0 = self.eps_and_x0(x, output.to(x.dtype), self.ddpm_sqrtab[t], self.ddpm_sqrtmab[t])
        x0, _ = _clipped(x, x0, self.ddpm_sqrtab[t], self.ddpm_sqrtmab[t])
        frac = (v.to(x.dtype) + 1) / 2
        return coef_x0 * x0 + coef_xt * x, frac * log_beta + (1 - frac) * log_tilde

    def _learned_variance_loop(self, x, steps, noise):
        """improved-diffusion's ancestral sampler for a network that learns its variance: over all n_T
        timesteps (``steps`` None) or ``respaced_timesteps(n_T, steps)``, from the last; no noise at the last step."""
        times = list(range(1, self.n_T + 1)) if steps is None else respaced_timesteps(self.n_T, steps)
        for step in reversed(self.learned_variance_steps(times)):
            x, log_variance = self.learned_variance_step(x, step)
            if step[1] > 0:
                x = x + torch.exp(0.5 * log_variance) * noise(x.shape[1:])
        return x
