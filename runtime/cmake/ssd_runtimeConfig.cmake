# find_package(ssd_runtime CONFIG REQUIRED) -> the target ssd_runtime::embed: the header
# <ssd/runtime.hpp>, pybind11's embedding (the 'cpp' extra) and the Python it links, with the
# environment that Python runs in recorded for the embedded interpreter (no environment
# variables needed at run time).
#
# Which Python: SSD_RUNTIME_PYTHON if set (`python -m ssd_runtime --cmake-args` gives it),
# else Python_EXECUTABLE / Python3_EXECUTABLE, else python3 on PATH. It must be the Python
# this package belongs to: the configure stops with one line otherwise.
cmake_minimum_required(VERSION 3.18)

if(NOT SSD_RUNTIME_PYTHON)
  foreach(_ssd_candidate IN ITEMS "${Python_EXECUTABLE}" "${Python3_EXECUTABLE}")
    if(_ssd_candidate AND NOT SSD_RUNTIME_PYTHON)
      set(SSD_RUNTIME_PYTHON "${_ssd_candidate}")
    endif()
  endforeach()
  if(NOT SSD_RUNTIME_PYTHON)
    find_program(SSD_RUNTIME_PYTHON NAMES python3 python)
  endif()
endif()
set(SSD_RUNTIME_PYTHON "${SSD_RUNTIME_PYTHON}" CACHE FILEPATH "The Python whose environment has ssd_runtime")

execute_process(
  COMMAND "${SSD_RUNTIME_PYTHON}" -c
    "import sysconfig, pybind11, ssd_runtime.__main__ as m; print(m.HERE / 'cmake'); print(pybind11.get_cmake_dir()); print(sysconfig.get_paths()['purelib'])"
  OUTPUT_VARIABLE _ssd_found ERROR_VARIABLE _ssd_error RESULT_VARIABLE _ssd_result OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _ssd_result EQUAL 0)
  string(REGEX REPLACE "\n$" "" _ssd_error "${_ssd_error}")
  string(REGEX REPLACE ".*\n" "" _ssd_error "${_ssd_error}")
  message(FATAL_ERROR "ssd_runtime: ${SSD_RUNTIME_PYTHON} cannot import ssd_runtime and pybind11 (${_ssd_error}); "
                      "pip install 'ssd-diffusion[cpp]' there, or configure with $(PYTHON -m ssd_runtime --cmake-args)")
endif()
string(REPLACE "\n" ";" _ssd_found "${_ssd_found}")
list(GET _ssd_found 0 _ssd_cmakedir)
list(GET _ssd_found 1 _ssd_pybind11_dir)
list(GET _ssd_found 2 _ssd_site_packages)
get_filename_component(_ssd_here "${CMAKE_CURRENT_LIST_DIR}" REALPATH)
get_filename_component(_ssd_cmakedir "${_ssd_cmakedir}" REALPATH)
if(NOT _ssd_here STREQUAL _ssd_cmakedir)
  message(FATAL_ERROR "ssd_runtime: ${SSD_RUNTIME_PYTHON} has another ssd_runtime (${_ssd_cmakedir}) than this "
                      "package (${_ssd_here}); configure with $(PYTHON -m ssd_runtime --cmake-args) for the PYTHON you mean")
endif()

set(Python_EXECUTABLE "${SSD_RUNTIME_PYTHON}")
set(PYTHON_EXECUTABLE "${SSD_RUNTIME_PYTHON}")
set(pybind11_DIR "${_ssd_pybind11_dir}")
find_package(pybind11 CONFIG REQUIRED)

if(NOT TARGET ssd_runtime::embed)
  add_library(ssd_runtime::embed INTERFACE IMPORTED)
  target_include_directories(ssd_runtime::embed INTERFACE "${CMAKE_CURRENT_LIST_DIR}/../include")
  target_link_libraries(ssd_runtime::embed INTERFACE pybind11::embed)
  target_compile_definitions(ssd_runtime::embed INTERFACE "SSD_RUNTIME_SITE_PACKAGES=\"${_ssd_site_packages}\""
                                                        "SSD_RUNTIME_PYTHON=\"${SSD_RUNTIME_PYTHON}\"")
  target_compile_features(ssd_runtime::embed INTERFACE cxx_std_17)
endif()
set(ssd_runtime_FOUND TRUE)
