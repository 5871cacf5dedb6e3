"""One distribution, four import packages: ssd (method + trainer), ssd_export, ssd_engines,
ssd_runtime. The base install is what the runtime needs; the rest are extras."""
from setuptools import setup

TORCH = "torch>=2.4"  # GPU users bring their own build; `make` pins the CPU wheel.

setup(
    name="ssd-diffusion",
    version="0.1.0",
    description="Scale Space Diffusion: train, export and run multi-resolution diffusion models",
    python_requires=">=3.10",
    packages=["ssd", "ssd_export", "ssd_engines", "ssd_runtime"],
    package_dir={
        "ssd": "ssd",
        "ssd_export": "export",
        "ssd_engines": "engines",
        "ssd_runtime": "runtime",
    },
    package_data={"ssd_export": ["*.json"]},
    install_requires=["numpy>=2.0", "onnxruntime>=1.17", "click>=8.1", "Pillow>=10", "tqdm>=4.66"],
    extras_require={
        "train": [TORCH, "safetensors>=0.4"],
        "export": [TORCH, "safetensors>=0.4", "onnx>=1.16", "onnxscript>=0.1", "jsonschema>=4"],
        "trt": ["tensorrt>=10", "polygraphy>=0.49"],
        "gpu": ["onnxruntime-gpu>=1.17"],
        "dev": ["pytest>=8", "jsonschema>=4", "pybind11>=2.11"],
    },
    entry_points={
        "console_scripts": [
            "ssd-train=ssd.cli:train_main",
            "ssd-sample=ssd.cli:sample_main",
            "ssd-export=ssd_export.cli:main",
            "ssd-run=ssd_runtime.cli:main",
        ]
    },
)
