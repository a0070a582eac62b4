# Read by CMake at llama-cpp-python's project() call (scripts/setup passes it in CMAKE_ARGS as
# CMAKE_PROJECT_llama_cpp_INCLUDE). llama-cpp-python turns on llama.cpp's `common` library with a FORCEd cache
# entry, then neither ships nor links it (llama_cpp/lib holds llama, ggml and mtmd; mtmd must not link it). A plain
# variable of the same name outranks that cache entry (policy CMP0126), so `common` is not compiled: 51 of the
# build's 193 steps, about 100 of its 250 s on 2 cores. The libraries that ship are built as before.
set(LLAMA_BUILD_COMMON OFF)
