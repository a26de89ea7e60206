// mixpeft/core/parallel.hpp — row-parallel loops.
//
// parallel_rows(n, work_per_row, f) calls f(i) for each row i in [0, n);
// parallel_ranges(n, work_per_row, f) calls f(begin, end) on contiguous row blocks (one per thread),
// so the body can hand a whole block to Eigen's vectorised array expressions.
// Both run on OpenMP threads only when n * work_per_row >= parallel_grain; small work stays serial.
// GEMMs are threaded by Eigen itself (it uses OpenMP when compiled with it).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mixpeft {

inline constexpr std::size_t parallel_grain = 1 << 15;

inline int parallel_threads(std::size_t n, std::size_t work_per_row) {
#if defined(_OPENMP)
  if (n > 1 && n * work_per_row >= parallel_grain)
    return int(std::min<std::size_t>(n, std::size_t(omp_get_max_threads())));
#endif
  (void)n;
  (void)work_per_row;
  return 1;
}

template <class F>
void parallel_rows(std::size_t n, std::size_t work_per_row, F&& f) {
  const int threads = parallel_threads(n, work_per_row);
  const auto count = static_cast<std::int64_t>(n);
  if (threads > 1) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
    for (std::int64_t i = 0; i < count; ++i) f(static_cast<std::size_t>(i));
#endif
    return;
  }
  for (std::int64_t i = 0; i < count; ++i) f(static_cast<std::size_t>(i));
}

template <class F>
void parallel_ranges(std::size_t n, std::size_t work_per_row, F&& f) {
  const int threads = parallel_threads(n, work_per_row);
  if (threads > 1) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
    {
      const std::size_t t = std::size_t(omp_get_thread_num()), nt = std::size_t(omp_get_num_threads());
      const std::size_t begin = n * t / nt, end = n * (t + 1) / nt;
      if (begin < end) f(begin, end);
    }
#endif
    return;
  }
  if (n > 0) f(std::size_t(0), n);
}

}  // namespace mixpeft
