"""ssd: the Flexi-UNet and the trainer (torch), built on the torch-free ``ssd_core``."""
from ssd_core import __version__

__all__ = ["__version__"]
