"""Class-conditional DDPM and EDM with classifier-free guidance, as the author's sister codebase
(FutureXiang/Diffusion: DDPM_guide, EDM_guide) defines them.

    diffusion = DDPM_guide(UNet_guide(**cfg.network), **cfg.diffusion)   # model_type DDPM_guide
    loss = diffusion(x0, labels)                       # each label dropped with probability drop_prob
    images = diffusion.sample(20, (3, 32, 32), w=0.3)  # image i of class i % n_classes, guided
    feats = diffusion.get_feature(x0, t=11)            # the null label; labels=y reads the true one

Training draws (t or ln sigma, noise, drop mask) in that order from the global generator, as the sister code
does, so one seed gives its loss. Guidance: each step evaluates the network on the batch twice in one call,
with the labels and with the null label, and takes (1 + w) * conditional - w * unconditional (w = 0: the
conditional model alone); DDPM guides the network output (eps), EDM the probability-flow slope of each half's
clipped denoised image, and EDM's Heun correction uses the conditional slope alone (so 3 * steps - 1 network
evaluations per image), all as the sister code does.
"""
import torch

from model.amp import network_only
from model.ddpm import DDPM, _per_sample, weighted_mse
from model.edm import EDM
from model.noise import noise_like

DEFAULT_W = 0.3  # the sister code's guidance scale (its configs' ``w`` key)


def image_classes(indices, n_classes):
    """The class of each image index in the sister code's layout: image i is of class i % n_classes (so any
    n_classes consecutive images hold every class once)."""
    return torch.as_tensor(indices) % n_classes


def drop_mask(labels, drop_prob):
    """(B,) float32 mask, 1 where the label is replaced by the null label: Bernoulli(drop_prob) draws from the
    global generator on the labels' device (the sister code's draw)."""
    return torch.bernoulli(torch.full(labels.shape, float(drop_prob), device=labels.device))


class Guided:
    """What DDPM_guide and EDM_guide share: label dropout, the labels and scale of a guided sampling run, and
    label-conditioned features. A conditional network takes keywords ``c`` (labels) and ``drop_mask`` (1: the
    null label) in ``forward`` and ``forward_features``, none meaning the null label, and has ``num_classes``.
    It comes after the diffusion kind in the bases, so that the kind's keys are the YAML keys (**kwargs)."""

    conditional = True  # train.py feeds labels, sample.py guides: docs/DESIGN.md, Conditional models
    _guidance = None    # (labels (B,), w) while ``sample`` runs

    def drop_mask(self, labels):
        return drop_mask(labels, self.drop_prob)

    def guided_sample(self, sample, n_sample, x_T, labels, w):
        """Run the parent's ``sample`` (a no-argument call) with ``labels`` (None: ``image_classes`` of 0..B-1)
        and scale ``w``."""
        batch = x_T.shape[0] if x_T is not None else n_sample
        device = next(self.nn_model.parameters()).device
        labels = torch.as_tensor(labels) if labels is not None else image_classes(torch.arange(batch),
                                                                                  self.nn_model.num_classes)
        if labels.shape != (batch,):
            raise ValueError(f"labels must be ({batch},), one per image, got {tuple(labels.shape)}")
        self._guidance = (labels.to(device=device, dtype=torch.long), float(w))
        try:
            return sample()
        finally:
            self._guidance = None

    def conditioning(self, labels, batch_size, device):
        """The network's (c, drop_mask) keywords for ``labels``; none (the null label) for None."""
        if labels is None:
            return {}
        return {"c": labels.to(device=device, dtype=torch.long), "drop_mask": torch.zeros(batch_size, device=device)}

    def doubled(self, x, labels):
        """The guided evaluation's inputs: x twice, the labels twice, drop mask 0 for the first half, 1 after."""
        n = x.shape[0]
        mask = torch.cat([torch.zeros(n, device=x.device), torch.ones(n, device=x.device)])
        return x.repeat(2, *[1] * (x.dim() - 1)), labels.repeat(2), mask


def combine(both, w):
    """(1 + w) * first half - w * second half of a doubled evaluation (conditional, then unconditional)."""
    n = both.shape[0] // 2
    return (1 + w) * both[:n] - w * both[n:]


class DDPM_guide(DDPM, Guided):
    """Class-conditional DDPM (the sister codebase's ``DDPM_guide``) around a conditional network.

    Args:
        nn_model: a conditional network (``UNet_guide``, a conditional ``UViT``).
        drop_prob: probability that training replaces a label by the null label (0.1, the sister code's).
        the other keys: ``DDPM``'s.
    """

    TRAINING_ONLY_KEYS = DDPM.TRAINING_ONLY_KEYS + ("drop_prob",)

    def __init__(self, nn_model, drop_prob: float = 0.1, **kwargs):
        super().__init__(nn_model, **kwargs)
        self.drop_prob = float(drop_prob)

    @staticmethod
    def check_settings(cfg, require):
        DDPM.check_settings(cfg, require)
        require(0.0 <= cfg.diffusion.drop_prob < 1.0, "diffusion.drop_prob",
                f"must be in [0, 1), got {cfg.diffusion.drop_prob}")

    @staticmethod
    def network_calls(steps):
        """Network evaluations per image of guided DDIM with ``steps`` steps: two per step."""
        return 2 * steps

    def forward(self, x0, labels, t=None, noise=None, drop_mask=None):
        """Training loss of ``DDPM.forward`` (its prediction target and weighting), the network seeing ``labels``
        with the null label where ``drop_mask`` ((B,), 1: dropped; drawn after t and noise when None) is 1."""
        x = 2 * x0 - 1
        if t is None:
            t = self.training_timesteps(x.shape[0], x.device)
        t = self._timesteps(t, x.shape[0], x.device)
        noise = noise_like(noise, x)
        drop_mask = self.drop_mask(labels) if drop_mask is None else drop_mask
        output = self.nn_model(self.perturb(x, t, noise), t / self.n_T, c=labels, drop_mask=drop_mask)
        sqrtab, sqrtmab = _per_sample(self.ddpm_sqrtab, t), _per_sample(self.ddpm_sqrtmab, t)
        return weighted_mse(output, self.prediction_target.target(x, noise, sqrtab, sqrtmab), self.loss_weight(t))

    def guidance_refusal(self, mode):
        """A DDAE head guides an unconditional model; this one is guided by its own labels (``--w``)."""
        return ("classifier guidance by a DDAE head is for unconditional models; a class-conditional model is "
                "guided toward its classes by --w (classifier-free guidance); drop --classifier_head")

    def sample(self, n_sample=None, size=None, x_T=None, steps=None, eta=0.0, mode="DDIM", noise=None, labels=None,
               w=DEFAULT_W):
        """``DDPM.sample`` guided to ``labels`` ((B,) ints; None: image i of class i % n_classes) with scale ``w``."""
        return self.guided_sample(lambda: DDPM.sample(self, n_sample, size, x_T, steps, eta, mode, noise),
                                  n_sample, x_T, labels, w)

    def denoise(self, x_t, t, schedule=None):
        """``DDPM.denoise`` guided: the network output is (1 + w) * conditional - w * unconditional (the null
        label's alone outside ``sample``), then read as (eps, x0)."""
        if self._guidance is None:
            return DDPM.denoise(self, x_t, t, schedule)
        schedule = self.ddpm_schedule if schedule is None else schedule
        labels, w = self._guidance
        doubled, doubled_labels, mask = self.doubled(x_t, labels)
        t_input = torch.full((doubled.shape[0],), t / self.n_T, device=x_t.device, dtype=x_t.dtype)
        output = combine(self.nn_model(doubled, t_input, c=doubled_labels, drop_mask=mask).to(x_t.dtype), w)
        return self.eps_and_x0(x_t, output, schedule["sqrtab"][t], schedule["sqrtmab"][t])

    def get_feature(self, x0, t, name=None, norm=False, noise=None, tokens=False, labels=None):
        """``DDPM.get_feature`` with the null label, or with ``labels`` ((B,) ints) when given."""
        return DDPM.get_feature(self, x0, t, name, norm, noise, tokens,
                                **self.conditioning(labels, x0.shape[0], x0.device))


class EDM_guide(EDM, Guided):
    """Class-conditional EDM (the sister codebase's ``EDM_guide``) around a conditional network.

    Args:
        nn_model: a conditional network (``UNet_guide``).
        drop_prob: probability that training replaces a label by the null label (0.1, the sister code's).
        the other keys: ``EDM``'s.
    """

    TRAINING_ONLY_KEYS = EDM.TRAINING_ONLY_KEYS + ("drop_prob",)

    def __init__(self, nn_model, drop_prob: float = 0.1, **kwargs):
        super().__init__(nn_model, **kwargs)
        self.drop_prob = float(drop_prob)

    @staticmethod
    def check_settings(cfg, require):
        require(cfg.diffusion.augment_prob == 0, "diffusion.augment_prob",
                f"must be 0 for {cfg.model_type} (the sister code trains it without augmentation), got "
                f"{cfg.diffusion.augment_prob}")
        EDM.check_settings(cfg, require)
        require(0.0 <= cfg.diffusion.drop_prob < 1.0, "diffusion.drop_prob",
                f"must be in [0, 1), got {cfg.diffusion.drop_prob}")

    @staticmethod
    def network_calls(steps):
        """Network evaluations per image of the guided Heun sampler: two per Euler step, one per correction."""
        return 3 * steps - 1

    def forward(self, x0, labels, rnd_normal=None, noise=None, drop_mask=None):
        """Training loss of ``EDM.forward`` (its noise levels and weighting; no augmentation), the network seeing
        ``labels`` with the null label where ``drop_mask`` (drawn after sigma and the noise when None) is 1."""
        x = 2 * x0 - 1
        sigma = self.training_sigma(x.shape[0], x.device, rnd_normal)  # (B, 1, 1, 1)
        weight = self.loss_weight(sigma)
        noise = noise_like(noise, x)
        drop_mask = self.drop_mask(labels) if drop_mask is None else drop_mask
        denoised = self.denoise(x + sigma * noise, sigma, c=labels, drop_mask=drop_mask)
        return weighted_mse(denoised, x, None if weight is None else weight.flatten())

    def _denoise(self, x, sigma, aug, network, **conditioning):
        """``EDM._denoise`` for a conditional network: ``conditioning`` is its (c, drop_mask); none: the null label."""
        x = x.to(torch.float32)
        if torch.is_tensor(sigma):
            sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
        else:
            sigma = torch.full((x.shape[0], 1, 1, 1), float(sigma), device=x.device)
        c_skip, c_out, c_in, c_noise = self._preconditioning(sigma, x.shape[0])
        with network():
            F_x = self.nn_model(c_in * x, c_noise, **conditioning)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def denoise(self, x, sigma, aug=None, **conditioning):
        """``EDM.denoise`` with the network's (c, drop_mask) keywords; none: the null label."""
        with network_only(x.device) as network:
            return self._denoise(x, sigma, aug, network, **conditioning)

    def sample(self, n_sample=None, size=None, x_T=None, steps=18, eta=0.0, noise=None, mode="EDM", labels=None,
               w=DEFAULT_W):
        """``EDM.sample`` guided to ``labels`` ((B,) ints; None: image i of class i % n_classes) with scale ``w``."""
        return self.guided_sample(lambda: EDM.sample(self, n_sample, size, x_T, steps, eta, noise, mode),
                                  n_sample, x_T, labels, w)

    def _slope(self, x, sigma, correction=False):
        """The guided slope: (1 + w) * conditional - w * unconditional slope, each from its clipped denoised
        image; the Heun ``correction`` takes the conditional slope alone (the null label's outside ``sample``)."""
        if self._guidance is None:
            return EDM._slope(self, x, sigma)
        labels, w = self._guidance
        if correction:
            denoised = self.denoise(x, sigma, **self.conditioning(labels, x.shape[0], x.device))
            return (x - denoised.to(torch.float64).clamp(-1, 1)) / sigma
        doubled, doubled_labels, mask = self.doubled(x, labels)
        denoised = self.denoise(doubled, sigma, c=doubled_labels, drop_mask=mask).to(torch.float64).clamp(-1, 1)
        return combine((doubled - denoised) / sigma, w)

    def get_feature(self, x0, t, steps=18, name=None, norm=False, noise=None, tokens=False, labels=None):
        """``EDM.get_feature`` with the null label, or with ``labels`` ((B,) ints) when given."""
        return EDM.get_feature(self, x0, t, steps, name, norm, noise, tokens,
                               **self.conditioning(labels, x0.shape[0], x0.device))
