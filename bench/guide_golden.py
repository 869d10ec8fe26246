"""Record tests/golden/guide_{ddpm,edm}.pt with the sister codebase's own code (FutureXiang/Diffusion, "Minimal
Diffusion"): tiny random-weight UNet_guide networks in its DDPM and EDM (DDPM++) layouts, their output and
per-block pooled activations at mixed labels and drop masks, the training loss of DDPM_guide / EDM_guide at
fixed (t or ln sigma, noise, labels, drop mask) and the draws its forward makes from a seed, one guided
prediction (DDPM_guide.pred_eps_ / EDM_guide.pred_eps_cfg) and short guided samplers from a fixed start
(DDIM, ancestral DDPM, EDM Heun), and its cosine schedule. Never run in CI: it needs a checkout.

    git clone https://github.com/FutureXiang/Diffusion /tmp/fx                     # recorded at 4eefaf6
    python bench/guide_golden.py --sister /tmp/fx

Its model/DDPM_guide.py, EDM_guide.py, unet_guide.py and block.py need only torch and tqdm; they are loaded as a
package of another name, since both codebases call theirs ``model``. The weights are not stored:
``tests.helpers.seeded_weights(shapes, seed)`` rebuilds them from the recorded seed; tests/test_guide.py
compares our UNet_guide, DDPM_guide and EDM_guide.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.helpers import GUIDE_GOLDEN, seeded_weights  # noqa: E402

BATCH = 4
CLASSES = 10
W = 0.3
# Each layout: the network keys (a narrow version of its config), the diffusion keys, and the seed.
LAYOUTS = {
    "ddpm": (1, dict(image_shape=[3, 8, 8], n_channels=32, ch_mults=[1, 2], is_attn=[False, True], dropout=0.1,
                     n_blocks=1, use_res_for_updown=False, n_classes=CLASSES),  # cifar_conditional.yaml, narrower
             dict(n_T=20, betas=[1.0e-4, 0.02])),
    "edm": (2, dict(image_shape=[3, 8, 8], n_channels=32, ch_mults=[2, 2], is_attn=[False, True], dropout=0.13,
                    n_blocks=2, use_res_for_updown=True, attn_channels_per_head=16, n_classes=CLASSES),
            dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2, sigma_min=0.002, sigma_max=80, rho=7, S_min=0.01, S_max=1,
                 S_noise=1.007)),  # cifar_conditional_EDM.yaml's diffusion, a narrower network with 2 heads
}


def load_sister(checkout):
    """The checkout's ``model`` package, imported as ``sister_model`` (without its models.py, which needs timm)."""
    folder = Path(checkout) / "model"
    spec = importlib.util.spec_from_file_location("sister_model", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["sister_model"] = package
    spec.loader.exec_module(package)
    return {name: importlib.import_module(f"sister_model.{name}") for name in ("unet_guide", "DDPM_guide", "EDM_guide")}


def pooled_blocks(net):
    """Forward hooks recording every down / middle / up module's output averaged over H and W."""
    pooled, hooks = {}, []
    names = [(f"down_{k}", m) for k, m in enumerate(net.down)] + [("middle", net.middle)]
    names += [(f"up_{k}", m) for k, m in enumerate(net.up)]
    for name, module in names:
        hooks.append(module.register_forward_hook(
            lambda module, args, out, name=name: pooled.__setitem__(name, out.float().mean(dim=(2, 3)))))
    return pooled, hooks


def record(sister, layout):
    seed, network, diffusion = LAYOUTS[layout]
    net = sister["unet_guide"].UNet_guide(**network)
    shapes = {name: list(value.shape) for name, value in net.state_dict().items()}
    net.load_state_dict(seeded_weights(shapes, seed))
    net.eval()  # no dropout: the loss is a function of its inputs
    kind = sister["DDPM_guide"].DDPM_guide if layout == "ddpm" else sister["EDM_guide"].EDM_guide
    diff = kind(net, **diffusion, device="cpu", drop_prob=0.1)
    size = tuple(network["image_shape"])

    generator = torch.Generator().manual_seed(seed + 1000)
    x0 = torch.rand(BATCH, *size, generator=generator)  # images in [0, 1]
    labels = torch.tensor([3, 0, 9, 3])
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0])  # 1: the label is dropped
    x_net = torch.randn(BATCH, *size, generator=generator)
    t_net = torch.tensor([0.05, 0.3, 0.55, 0.95]) if layout == "ddpm" else torch.tensor([-1.5, -0.4, 0.3, 1.1])
    golden = {"layout": layout, "seed": seed, "network": network, "diffusion": diffusion, "shapes": shapes, "w": W,
              "x0": x0, "labels": labels, "mask": mask, "x_net": x_net, "t_net": t_net}
    pooled, hooks = pooled_blocks(net)
    with torch.no_grad():
        golden["out"] = net(x_net, t_net, labels, mask)
    golden["pooled"] = dict(pooled)
    for hook in hooks:
        hook.remove()

    # The training loss from a seed: the draws its forward makes (t or ln sigma, noise, mask), replayed in order.
    with torch.no_grad():
        torch.manual_seed(seed + 2000)
        golden["loss"] = diff(x0, labels)
        torch.manual_seed(seed + 2000)
        if layout == "ddpm":
            golden["t"] = torch.randint(1, diffusion["n_T"] + 1, (BATCH,))
        else:
            golden["rnd_normal"] = torch.randn((BATCH, 1, 1, 1))
        golden["noise"] = torch.randn_like(x0)
        golden["drop"] = torch.bernoulli(torch.zeros_like(labels) + 0.1)
        golden["loss_seed"] = seed + 2000

    # Guided sampling: n_sample = one image per class, labels 0..9 (its prepare_condition_).
    n = CLASSES
    generator = torch.Generator().manual_seed(seed + 3000)
    golden["x_T"] = torch.randn(n, *size, generator=generator)
    with torch.no_grad():
        model_args = diff.prepare_condition_(n)
        if layout == "ddpm":
            t, alpha = 11, diff.ddim_sche["alphabar_t"][11]
            eps, x0_t = diff.pred_eps_(golden["x_T"], torch.full((n,), t / diffusion["n_T"]), model_args, W, alpha,
                                       use_amp=False)
            golden.update(step_t=t, step_eps=eps, step_x0=x0_t)
            # Its samplers draw x_T (and then each step's noise) from the global generator: replay the seed.
            for name, call in (("ddim", lambda: diff.ddim_sample(n, size, steps=4, eta=0.0, guide_w=W, notqdm=True)),
                               ("ddim_eta", lambda: diff.ddim_sample(n, size, steps=4, eta=0.5, guide_w=W,
                                                                     notqdm=True)),
                               ("ancestral", lambda: diff.sample(n, size, guide_w=W, notqdm=True))):
                torch.manual_seed(seed + 4000)
                golden[name] = call()
        else:
            sigma = torch.tensor(2.5, dtype=torch.float64)
            x = golden["x_T"].double() * sigma
            golden.update(step_sigma=sigma, step_x=x,
                          step_slope=diff.pred_eps_cfg(x, sigma, model_args, W, use_amp=False),
                          step_slope_cond=diff.pred_eps_(x, sigma, model_args, use_amp=False))
            torch.manual_seed(seed + 4000)
            golden["heun"] = diff.edm_sample(n, size, steps=5, eta=0.0, guide_w=W, notqdm=True)
        golden["sample_seed"] = seed + 4000
    return golden


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sister", required=True, help="a checkout of github.com/FutureXiang/Diffusion")
    args = parser.parse_args()
    sister = load_sister(args.sister)
    schedules = sister["DDPM_guide"].schedules
    cosine = {kind: schedules("cosine", 1000, "cpu", kind)["alphabar_t"] for kind in ("DDPM", "DDIM")}
    for layout in LAYOUTS:
        golden = record(sister, layout)
        golden["cosine_alphabar"] = cosine  # its betas: 'cosine' (config/cifar_unconditional_cosine.yaml)
        torch.save(golden, GUIDE_GOLDEN[layout])
        print(f"{GUIDE_GOLDEN[layout].relative_to(ROOT)}: loss {golden['loss'].item():.6f}")


if __name__ == "__main__":
    main()
