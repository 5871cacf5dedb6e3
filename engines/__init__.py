"""``ssd_engines`` (folder ``engines/``): TensorRT engines for a bundle (``ssd-export ... --engine trt``).

``build.py`` builds (or refits) one engine per route from its fused step graph, checks it
against ONNX Runtime and returns the engine set's record (``ssd_core.engine_registry``),
which the exporter registers in the manifest. Nothing here is imported unless an engine
build is asked for; TensorRT itself only inside the build.
"""
