"""Optional TensorBoard logging (``--tensorboard``): scalars and image grids under save_dir/tb/.

    board = open_board(args.tensorboard, os.path.join(cfg.save_dir, "tb", "train"))
    board.scalars({"loss": 0.05, "lr": 2e-4}, step=100, prefix="train/")
    board.image_file("samples", "save_dir/visual/image_ep0_ema.png", step=100)
    board.close()

log.jsonl and the JSON result files stay the source of truth; TensorBoard shows the same numbers.
The tensorboard package is imported only when the flag is given, and only the main process writes.
Without the flag (and on other ranks) ``open_board`` returns a board that does nothing.
"""
import os

import numpy as np
from PIL import Image

from utils.distributed import is_main
from utils.errors import UserError

INSTALL = "pip install tensorboard"


def add_tensorboard_arg(parser):
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write scalars and sample grids for TensorBoard into save_dir/tb/ "
                             f"(needs the tensorboard package: {INSTALL})")
    return parser


class Board:
    """A TensorBoard event writer, or nothing at all when ``writer`` and ``open_writer`` are None.

    With ``open_writer`` the writer (and so its event file) is made at the first write: a run that
    logs nothing, such as the restart of a finished one, leaves no empty event file behind.
    """

    def __init__(self, writer=None, open_writer=None):
        self.writer = writer
        self._open_writer = open_writer

    @property
    def enabled(self):
        return self.writer is not None or self._open_writer is not None

    def _ready(self):
        if self.writer is None and self._open_writer is not None:
            self.writer, self._open_writer = self._open_writer(), None
        return self.writer

    def scalars(self, values, step, prefix=""):
        """One scalar per entry of ``values`` whose value is a number (None and others are skipped)."""
        if self._ready() is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def image_file(self, tag, path, step):
        """The PNG at ``path`` (a sample grid) as an image."""
        if self._ready() is None:
            return
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self._open_writer = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_board(enabled, log_dir):
    """A ``Board`` writing into ``log_dir`` when ``enabled`` on the main process, else a silent one.

    Raises:
        UserError: the tensorboard package is missing, or ``log_dir`` cannot be created.
    """
    if not enabled or not is_main():
        return Board()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package, which is not installed; "
                        f"{INSTALL}, or drop --tensorboard") from None
    try:
        os.makedirs(log_dir, exist_ok=True)  # a folder that cannot be made fails here, before any work
    except OSError as err:
        raise UserError(f"--tensorboard: cannot write {log_dir} ({err.strerror}); choose a writable "
                        f"save_dir") from None
    return Board(open_writer=lambda: SummaryWriter(log_dir=log_dir))
