// Catch2 for tests that use LibTorch. Debian's LibTorch logs through glog, whose CHECK macro
// would silently replace Catch's (a failing check then aborts, a passing one is not counted), so
// LibTorch comes first and Catch's macros are defined last.
#pragma once

#include <ATen/ATen.h>

#undef CHECK
#include <catch2/catch.hpp>
