"""Which (timestep, block) cells a probe evaluates: the config's one cell, or the grid.

    timesteps, blocks = probe_cells(cfg, grid=True)   # the cells are every (t, block) pair
"""
from utils.config import EDM_FEATURE_STEPS
from utils.errors import UserError

# The original's --grid: DDPM timesteps out of n_T, EDM indices into the 18-step schedule. DiT (our
# choice, around its probe defaults t = 81 and 121): timesteps out of 0..999.
GRID_TIMESTEPS = {"DDPM": (1, 11, 21), "EDM": (3, 4, 5), "DiT": (41, 81, 121, 161, 201)}


def probe_cells(cfg, grid=False, timestep_flag=None):
    """The timesteps and blocks to probe: the grid (every block) or cfg.linear.timestep / blockname.

    ``timestep_flag`` names the flag that set linear.timestep (e.g. "--timestep") in error messages.

    Returns:
        (timesteps, blocks): a list of ints and a list of block names (``out_k``, DiT ``layer-k``);
        the probed cells are every (timestep, block) pair.

    Raises:
        UserError: a timestep that the diffusion model of ``cfg`` cannot noise to.
    """
    blocks = cfg.network.block_names if grid else [cfg.linear.blockname]
    timesteps = list(GRID_TIMESTEPS[cfg.model_type]) if grid else [cfg.linear.timestep]
    if cfg.model_type == "DDPM":
        top, what = cfg.diffusion.n_T, "diffusion.n_T"
        low = 0
    elif cfg.model_type == "DiT":
        top, what = cfg.diffusion.n_T - 1, "DiT's timesteps, below diffusion.n_T"
        low = 0
    else:
        top, what = EDM_FEATURE_STEPS, f"the EDM feature schedule of {EDM_FEATURE_STEPS} steps"
        low = 1
    for t in timesteps:
        if not low <= t <= top:
            source = "--grid" if grid else timestep_flag or "linear.timestep"
            raise UserError(f"{source}: timestep {t} is outside {low}..{top} ({what}); "
                            f"{'raise diffusion.n_T' if grid else f'set {source} in {low}..{top}'}")
    return timesteps, blocks


def cell_label(t, block):
    """The printed name of a probed cell, e.g. ``11/out_6``."""
    return f"{t}/{block}"
