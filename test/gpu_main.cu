// gpu_main.cu — doctest's runner for the GPU suite (make test_gpu): every test/test_gpu_*.cu links into it.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
