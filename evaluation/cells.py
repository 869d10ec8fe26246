"""Which (timestep, block) cells a probe evaluates: the config's one cell, or the grid.

    timesteps, blocks = probe_cells(cfg, grid=True)   # the cells are every (t, block) pair
    timesteps, blocks = probe_cells(cfg, grid=True, blocks="in_3,mid,out_6")   # --blocks
"""
from model.models import block_names, diffusion_class
from utils.errors import UserError


def probe_cells(cfg, grid=False, blocks=None):
    """The timesteps and blocks to probe: the grid or cfg.linear.timestep / blockname.

    The grid's timesteps are ``grid_timesteps`` (DDPM: the original's 1, 11, 21, or those of the same
    noise levels on another schedule; EDM: the original's 3, 4, 5) and
    its blocks the network's ``grid_blocks`` (a UNet's out_k), or ``blocks``. ``model.models.load_config``
    has checked linear.timestep against the same range.

    Args:
        blocks: None, or block names (``--blocks``: a list of strings, each may be comma-separated)
            that replace the grid's blocks (with ``grid``) or linear.blockname.

    Returns:
        (timesteps, blocks): a list of ints and a list of block names; the probed cells are every
        (timestep, block) pair.

    Raises:
        UserError: a grid timestep that the diffusion model of ``cfg`` cannot noise to, or an unknown block.
    """
    kind = diffusion_class(cfg.model_type)
    if blocks is not None:
        blocks = [blocks] if isinstance(blocks, str) else blocks
        names = list(dict.fromkeys(name.strip() for text in blocks for name in text.split(",") if name.strip()))
        known = block_names(cfg)
        unknown = [name for name in names if name not in known] or ([] if names else [",".join(blocks)])
        if unknown:
            raise UserError(f"--blocks: unknown block {unknown[0]!r}; this network has {', '.join(known)}")
    else:
        names = block_names(cfg, grid=True) if grid else [cfg.linear.blockname]
    if not grid:
        return [cfg.linear.timestep], names
    low, top, what = kind.feature_timesteps(cfg.diffusion)
    timesteps = grid_timesteps(kind, cfg.diffusion)
    for t in timesteps:
        if not low <= t <= top:
            raise UserError(f"--grid: timestep {t} is outside {low}..{top} ({what}); raise diffusion.n_T")
    return timesteps, names


def grid_timesteps(kind, settings):
    """The ``--grid`` timesteps of diffusion class ``kind`` with diffusion section ``settings``: its
    ``probe_grid_for(settings)`` where it has one (DDPM: the noise levels of the original's grid on any
    schedule), else its fixed ``probe_grid``."""
    probe_grid_for = getattr(kind, "probe_grid_for", None)
    return list(probe_grid_for(settings) if probe_grid_for else kind.probe_grid)


def format_timesteps(timesteps):
    """The probed timesteps as printed before a probe, e.g. ``9, 92, 174``."""
    return ", ".join(map(str, timesteps))


def cell_label(t, block):
    """The printed name of a probed cell, e.g. ``11/out_6``."""
    return f"{t}/{block}"
