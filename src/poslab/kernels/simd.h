// The instruction-set preamble shared by cope_rows.cpp and dape_mlp.cpp: one machine register's
// width for the level the library is built for (poslab/kernels/native.py passes -march=x86-64-v3,
// x86-64-v4, ...), and GCC/Clang vector-extension types over it.
//
// Included inside each file's anonymous namespace (each file is its own library); native.py adds
// this directory to the include path and hashes this header into every library's cache key.

#pragma once

// (Needs <cstdint>, included by each file before its namespace.)

#if defined(__AVX512F__)
constexpr int VECTOR_BYTES = 64;
constexpr const char* ISA = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VECTOR_BYTES = 32;
constexpr const char* ISA = "avx2";
#elif defined(__AVX__)
constexpr int VECTOR_BYTES = 32;
constexpr const char* ISA = "avx";
#else
constexpr int VECTOR_BYTES = 16;
constexpr const char* ISA = "sse/neon";
#endif

// Arithmetic on Vec<T> is elementwise over one machine register; Bits<T> is the integer vector of the
// same lanes (for building powers of two in an exp, or gather indices).
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(VECTOR_BYTES)));
  typedef int32_t bits __attribute__((vector_size(VECTOR_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(VECTOR_BYTES)));
  typedef int64_t bits __attribute__((vector_size(VECTOR_BYTES)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
using Bits = typename VecOf<T>::bits;
template <typename T>
constexpr int LANES = VECTOR_BYTES / sizeof(T);

// x in every lane: x - 0 is x for every float, so this compiles to one broadcast (Vec<T>{} + x
// would add zero first, which turns -0.0 into +0.0).
template <typename T>
inline Vec<T> splat(T x) {
  return x - Vec<T>{};
}
