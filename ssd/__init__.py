"""Scale Space Diffusion: the method (numpy), the Flexi-UNet and the trainer (torch).

This package's ``__init__`` imports nothing so that the torch-free runtime can import
``ssd.method`` and ``ssd.config`` without pulling in torch.
"""
__version__ = "0.1.0"
