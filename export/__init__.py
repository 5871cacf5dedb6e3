"""ssd_export (folder ``export/``): ``ssd-export``, a training checkpoint -> a verified
bundle (docs/method.md §7, §9).

Modules, in the order the export runs them: ``options`` (checked CLI options), ``pipeline``
(the steps), ``onnx_export`` (per-route ONNX and its fp16 variant), ``weights`` (one shared,
deduplicated external-data file per format), ``torchscript_export``, ``verify`` (against
PyTorch, then end to end through ``ssd_runtime``), ``bundle_writer`` (what an export
may replace, the manifest checked by its typed definition, engine sets registered in it),
``cli``. The folder itself is owned by ``ssd_core.outputs``.
"""
