// Embedding the SSD runtime in a C++ program through <ssd/runtime.hpp>: sample one image of
// a bundle (or the packaged model, with BUNDLE "-"), print each preview as it arrives, write
// the first image as PPM.   Run:  ssd_embed BUNDLE OUT.ppm [STEPS] [SEED] [N]
#include <ssd/runtime.hpp>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

void write_ppm(const ssd::Image& image, const std::string& path) {
    std::ofstream out(path, std::ios::binary);
    out << "P6\n" << image.width << " " << image.height << "\n255\n";
    out.write(reinterpret_cast<const char*>(image.pixels.data()), static_cast<std::streamsize>(image.pixels.size()));
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: " << argv[0] << " BUNDLE OUT.ppm [STEPS] [SEED] [N]\n";
        return 2;
    }
    ssd::Request request;
    request.steps = argc > 3 ? std::atoi(argv[3]) : 50;
    request.seed = argc > 4 ? std::atoi(argv[4]) : 0;
    request.n = argc > 5 ? std::atoi(argv[5]) : 1;
    try {
        ssd::Sampler sampler(std::string(argv[1]) == "-" ? "" : argv[1]);
        std::cout << "backend " << sampler.backend() << " " << sampler.precision() << "\n";
        auto start = std::chrono::steady_clock::now();
        auto images = sampler.sample(request, [](int size, const std::vector<ssd::Image>& previews) {
            std::cout << "preview " << size << "x" << size << " (" << previews.size() << " images)\n";
        });
        std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
        std::cout << "sampled " << images.size() << " images in " << seconds.count() << " s\n";
        write_ppm(images[0], argv[2]);
        sampler.close();
        std::cout << "wrote " << images[0].width << "x" << images[0].height << " image to " << argv[2]
                  << "; open backends after close: " << ssd::open_backends() << "\n";
    } catch (const ssd::Error& err) {
        std::cerr << "error: " << err.what() << "\n";
        return 1;
    }
    return 0;
}
