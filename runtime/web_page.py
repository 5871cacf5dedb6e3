"""The browser page's Python side: ``ssd-web`` serves the page (``runtime/web``) and one bundle
on 127.0.0.1, and :func:`write_noise_file` writes the noise of a run for the page's test hook.

    ssd-web                       # the packaged Fashion-MNIST model
    ssd-web bundles/mine --port 8800

The server answers GET and HEAD for a fixed table of files made at start, and nothing else:

- ``/`` and the page's own files (``index.html``, ``*.mjs``, ``*.css`` of ``runtime/web``);
- ``/ort/<file>``: ONNX Runtime Web's ES modules and WebAssembly, from the npm package that
  ``npm ci --prefix runtime/web`` installed (pinned by ``runtime/web/package-lock.json``;
  never a CDN);
- ``/bundle/manifest.json`` and the fp32 ONNX files the manifest lists (step graphs, route
  graphs, weights).

A request path is looked up in that table as a string: no path is ever joined from a
request, so there is no listing and no escape. Bundle files are served only while they are
regular files inside the bundle and no larger than the manifest lists; the page checks each
file's sha256 itself. Before serving, the bundle's step plans (``ssd_core.step_plans``) are
recomputed from its process and compared: a page never gets a number unchecked.

The headers make the page cross-origin isolated (``Cross-Origin-Opener-Policy`` and
``-Embedder-Policy``), which WebAssembly threads need.
"""
from __future__ import annotations

import json
import signal
import struct
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click
import numpy as np

from ssd_core.bundle import MANIFEST, Bundle, BundleError, load_bundle
from ssd_core.cache import read_regular
from ssd_core.checks import check_seed
from ssd_core.errors import UserError, cli_errors, run_cli
from ssd_core.files import inside, write_atomic
from ssd_core.method import SampleNoise, draw_sizes

from .default_model import packaged_bundle

PAGE_FOLDER = Path(__file__).resolve().parent / "web"
PAGE_SUFFIXES = (".html", ".mjs", ".css")
ORT_PACKAGE = Path("node_modules") / "onnxruntime-web" / "dist"
# what the page imports: the WASM build, the WebGPU build, and the runtimes they load
ORT_FILES = ("ort.wasm.min.mjs", "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
BUNDLE_FORMAT = "onnx"  # the page runs the fp32 graphs
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json", ".wasm": "application/wasm"}
HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
           "Cross-Origin-Resource-Policy": "same-origin", "X-Content-Type-Options": "nosniff",
           "Cache-Control": "no-store"}
DEFAULT_PORT = 8765
MAX_PAGE_FILE = 256 << 20  # bytes of a page or ONNX Runtime Web file (its largest WebAssembly: 29 MB)


class WebError(UserError):
    """The page or its ONNX Runtime Web files are missing, or the bundle cannot be served."""


@dataclass(frozen=True)
class Served:
    """One servable file: where it is, its content type, and the most bytes it may have."""

    path: Path
    content_type: str
    limit: int | None = None  # a bundle file: its manifest size
    root: Path | None = None  # a bundle file: the folder it must stay inside


def content_type(name: str) -> str:
    return CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")


def page_files(folder: Path = PAGE_FOLDER) -> dict[str, Served]:
    """The page's own files by URL path, ``/`` being ``index.html``."""
    files = {f"/{path.name}": Served(path, content_type(path.name)) for path in sorted(folder.iterdir())
             if path.suffix in PAGE_SUFFIXES and path.is_file() and not path.is_symlink()}
    if "/index.html" not in files:
        raise WebError(f"the browser page is missing ({folder / 'index.html'}); reinstall ssd-diffusion")
    return {"/": files["/index.html"], **files}


def ort_files(folder: Path = PAGE_FOLDER) -> dict[str, Served]:
    """ONNX Runtime Web's files under ``/ort/``, from the installed npm package."""
    dist = folder / ORT_PACKAGE
    missing = [name for name in ORT_FILES if not (dist / name).is_file()]
    if missing:
        raise WebError(f"ONNX Runtime Web is not installed ({dist / missing[0]} is missing): run "
                       f"'npm ci --prefix {folder}' (make demo does)")
    return {f"/ort/{name}": Served(dist / name, content_type(name)) for name in ORT_FILES}


def bundle_files(bundle: Bundle) -> dict[str, Served]:
    """``/bundle/manifest.json`` and every fp32 ONNX file the manifest lists, once its step
    plans are checked; one line where the page could not run the bundle."""
    bundle.step_plans()  # recomputed and compared, or BundleError
    if not bundle.has_step_graphs(BUNDLE_FORMAT):
        raise BundleError(f"{bundle.path} has no fused ONNX step graphs, which the page runs: re-export it "
                          "with ssd-export (step graphs are on by default)")
    entries = [bundle.weights_file(BUNDLE_FORMAT)]
    for name in bundle.routes:
        entries += [bundle.route_file(name, BUNDLE_FORMAT), bundle.route_file(name, BUNDLE_FORMAT, step=True)]
    files = {"/bundle/manifest.json": Served(bundle.path / MANIFEST, "application/json", 64 << 20, bundle.path)}
    for entry in entries:
        files[f"/bundle/{entry.path}"] = Served(bundle.path / entry.path, content_type(entry.path), entry.bytes,
                                                bundle.path)
    return files


def read_served(served: Served) -> bytes:
    """A file's bytes for a response, read bounded and only from a regular file (never
    through a link, never a FIFO or device): a bundle file only while it is inside the
    bundle and within its listed size; :class:`WebError` otherwise."""
    path = served.path
    if served.root is not None:
        path = inside(served.root, str(served.path.relative_to(served.root)), WebError, str(served.root))
    data = read_regular(path, served.limit if served.limit is not None else MAX_PAGE_FILE)
    if data is None:
        raise WebError(f"{path} is not a regular file, or is larger than "
                       + ("its manifest says" if served.limit is not None else f"{MAX_PAGE_FILE} bytes"))
    return data


def make_handler(files: dict[str, Served], log=None, warn=lambda line: None):
    """A request handler class over ``files`` (URL path -> :class:`Served`); ``log`` gets
    each request's line, ``warn`` each refusal's reason."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "ssd-web"
        sys_version = ""

        def do_GET(self):
            served = files.get(unquote(urlsplit(self.path).path))
            if served is None:
                return self.send_text(HTTPStatus.NOT_FOUND, "not found")
            try:
                data = read_served(served)
            except (UserError, OSError) as err:  # the reason, with its paths, goes to the server's log only
                warn(f"ssd-web: refused {self.path[:200]}: {str(err).splitlines()[0]}")
                return self.send_text(HTTPStatus.FORBIDDEN, "refused: the file changed on the server (its log says how)")
            self.send(HTTPStatus.OK, served.content_type, data)

        do_HEAD = do_GET  # send() leaves out the body

        def send_text(self, status: HTTPStatus, text: str) -> None:
            self.send(status, "text/plain; charset=utf-8", (text + "\n").encode())

        def send(self, status: HTTPStatus, kind: str, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            for key, value in HEADERS.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_POST(self):
            self.send_text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD")

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

        def log_message(self, format, *args):
            if log is not None:
                log(format % args)

    return Handler


def serve(bundle_path, port: int = DEFAULT_PORT, page: Path = PAGE_FOLDER, log=None,
          warn=lambda line: None) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:``port`` (0: any free port) for the page and the bundle at
    ``bundle_path``, not yet serving: call ``serve_forever`` (tests run it in a thread)."""
    files = {**page_files(page), **ort_files(page), **bundle_files(load_bundle(bundle_path))}
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), make_handler(files, log, warn))
    except OSError as err:
        raise WebError(f"cannot listen on 127.0.0.1:{port}: {err.strerror or err} (another --port?)") from None


def serve_in_thread(bundle_path, port: int = 0, page: Path = PAGE_FOLDER, warn=lambda line: None):
    """``(server, url)``: the server running in a daemon thread; ``server.shutdown()`` ends it."""
    server = serve(bundle_path, port, page, warn=warn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


# Chromium as the probe of this project's machines starts it: no sandbox (root), no GPU, and no
# background networking (the machines' closed network refuses it, many connections at a time).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,900")


def headless_chromium(user_data_dir, chromium: str = "/usr/bin/chromium", driver: str = "/usr/bin/chromedriver"):
    """A Selenium driver of Debian's headless Chromium (packages chromium, chromium-driver),
    for the page's tests and benchmark: nothing is downloaded. ``driver.quit()`` ends it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    browser.set_script_timeout(600)
    return browser


@click.command("ssd-web", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--quiet", is_flag=True, help="Do not log requests.")
@cli_errors
def web_command(bundle, port, quiet):
    """Serve the browser page that samples BUNDLE with ONNX Runtime Web (default: the shipped
    Fashion-MNIST model) on 127.0.0.1, and print its address. Ctrl-C or SIGTERM stops it."""
    # stops on both, even where the launcher left SIGINT ignored (a shell's background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    say = lambda line: click.echo(line, err=True)
    server = serve(bundle if bundle is not None else packaged_bundle(), port, log=None if quiet else say, warn=say)
    click.echo(f"ssd-web: serving {bundle or 'the shipped model'} at http://127.0.0.1:{server.server_address[1]}/ "
               "(Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(args=None):
    """Entry point of ``ssd-web``."""
    run_cli(web_command, args, prog_name="ssd-web")



# --------------------------------------------------------------------------- the noise file
NOISE_MAGIC = b"SSDNOISE"


def write_noise_file(path, bundle_path, seed: int, n: int, steps: int, first: int = 0) -> Path:
    """The white noise of samples ``first .. first + n - 1`` of a run with ``seed`` and
    ``steps``, as the Python runtime draws it (``ssd_core.method.SampleNoise``), in the file
    the page's test hook reads (``FileNoise`` in ``runtime/web/ssd-web.mjs``): the magic
    ``SSDNOISE``, a little-endian uint32 header length, a JSON header padded to 4 bytes, then
    float32 little-endian, sample after sample, each sample's draws in loop order. With it
    the page's images equal the Python runtime's within one level."""
    bundle = load_bundle(bundle_path)
    steps = bundle.space.check_steps(steps)
    sizes = draw_sizes(bundle.space.plan(steps))
    channels = bundle.config.model.in_channels
    noise = SampleNoise(check_seed(seed), range(first, first + n), channels)
    draws = np.concatenate([noise.draw(size).reshape(n, -1) for size in sizes], axis=1)
    header = json.dumps({"format": "ssd-noise", "version": 1, "seed": seed, "first": first, "n": n, "steps": steps,
                         "channels": channels, "sizes": sizes, "floats_per_sample": int(draws.shape[1])}).encode()
    header += b" " * (-(len(NOISE_MAGIC) + 4 + len(header)) % 4)
    data = NOISE_MAGIC + struct.pack("<I", len(header)) + header + draws.astype("<f4").tobytes()
    return write_atomic(Path(path), data)


if __name__ == "__main__":
    main()
