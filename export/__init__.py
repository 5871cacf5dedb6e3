"""ssd_export: ``ssd-export``, a training checkpoint -> a verified bundle (SPEC §7, §9).

Modules, in the order the export runs them: ``options`` (checked CLI options), ``pipeline``
(the steps), ``onnx_export`` (per-route ONNX and its fp16 variant), ``weights`` (one shared,
deduplicated external-data file per format), ``torchscript_export``, ``verify`` (against
PyTorch, then end to end through ``ssd_runtime``), ``bundle_writer`` (target checks,
staging folder, the manifest checked by its typed definition), ``cli``.
"""
