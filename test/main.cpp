// main.cpp — doctest's runner for the CPU suite (make test); every test/test_*.cpp links into it.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
