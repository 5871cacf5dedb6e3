// Embedding the SSD runtime next to C++ code: start a Python interpreter with pybind11,
// sample images through ssd_runtime, and copy them into a C++ buffer (here written as PPM).
//
// Build: see Makefile beside this file.  Run:  ./ssd_embed BUNDLE OUT.ppm [STEPS] [SEED]
// If the runtime lives in a virtual environment, set SSD_SITE_PACKAGES to its site-packages.
#include <pybind11/embed.h>
#include <pybind11/numpy.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace py = pybind11;

struct Image {
    int height = 0, width = 0, channels = 0;
    std::vector<uint8_t> pixels;  // row-major H x W x C
};

// Sample one image with the runtime's Python API; every Python error becomes a C++ exception.
Image sample_image(const std::string& bundle, int steps, int seed) {
    py::module_ runtime = py::module_::import("ssd_runtime");
    py::object sampler = runtime.attr("Sampler").attr("from_bundle")(bundle);
    py::array_t<uint8_t, py::array::c_style> images =
        sampler.attr("sample")(1, py::arg("seed") = seed, py::arg("steps") = steps);
    auto view = images.unchecked<4>();  // [N, H, W, C]
    Image image{static_cast<int>(view.shape(1)), static_cast<int>(view.shape(2)),
                static_cast<int>(view.shape(3)), {}};
    image.pixels.assign(images.data(), images.data() + image.height * image.width * image.channels);
    return image;
}

void write_ppm(const Image& image, const std::string& path) {
    std::ofstream out(path, std::ios::binary);
    out << "P6\n" << image.width << " " << image.height << "\n255\n";
    out.write(reinterpret_cast<const char*>(image.pixels.data()), image.pixels.size());
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: " << argv[0] << " BUNDLE OUT.ppm [STEPS] [SEED]\n";
        return 2;
    }
    const int steps = argc > 3 ? std::atoi(argv[3]) : 50;
    const int seed = argc > 4 ? std::atoi(argv[4]) : 0;
    py::scoped_interpreter python;
    try {
        if (const char* site = std::getenv("SSD_SITE_PACKAGES")) {
            py::module_::import("site").attr("addsitedir")(site);
        }
        Image image = sample_image(argv[1], steps, seed);
        write_ppm(image, argv[2]);
        std::cout << "wrote " << image.width << "x" << image.height << " image to " << argv[2] << "\n";
    } catch (const py::error_already_set& err) {
        std::cerr << "error: " << err.what() << "\n";
        return 1;
    }
    return 0;
}
