// gqa/version.hpp — gqa's version: the one place it is written. CMakeLists.txt reads these three lines for its
// project(VERSION), so the CMake package version (gqaConfigVersion.cmake) and the macros cannot disagree.
#pragma once

#define GQA_VERSION_MAJOR 0
#define GQA_VERSION_MINOR 1
#define GQA_VERSION_PATCH 0

/// One comparable number: 10000 * major + 100 * minor + patch (0.1.0 -> 100).
#define GQA_VERSION (GQA_VERSION_MAJOR * 10000 + GQA_VERSION_MINOR * 100 + GQA_VERSION_PATCH)
