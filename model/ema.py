"""Exponential moving average of the diffusion model, with the original's ema-pytorch settings."""
import torch
from ema_pytorch import EMA


def make_ema(diffusion, beta):
    """The original's EMA: every step from the first, ema-pytorch's warm-up min(beta, 1 - (1 + n)^(-2/3))."""
    return EMA(diffusion, beta=beta, update_after_step=0, update_every=1)


class SyncFreeEMA:
    """Drives an ema-pytorch ``EMA`` with the same arithmetic as ``EMA.update()``, minus host syncs.

    ``EMA.update()`` reads its step counter with ``.item()`` on every call, which stalls a GPU. Here
    the counter is mirrored on the host, the decay is computed in Python, and all tensors are updated
    with one ``torch._foreach_lerp_``. The wrapped object, its state dict and its checkpoints are
    unchanged, so runs move freely between the two update paths.
    """

    def __init__(self, ema):
        self.ema = ema
        self.step = int(ema.step)  # one sync, at construction or after loading a checkpoint
        self._pairs = None

    def _tensor_pairs(self):
        if self._pairs is None:
            ema_model, online = self.ema.ema_model, self.ema.model
            online_params = dict(online.named_parameters())
            online_buffers = dict(online.named_buffers())
            pairs = [(p, online_params[n]) for n, p in ema_model.named_parameters() if n in self.ema.parameter_names]
            pairs += [(b, online_buffers[n]) for n, b in ema_model.named_buffers() if n in self.ema.buffer_names]
            self._pairs = ([t.data for t, _ in pairs], [s.data for _, s in pairs])
        return self._pairs

    def decay(self, step):
        """EMA decay used by the ``step``-th update (ema-pytorch's warm-up with inv_gamma 1, power 2/3)."""
        epoch = step - self.ema.update_after_step - 1
        if epoch <= 0:
            return 0.0
        # float32 on the CPU, as ema-pytorch computes it from its step buffer, so results are bitwise equal
        value = 1 - (1 + torch.tensor(float(epoch)) / self.ema.inv_gamma) ** -self.ema.power
        return value.clamp(min=self.ema.min_value, max=self.ema.beta).item()

    @torch.no_grad()
    def update(self):
        targets, sources = self._tensor_pairs()
        self.step += 1
        self.ema.step += 1
        if self.step == 1:
            torch._foreach_copy_(targets, sources)
            self.ema.initted.fill_(True)
            return
        torch._foreach_lerp_(targets, sources, 1.0 - self.decay(self.step))
