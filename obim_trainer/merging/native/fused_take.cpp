// Fused passes of iterative merging (see obim_trainer/merging/fused_take.py).
//
// Plain C ABI, no Python or torch headers: it is built when the package is installed and loaded with
// ctypes. A tensor is seen as rows x cols (cols = its last dimension); each function splits the
// rows into contiguous chunks, one per thread, and every result is independent of the number of
// threads. Scores are either given (float32) or computed on the fly as OBM saliency,
// (theta - base)^2 * scale, with the rounding of torch's copy_/sub_/square_/mul_ sequence: build
// without -ffast-math and with -ffp-contract=off. Comparisons are IEEE float comparisons, so -0.0
// ties with +0.0 as in the torch path. Loops are branch-free (random masks would mispredict every
// other branch) and use restrict pointers so that the compiler vectorizes them.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#ifndef OBIM_LEVEL
#define OBIM_LEVEL 1  // the instruction-set level this copy is compiled for (see native/build.py)
#endif

namespace {

constexpr int64_t kChunk = 1 << 17;  // positions per unit of work

// Where scores come from.
enum Source { kGiven = 0, kObmBf16 = 1, kObmF32 = 2, kRandom = 3 };

struct Scores {
  const float* given;   // kGiven: one score per position
  const void* theta;    // kObm*: the checkpoint, bfloat16 or float32
  const void* base;     // kObm*: the base, in the checkpoint's dtype
  const float* scale;   // kObm*: one value per column, or per row when per_row
  uint64_t seed;         // kRandom: the tensor's and checkpoint's seed
  int source;
  int per_row;
};

// Rows per unit of work: about kChunk positions.
inline int64_t unit_rows(int64_t cols) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1)); }

inline int64_t unit_count(int64_t rows, int64_t cols) { return (rows + unit_rows(cols) - 1) / unit_rows(cols); }

// Calls body(unit, first_row, last_row) for every unit, on up to `threads` threads that claim units
// as they go: a thread the OS delays (the engine's reading thread shares the cores) takes fewer
// units instead of holding the others up.
template <class Body>
void parallel_rows(int64_t rows, int64_t cols, int threads, Body body) {
  const int64_t step = unit_rows(cols), units = unit_count(rows, cols);
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t u = next++; u < units; u = next++) body(u, u * step, std::min(rows, (u + 1) * step));
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < std::min<int64_t>(threads, units); ++t) pool.emplace_back(work);
  work();
  for (auto& worker : pool) worker.join();
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

constexpr int64_t kTile = 4096;  // positions scored at a time, into a buffer that stays in L1

// OBM scores of row r, columns [c, c + width), into out.
template <int kSource, bool kPerRow>
inline void tile_scores(const Scores& s, int64_t r, int64_t c, int64_t cols, int64_t width, float* __restrict out) {
  const int64_t offset = r * cols + c;
  const float* __restrict scale = kPerRow ? s.scale + r : s.scale + c;
  if constexpr (kSource == kObmBf16) {
    const uint16_t* __restrict theta = static_cast<const uint16_t*>(s.theta) + offset;
    const uint16_t* __restrict base = static_cast<const uint16_t*>(s.base) + offset;
    for (int64_t j = 0; j < width; ++j) {
      const float d = bf16_to_float(theta[j]) - bf16_to_float(base[j]);
      out[j] = (d * d) * scale[kPerRow ? 0 : j];
    }
  } else {
    const float* __restrict theta = static_cast<const float*>(s.theta) + offset;
    const float* __restrict base = static_cast<const float*>(s.base) + offset;
    for (int64_t j = 0; j < width; ++j) {
      const float d = theta[j] - base[j];
      out[j] = (d * d) * scale[kPerRow ? 0 : j];
    }
  }
}

// 32-bit integer mixer (the "lowbias"-style finalizer with a multiplier below 2^27, so that the
// torch version can multiply in int64 without overflow).
inline uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x45d9f3bu;
  v ^= v >> 16;
  v *= 0x45d9f3bu;
  v ^= v >> 16;
  return v;
}

// Uniform [0, 1) score of flat position i: 24 bits of a hash of (seed, i), the same on every device
// (obim_trainer/merging/random_scores.py computes it with torch).
inline float random_score(uint64_t seed, int64_t i) {
  const uint32_t lo = static_cast<uint32_t>(seed & 0x7fffffffu), hi = static_cast<uint32_t>((seed >> 31) & 0x7fffffffu);
  const uint64_t u = static_cast<uint64_t>(i);
  const uint32_t h = mix32(static_cast<uint32_t>(u & 0xffffffffu) ^ lo ^ mix32(static_cast<uint32_t>(u >> 32) ^ hi));
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// Calls tile(offset, scores, width) for consecutive tiles of rows [first, last), offset = flat index.
template <int kSource, bool kPerRow, class Tile>
void for_tiles(const Scores& s, int64_t first, int64_t last, int64_t cols, Tile tile) {
  if constexpr (kSource == kGiven) {
    const int64_t end = last * cols;
    for (int64_t offset = first * cols; offset < end; offset += kTile) {
      tile(offset, s.given + offset, std::min(kTile, end - offset));
    }
  } else if constexpr (kSource == kRandom) {
    alignas(64) float buffer[kTile];
    const int64_t end = last * cols;
    for (int64_t offset = first * cols; offset < end; offset += kTile) {
      const int64_t width = std::min(kTile, end - offset);
      for (int64_t j = 0; j < width; ++j) buffer[j] = random_score(s.seed, offset + j);
      tile(offset, buffer, width);
    }
  } else {
    std::vector<float> buffer(std::min(cols, kTile));
    for (int64_t r = first; r < last; ++r) {
      for (int64_t c = 0; c < cols; c += kTile) {
        const int64_t width = std::min(kTile, cols - c);
        tile_scores<kSource, kPerRow>(s, r, c, cols, width, buffer.data());
        tile(r * cols + c, buffer.data(), width);
      }
    }
  }
}

struct CollectResult {
  int64_t above = 0;
  bool invalid = false;
  std::vector<int64_t> index;
  std::vector<float> value;
};

template <int kSource, bool kPerRow, bool kFree>
void collect_rows(const Scores& s, const uint8_t* free, int64_t first, int64_t last, int64_t cols, float hi, float lo,
                  CollectResult& out) {
  alignas(64) uint8_t inside[kTile + 8];
  for_tiles<kSource, kPerRow>(s, first, last, cols, [&](int64_t offset, const float* __restrict scores, int64_t width) {
    const uint8_t* __restrict f = free + (kFree ? offset : 0);
    int32_t above = 0;
    uint8_t bad = 0;
    for (int64_t c = 0; c < width; ++c) {  // vectorized: counts and flags
      const float v = scores[c];
      const uint8_t available = kFree ? f[c] : uint8_t(1);
      const uint8_t over = v > hi;
      above += available & over;
      bad |= !(v >= 0.0f);
      inside[c] = available & static_cast<uint8_t>(v >= lo) & (over ^ uint8_t(1));
    }
    std::memset(inside + width, 0, 8);
    for (int64_t c = 0; c < width; c += 8) {  // gather the flagged few percent, eight flags at a time
      uint64_t word;
      std::memcpy(&word, inside + c, sizeof word);
      while (word != 0) {
        const int64_t j = c + __builtin_ctzll(word) / 8;
        word &= word - 1;
        out.index.push_back(offset + j);
        out.value.push_back(scores[j]);
      }
    }
    out.above += above;
    out.invalid |= bad != 0;
  });
}

// result = theta where free and (score > threshold, or >= it when kTies), over [first, last) of a tile
// (result == nullptr: theta is the result already, only the free mask changes).
template <class Word, bool kScored, bool kFree, bool kTies>
inline void take_span(const float* __restrict scores, const uint8_t* __restrict f, uint8_t* __restrict g,
                      Word* __restrict r, const Word* __restrict t, int64_t first, int64_t last, float threshold) {
  if (r == nullptr) {
    for (int64_t c = first; c < last; ++c) {
      const uint8_t available = kFree ? f[c] : uint8_t(1);
      uint8_t take = available;
      if constexpr (kScored) take &= static_cast<uint8_t>(kTies ? scores[c] >= threshold : scores[c] > threshold);
      g[c] = available & (take ^ uint8_t(1));
    }
    return;
  }
  for (int64_t c = first; c < last; ++c) {
    const Word available = kFree ? static_cast<Word>(f[c]) : Word(1);
    Word take = available;
    if constexpr (kScored) take &= static_cast<Word>(kTies ? scores[c] >= threshold : scores[c] > threshold);
    const Word bits = static_cast<Word>(Word(0) - take);
    r[c] = static_cast<Word>((t[c] & bits) | (r[c] & static_cast<Word>(~bits)));
    g[c] = static_cast<uint8_t>(available & (take ^ Word(1)));
  }
}

template <class Word, int kSource, bool kPerRow, bool kScored, bool kFree>
void take_rows(const Scores& s, const uint8_t* free_in, uint8_t* free_out, int64_t first, int64_t last, int64_t cols,
               float threshold, int64_t tie_cut, Word* result, const Word* theta) {
  auto body = [&](int64_t offset, const float* __restrict scores, int64_t width) {
    const uint8_t* f = free_in + (kFree ? offset : 0);
    // ties at the threshold are taken below flat index tie_cut only
    const int64_t ties_end = std::clamp<int64_t>(tie_cut - offset, 0, width);
    Word* r = result == nullptr ? nullptr : result + offset;
    take_span<Word, kScored, kFree, true>(scores, f, free_out + offset, r, theta + offset, 0, ties_end, threshold);
    take_span<Word, kScored, kFree, false>(scores, f, free_out + offset, r, theta + offset, ties_end, width,
                                            threshold);
  };
  if constexpr (kScored) {
    for_tiles<kSource, kPerRow>(s, first, last, cols, body);
  } else {
    body(first * cols, nullptr, (last - first) * cols);
  }
}

// Instantiates fn<kSource, kPerRow> for the run-time source.
template <class Fn>
auto by_source(const Scores& s, Fn fn) {
  if (s.source == kObmBf16) {
    return s.per_row ? fn.template operator()<kObmBf16, true>() : fn.template operator()<kObmBf16, false>();
  }
  if (s.source == kObmF32) {
    return s.per_row ? fn.template operator()<kObmF32, true>() : fn.template operator()<kObmF32, false>();
  }
  if (s.source == kRandom) return fn.template operator()<kRandom, false>();
  return fn.template operator()<kGiven, false>();
}

template <class Word>
void take_all(const Scores& s, bool scored, const uint8_t* free_in, uint8_t* free_out, int64_t rows, int64_t cols,
              float threshold, int64_t tie_cut, void* result, const void* theta, int threads) {
  auto* r = static_cast<Word*>(result);
  const auto* t = static_cast<const Word*>(theta);
  parallel_rows(rows, cols, threads, [&](int64_t, int64_t first, int64_t last) {
    by_source(s, [&]<int kSource, bool kPerRow>() {
      if (scored && free_in != nullptr) {
        take_rows<Word, kSource, kPerRow, true, true>(s, free_in, free_out, first, last, cols, threshold, tie_cut, r, t);
      } else if (scored) {
        take_rows<Word, kSource, kPerRow, true, false>(s, free_in, free_out, first, last, cols, threshold, tie_cut, r, t);
      } else if (free_in != nullptr) {
        take_rows<Word, kGiven, false, false, true>(s, free_in, free_out, first, last, cols, threshold, tie_cut, r, t);
      } else {
        take_rows<Word, kGiven, false, false, false>(s, free_in, free_out, first, last, cols, threshold, tie_cut, r, t);
      }
    });
  });
}

}  // namespace

extern "C" {

// The level this library was compiled for: 1 (the architecture's baseline) or 3 (x86-64-v3).
int obim_build_level() { return OBIM_LEVEL; }

// The highest level the running CPU (and its operating system) can execute, asked with cpuid through
// the compiler's runtime, so that it holds inside containers whatever /proc/cpuinfo says. Only called
// on the baseline library, which every CPU of the architecture runs.
int obim_cpu_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("avx");
  return v3 ? 3 : 1;
#else
  return 1;
#endif
}

// Among free positions (free == nullptr: all), counts scores > hi into *above and gathers, in
// ascending index order, the index and score of each one with lo <= score <= hi into cand_index /
// cand_value (room for cap entries). *count receives the number found.
// Scores are `given`, with source 1/2 the OBM saliency of theta against the base (both bfloat16 or
// both float32) and the float32 scale, or with source 3 uniform hashes of (seed, position). Returns 0; 1 when more than cap were found (nothing is
// gathered; the caller falls back); 2 when a score is NaN or negative.
int obim_collect(const float* given, const void* theta, const void* base, const float* scale, int source, int per_row,
                 uint64_t seed, const uint8_t* free, int64_t rows, int64_t cols, float hi, float lo, int64_t cap, int64_t* above,
                 int64_t* count, int64_t* cand_index, float* cand_value, int threads) {
  const Scores s{given, theta, base, scale, seed, source, per_row};
  std::vector<CollectResult> units(unit_count(rows, cols));
  parallel_rows(rows, cols, threads, [&](int64_t u, int64_t first, int64_t last) {
    by_source(s, [&]<int kSource, bool kPerRow>() {
      if (free != nullptr) {
        collect_rows<kSource, kPerRow, true>(s, free, first, last, cols, hi, lo, units[u]);
      } else {
        collect_rows<kSource, kPerRow, false>(s, free, first, last, cols, hi, lo, units[u]);
      }
    });
  });
  int64_t total_above = 0, total = 0;
  bool invalid = false;
  for (const auto& unit : units) {
    total_above += unit.above;
    total += static_cast<int64_t>(unit.index.size());
    invalid |= unit.invalid;
  }
  *above = total_above;
  *count = total;
  if (invalid) return 2;
  if (total > cap) return 1;
  int64_t at = 0;
  for (const auto& unit : units) {  // in unit order, which is index order
    std::memcpy(cand_index + at, unit.index.data(), unit.index.size() * sizeof(int64_t));
    std::memcpy(cand_value + at, unit.value.data(), unit.value.size() * sizeof(float));
    at += static_cast<int64_t>(unit.index.size());
  }
  return 0;
}

// Takes the free positions whose score is > threshold, or == threshold at a flat index below
// tie_cut (scores as in obim_collect; scored == 0: every free position): result = theta there, bit
// for bit (result == nullptr: no copy), and free_out marks the positions still free afterwards (it
// may alias free_in; free_in == nullptr: all were free). elem_size is the byte width of result and
// theta (1, 2, 4 or 8). Returns 0, or 1 for another width.
int obim_take(const float* given, const void* base, const float* scale, int source, int per_row, uint64_t seed,
              int scored,
              const uint8_t* free_in, uint8_t* free_out, int64_t rows, int64_t cols, float threshold, int64_t tie_cut,
              void* result, const void* theta, int elem_size, int threads) {
  const Scores s{given, theta, base, scale, seed, source, per_row};
  const bool has_scores = scored != 0;
  switch (elem_size) {
    case 1:
      take_all<uint8_t>(s, has_scores, free_in, free_out, rows, cols, threshold, tie_cut, result, theta, threads);
      return 0;
    case 2:
      take_all<uint16_t>(s, has_scores, free_in, free_out, rows, cols, threshold, tie_cut, result, theta, threads);
      return 0;
    case 4:
      take_all<uint32_t>(s, has_scores, free_in, free_out, rows, cols, threshold, tie_cut, result, theta, threads);
      return 0;
    case 8:
      take_all<uint64_t>(s, has_scores, free_in, free_out, rows, cols, threshold, tie_cut, result, theta, threads);
      return 0;
    default:
      return 1;
  }
}

// The k-th largest (1-based) of values[0, n), which are reordered (std::nth_element: linear time,
// a few times faster than torch.kthvalue on the CPU).
float obim_kth_largest(float* values, int64_t n, int64_t k) {
  std::nth_element(values, values + (k - 1), values + n, [](float a, float b) { return a > b; });
  return values[k - 1];
}

}  // extern "C"
