"""ssd_core (folder ``core/``): the torch-free contract every stage shares, in the order they build on it.

``errors`` (one-line user errors and the CLI wrapper), ``files`` (bounded reads, strict
JSON, atomic writes), ``outputs`` (the one owner of output folders: kinds, locks),
``schema`` (typed documents), ``config`` (model, process and training configs), ``method``
(the method's numbers: schedules, resize matrices, posterior coefficients, the sampling
loop, for any resolution ladder; docs/method.md), ``bundle`` (the bundle contract and its
reader), ``engine_registry``, ``precision``, ``cases`` (seeded check inputs), ``images`` (PNGs), ``torchscript_check`` (inspecting
TorchScript before it runs; torch only inside).

Imports numpy, never torch or onnx (a test guards it).
"""
__version__ = "0.1.0"
