/* Stand-ins for the nine C entry points that TensorRT's Python bindings (tensorrt_bindings/
 * tensorrt.so, 10.x and 11.x) import from libnvinfer, libnvinfer_plugin and libnvonnxparser.
 * Compiled at test time into three libraries with the real sonames, they let the bindings
 * import on a machine without TensorRT or a GPU, so that the Python API surface (classes,
 * methods, properties, enum members, pybind11 signatures) can be read. Nothing can be
 * created: every factory returns NULL. See tests/test_tensorrt_api.py. */
#include <stddef.h>

void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
int initLibNvInferPlugins(void *logger, const char *name_space) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
