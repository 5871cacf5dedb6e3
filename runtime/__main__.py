"""``python -m ssd_runtime --includes | --cflags | --cmakedir | --cmake-args``: how a C++ build finds the
runtime's header (``ssd/runtime.hpp``), pybind11's and Python's, and the CMake package
(``find_package(ssd_runtime CONFIG REQUIRED)``), after pybind11's own ``python -m pybind11``."""
from __future__ import annotations

import argparse
import shlex
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent


def include_dirs() -> list[str]:
    """The runtime's header folder, then pybind11's and this Python's (pybind11 from the 'cpp' extra)."""
    folders = [str(HERE / "include")]
    try:
        import pybind11
    except ImportError:
        sys.exit("error: pybind11 is not installed here: pip install 'ssd-diffusion[cpp]' "
                 "(in a source checkout: pip install -e '.[cpp]')")
    return folders + [pybind11.get_include(), sysconfig.get_paths()["include"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ssd_runtime", description=__doc__.split("\n")[0])
    parser.add_argument("--includes", action="store_true", help="compiler flags: -I for every header folder")
    parser.add_argument("--cflags", action="store_true",
                        help="--includes, and the -D flags that record this Python for the embedded interpreter")
    parser.add_argument("--cmakedir", action="store_true", help="the folder of ssd_runtimeConfig.cmake")
    parser.add_argument("--cmake-args", action="store_true",
                        help="cmake -D flags for this Python environment: ssd_runtime_DIR and SSD_RUNTIME_PYTHON")
    args = parser.parse_args(argv)
    if args.includes:
        print(" ".join(f"-I{folder}" for folder in include_dirs()))
    elif args.cflags:
        recorded = [f'-DSSD_RUNTIME_PYTHON="{sys.executable}"',
                    f'-DSSD_RUNTIME_SITE_PACKAGES="{sysconfig.get_paths()["purelib"]}"']
        print(" ".join(shlex.quote(flag) for flag in [*(f"-I{f}" for f in include_dirs()), *recorded]))
    elif args.cmakedir:
        print(HERE / "cmake")
    elif args.cmake_args:
        print(f"-Dssd_runtime_DIR={HERE / 'cmake'} -DSSD_RUNTIME_PYTHON={sys.executable}")
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
