"""Record tests/golden/uvit_tiny.pt with the sister codebase's own U-ViT (FutureXiang/Diffusion, model/uvit.py):
tiny random-weight networks (unconditional with and without its final convolution and long skips, and
class-conditional with some labels dropped to the null label), their output and every block's output, plus the
parameter names and shapes of its published CIFAR-10 layouts. Never run in CI: it needs a checkout, timm and einops.

    git clone https://github.com/FutureXiang/Diffusion /tmp/sister          # recorded at 4eefaf6
    pip install --target /tmp/uvit_deps --no-deps timm einops               # only for this script
    PYTHONPATH=/tmp/uvit_deps python bench/uvit_golden.py --checkout /tmp/sister

The weights are not stored: ``tests.helpers.seeded_weights(shapes, seed)`` rebuilds them from the recorded seed;
tests/test_uvit.py loads them into our UViT under the sister's parameter names and compares.
"""
import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.helpers import UVIT_GOLDEN, seeded_weights  # noqa: E402

# Each layout: the sister's network keys (= ours), a seed, and whether labels are given.
LAYOUTS = {
    "uncond": (1, dict(image_shape=[3, 8, 8], embed_dim=32, patch_size=2, depth=6, num_heads=4)),
    "plain": (2, dict(image_shape=[3, 16, 16], embed_dim=24, patch_size=4, depth=5, num_heads=3, final_conv=False,
                      skip=False)),
    "cond": (3, dict(image_shape=[3, 8, 8], embed_dim=16, patch_size=2, depth=4, num_heads=2, n_classes=3)),
}
# config/cifar_unconditional_vit.yaml's and cifar_conditional_vit.yaml's networks (names and shapes only).
PUBLISHED = {
    "uncond": dict(image_shape=[3, 32, 32], embed_dim=512, patch_size=2, depth=12, num_heads=8),
    "cond": dict(image_shape=[3, 32, 32], embed_dim=512, patch_size=2, depth=12, num_heads=8, n_classes=10),
}
T = torch.tensor([0.001, 0.3, 0.75, 1.0])  # timestep / n_T, as DDPM feeds the network
LABELS, DROP = torch.tensor([0, 2, 1, 2]), torch.tensor([0.0, 1.0, 0.0, 0.0])


def sister_uvit(checkout):
    """The checkout's model/uvit.py, imported as ``sister_model.uvit`` (our package is also named ``model``)."""
    spec = importlib.util.spec_from_file_location("sister_model", Path(checkout) / "model" / "__init__.py",
                                                  submodule_search_locations=[str(Path(checkout) / "model")])
    sys.modules["sister_model"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["sister_model"])
    return importlib.import_module("sister_model.uvit")


def shapes_of(module):
    return {name: list(value.shape) for name, value in module.state_dict().items()}


def record(uvit, seed, network):
    model = uvit.UViT(**network)
    shapes = shapes_of(model)
    model.load_state_dict(seeded_weights(shapes, seed))
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(len(T), *network["image_shape"], generator=generator)  # noisy images
    blocks, hooks = {}, []
    modules = [(f"in_blocks.{k}", m) for k, m in enumerate(model.in_blocks)] + [("mid_block", model.mid_block)]
    modules += [(f"out_blocks.{k}", m) for k, m in enumerate(model.out_blocks)]
    for name, module in modules:
        hooks.append(module.register_forward_hook(
            lambda module, args, out, name=name: blocks.__setitem__(name, out.detach().clone())))
    golden = {"network": network, "seed": seed, "x": x, "t": T, "shapes": shapes}
    with torch.no_grad():
        if "n_classes" in network:
            golden.update(c=LABELS, drop_mask=DROP, out=model(x, T, LABELS, DROP), blocks=dict(blocks))
            everything_dropped = torch.ones_like(DROP)
            golden["out_null"] = model(x, T, LABELS, everything_dropped)  # every label the null one
        else:
            golden.update(out=model(x, T), blocks=dict(blocks))
            golden["out_one_t"] = model(x, T[2:3])  # one timestep for the whole batch
    for hook in hooks:
        hook.remove()
    return golden


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="a checkout of github.com/FutureXiang/Diffusion")
    args = parser.parse_args()
    uvit = sister_uvit(args.checkout)
    golden = {layout: record(uvit, seed, network) for layout, (seed, network) in LAYOUTS.items()}
    with torch.device("meta"):
        golden["published"] = {layout: {"network": network, "shapes": shapes_of(uvit.UViT(**network))}
                               for layout, network in PUBLISHED.items()}
    torch.save(golden, UVIT_GOLDEN)
    for layout in LAYOUTS:
        print(f"{UVIT_GOLDEN.relative_to(ROOT)}[{layout}]: {golden[layout]['network']}; "
              f"out std {golden[layout]['out'].std():.4f}")


if __name__ == "__main__":
    main()
