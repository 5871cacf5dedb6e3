// ssd/runtime.hpp: the SSD runtime from C++, header-only, over pybind11's embedded interpreter.
//
//     ssd::Sampler sampler;                 // the packaged default model (or a bundle path)
//     ssd::Request request;
//     request.n = 4;
//     request.steps = 250;
//     auto images = sampler.sample(request, [](int size, const std::vector<ssd::Image>& previews) { /* draw */ });
//
// CMake: find_package(ssd_runtime CONFIG REQUIRED) and link ssd_runtime::embed; the package
// records the Python environment it was configured against (SSD_RUNTIME_SITE_PACKAGES), and
// the interpreter this header starts adds it, so no environment variable is needed. An app
// that starts its own interpreter first keeps it: the header then only imports the runtime.
//
// Every error a user can cause (a wrong bundle, a bad option, a missing backend) is thrown as
// ssd::Error whose what() is the runtime's one line; nothing is printed, no traceback.
// One thread at a time: the interpreter's lock is held by the thread that started it.
#pragma once

#include <pybind11/embed.h>
#include <pybind11/numpy.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__GNUC__)
#define SSD_RUNTIME_HIDDEN __attribute__((visibility("hidden")))  // as pybind11's own types, which it holds
#else
#define SSD_RUNTIME_HIDDEN
#endif

namespace SSD_RUNTIME_HIDDEN ssd {

namespace py = pybind11;

// One image: height x width x channels bytes, row-major (RGB for the shipped model).
struct Image {
    int width = 0, height = 0, channels = 0;
    std::vector<std::uint8_t> pixels;
};

// Every failure the runtime reports; what() is its one line.
class Error : public std::runtime_error {
   public:
    using std::runtime_error::runtime_error;
};

// How to run the bundle: the options of `ssd-run` (0 / empty: the runtime's default).
struct Options {
    std::string backend = "auto";    // auto, onnxruntime, openvino, torchscript, tensorrt
    std::string precision = "auto";  // auto, fp32, fp16, bf16, int8
    std::string device;              // cpu, cuda, tensorrt
    int threads = 0;                 // 0: the physical cores this process may use
    bool low_memory = false;
};

// What to sample: images first .. first + n - 1 of the seed's streams (0: the default).
struct Request {
    int n = 1;
    int seed = 0;
    int steps = 0;  // 0: all T steps
    int batch = 0;  // 0: the bundle's largest batch (at most n)
    int first = 0;
};

// preview(resolution, images): the clean prediction at each resolution change, coarse first.
using PreviewFn = std::function<void(int, const std::vector<Image>&)>;
// progress(step, total_steps, t, resolution) after every network call.
using ProgressFn = std::function<void(int, int, int, int)>;

namespace detail {

inline void start_python() {
    if (Py_IsInitialized()) {
        return;  // the app's own interpreter
    }
    static std::unique_ptr<py::scoped_interpreter> interpreter;  // lives until the program ends
#ifdef SSD_RUNTIME_PYTHON
    // Python finds its prefix from its executable: the recorded one, so that a virtual
    // environment's pyvenv.cfg and site-packages are found as when that python runs.
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    PyStatus status = PyConfig_SetBytesString(&config, &config.executable, SSD_RUNTIME_PYTHON);
    if (PyStatus_Exception(status)) {
        PyConfig_Clear(&config);
        throw Error("cannot configure the embedded Python for " SSD_RUNTIME_PYTHON);
    }
    interpreter = std::make_unique<py::scoped_interpreter>(&config);  // clears config
#else
    interpreter = std::make_unique<py::scoped_interpreter>();
#endif
#ifdef SSD_RUNTIME_SITE_PACKAGES
    // the environment the build was configured against (its .pth files included)
    py::module_::import("site").attr("addsitedir")(SSD_RUNTIME_SITE_PACKAGES);
#endif
}

// The runtime's one line for its own errors (ssd_core.errors.UserError), else "Type: message".
[[noreturn]] inline void rethrow(py::error_already_set& err) {
    std::string message = py::str(err.value());
    message = message.substr(0, message.find('\n'));
    bool ours = false;
    try {
        ours = py::isinstance(err.value(), py::module_::import("ssd_core.errors").attr("UserError"));
    } catch (py::error_already_set&) {
    }
    if (!ours) {
        message = std::string(py::str(err.type().attr("__name__"))) + ": " + message;
    }
    throw Error(message);
}

template <class F>
auto guarded(F&& call) -> decltype(call()) {
    try {
        return call();
    } catch (py::error_already_set& err) {
        rethrow(err);
    }
}

inline std::vector<Image> to_images(const py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>& array) {
    auto view = array.unchecked<4>();  // [N, H, W, C]
    std::vector<Image> images;
    const std::size_t size = static_cast<std::size_t>(view.shape(1) * view.shape(2) * view.shape(3));
    for (py::ssize_t i = 0; i < view.shape(0); ++i) {
        const std::uint8_t* start = array.data() + i * size;
        images.push_back(Image{static_cast<int>(view.shape(2)), static_cast<int>(view.shape(1)),
                               static_cast<int>(view.shape(3)), std::vector<std::uint8_t>(start, start + size)});
    }
    return images;
}

inline py::object or_none(int value) { return value ? py::object(py::int_(value)) : py::object(py::none()); }

}  // namespace detail

// A bundle opened for sampling: its backend's sessions stay open until close() (or the
// destructor). Movable, not copyable.
class Sampler {
   public:
    // bundle: a bundle folder, or "" for the model packaged with the runtime.
    explicit Sampler(const std::string& bundle = "", const Options& options = {}) {
        detail::start_python();
        detail::guarded([&] {
            py::module_ runtime = py::module_::import("ssd_runtime");
            py::object path = bundle.empty()
                                  ? py::module_::import("ssd_runtime.default_model").attr("packaged_bundle")()
                                  : py::object(py::str(bundle));
            py::dict kwargs;
            kwargs["backend"] = options.backend;
            kwargs["precision"] = options.precision;
            kwargs["device"] = options.device.empty() ? py::object(py::none()) : py::object(py::str(options.device));
            kwargs["threads"] = detail::or_none(options.threads);
            kwargs["low_memory"] = options.low_memory;
            auto lines = std::make_shared<std::vector<std::string>>();
            kwargs["say"] = py::cpp_function([lines](const std::string& line) { lines->push_back(line); });
            sampler_ = runtime.attr("Sampler").attr("from_bundle")(path, **kwargs);
            lines_ = *lines;
            backend_ = py::str(sampler_.attr("backend").attr("name"));
            precision_ = py::str(sampler_.attr("backend").attr("precision"));
            return 0;
        });
    }
    Sampler(const Sampler&) = delete;
    Sampler& operator=(const Sampler&) = delete;
    Sampler(Sampler&& other) noexcept { *this = std::move(other); }
    Sampler& operator=(Sampler&& other) noexcept {
        if (this != &other) {
            close_quietly();
            sampler_ = std::move(other.sampler_);
            backend_ = std::move(other.backend_);
            precision_ = std::move(other.precision_);
            lines_ = std::move(other.lines_);
        }
        return *this;
    }
    ~Sampler() { close_quietly(); }

    // Sample request.n images (uint8, H x W x C each), calling preview at each resolution
    // change and progress after every network call; an exception thrown there ends the
    // sampling and arrives as ssd::Error.
    std::vector<Image> sample(const Request& request, PreviewFn preview = {}, ProgressFn progress = {}) {
        if (!sampler_) {
            throw Error("this ssd::Sampler is closed");
        }
        return detail::guarded([&] {
            py::dict kwargs;
            kwargs["seed"] = request.seed;
            kwargs["steps"] = detail::or_none(request.steps);
            kwargs["batch"] = detail::or_none(request.batch);
            kwargs["first"] = request.first;
            if (preview) {
                kwargs["preview"] = py::cpp_function([&preview](int size, const py::array_t<std::uint8_t>& images) {
                    preview(size, detail::to_images(images));
                });
            }
            if (progress) {
                kwargs["callback"] = py::cpp_function(
                    [&progress](int step, int total, int t, int size) { progress(step, total, t, size); });
            }
            return detail::to_images(sampler_.attr("sample")(request.n, **kwargs));
        });
    }

    // Release the backend (sessions, compiled models, device memory); closing twice is harmless.
    void close() {
        if (sampler_) {
            detail::guarded([&] {
                sampler_.attr("close")();
                return 0;
            });
            sampler_ = py::object();
        }
    }
    bool closed() const { return !sampler_; }
    const std::string& backend() const { return backend_; }      // the backend running, e.g. "onnxruntime"
    const std::string& precision() const { return precision_; }  // the precision running, e.g. "fp32"
    // What auto chose and why (the lines ssd-run prints on stderr).
    const std::vector<std::string>& choices() const { return lines_; }

   private:
    void close_quietly() noexcept {
        if (sampler_ && Py_IsInitialized()) {
            try {
                close();
            } catch (...) {
            }
        }
        sampler_.release();  // nothing left to own (also after the interpreter ended)
    }

    py::object sampler_;
    std::string backend_, precision_;
    std::vector<std::string> lines_;
};

// How many runtime backends are open in this process (0 once every Sampler is closed): a
// check for an app's own tests.
inline int open_backends() {
    detail::start_python();
    return detail::guarded([] {
        py::module_::import("gc").attr("collect")();
        py::object backend = py::module_::import("ssd_runtime").attr("Backend");
        int open = 0;
        for (py::handle item : py::module_::import("gc").attr("get_objects")()) {
            if (py::isinstance(item, backend) && !item.attr("closed").cast<bool>()) {
                ++open;
            }
        }
        return open;
    });
}

}  // namespace ssd
