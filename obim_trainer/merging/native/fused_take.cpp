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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// The score of flat position i alone (the sample that brackets a threshold), as the tiles compute it.
inline float score_at(const Scores& s, int64_t i, int64_t cols) {
  if (s.source == kGiven) return s.given[i];
  if (s.source == kRandom) return random_score(s.seed, i);
  const float scale = s.scale[s.per_row ? i / cols : i % cols];
  float d;
  if (s.source == kObmBf16) {
    d = bf16_to_float(static_cast<const uint16_t*>(s.theta)[i]) - bf16_to_float(static_cast<const uint16_t*>(s.base)[i]);
  } else {
    d = static_cast<const float*>(s.theta)[i] - static_cast<const float*>(s.base)[i];
  }
  return (d * d) * scale;
}

// One variant's selection in a step: its free mask, how many it takes, and what it found.
struct Pick {
  const uint8_t* free;  // nullptr: every position is free
  int64_t count;        // 0 < count < num_free
  int64_t num_free;
  float hi = 0.0f, lo = 0.0f;
};

// The k-th largest (1-based) of values, which are reordered (linear time).
inline float kth_largest(std::vector<float>& values, int64_t k) {
  std::nth_element(values.begin(), values.begin() + (k - 1), values.end(), [](float a, float b) { return a > b; });
  return values[k - 1];
}

constexpr double kSigmas = 5.0;  // half-width of the bracket in standard deviations of the sampled rank

// (hi, lo) that very probably hold the count-th largest free score between them: +-5 standard deviations
// of its rank in the sample around the expected rank (as topk.bracket_from_sample).
void bracket(std::vector<float>& sample, Pick& pick) {
  const auto size = static_cast<int64_t>(sample.size());
  const double expected = static_cast<double>(pick.count) * static_cast<double>(size) / static_cast<double>(pick.num_free);
  const double spread = expected * std::max(1.0 - expected / static_cast<double>(std::max<int64_t>(size, 1)), 0.0);
  const double margin = kSigmas * std::sqrt(spread) + 8.0;
  const auto top = static_cast<int64_t>(std::floor(expected - margin));  // 0-based ranks from the top
  const auto bottom = static_cast<int64_t>(std::ceil(expected + margin));
  const float inf = std::numeric_limits<float>::infinity();
  pick.hi = (0 <= top && top < size) ? kth_largest(sample, top + 1) : inf;
  pick.lo = (0 <= bottom && bottom < size) ? kth_largest(sample, bottom + 1) : -inf;
}

// What one unit of rows found for one variant: the free scores above hi, and those inside the bracket.
struct Found {
  int64_t above = 0;
  std::vector<int64_t> index;
  std::vector<float> value;
};

// Counts the free scores of a tile above hi and gathers, in index order, those in [lo, hi].
template <bool kFree>
void collect_tile(const float* __restrict scores, const uint8_t* __restrict f, int64_t offset, int64_t width, float hi,
                  float lo, uint8_t* __restrict inside, Found& out) {
  int32_t above = 0;
  for (int64_t c = 0; c < width; ++c) {  // vectorized: counts and flags
    const float v = scores[c];
    const uint8_t available = kFree ? f[c] : uint8_t(1);
    const uint8_t over = v > hi;
    above += available & over;
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
}

// Status of a variant's selection.
enum Status { kFound = 0, kMissed = 1, kInvalid = 2 };

// The exact threshold and tie cut of one variant from what the units found (in unit order, which is index
// order): the need-th largest candidate, ties at it taken in index order. kMissed when the bracket missed.
Status finish_pick(const Pick& pick, const std::vector<Found>& found, int variants, int v, int64_t cap, float* threshold,
                   int64_t* tie_cut) {
  int64_t above = 0, size = 0;
  for (size_t u = v; u < found.size(); u += variants) {
    above += found[u].above;
    size += static_cast<int64_t>(found[u].value.size());
  }
  const int64_t need = pick.count - above;
  if (size > cap || need < 0 || size < need) return kMissed;
  if (need == 0) {
    *threshold = pick.hi;
    *tie_cut = 0;
    return kFound;
  }
  std::vector<float> ranked;
  ranked.reserve(size);
  for (size_t u = v; u < found.size(); u += variants) ranked.insert(ranked.end(), found[u].value.begin(), found[u].value.end());
  const float t = kth_largest(ranked, need);
  int64_t greater = 0;
  for (size_t u = v; u < found.size(); u += variants) {
    for (const float x : found[u].value) greater += x > t;
  }
  int64_t ties = need - greater;  // the ties at t to take, lowest indices first
  for (size_t u = v; u < found.size(); u += variants) {
    const Found& unit = found[u];
    for (size_t j = 0; j < unit.value.size(); ++j) {
      if (unit.value[j] == t && --ties == 0) {
        *threshold = t;
        *tie_cut = unit.index[j] + 1;
        return kFound;
      }
    }
  }
  return kMissed;  // not reached: ties >= 1 of them are among the candidates
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

// Where one variant takes: its masks, its threshold and tie cut, and its result.
struct Take {
  const uint8_t* free_in;  // nullptr: all free
  uint8_t* free_out;       // may alias free_in
  float threshold;
  int64_t tie_cut;
  void* result;            // nullptr: theta is the result already
};

template <class Word, bool kScored, bool kFree>
inline void take_tile(const float* scores, const Take& take, int64_t offset, int64_t width, const Word* theta) {
  const uint8_t* f = take.free_in + (kFree ? offset : 0);
  Word* r = take.result == nullptr ? nullptr : static_cast<Word*>(take.result) + offset;
  const int64_t ties_end = kScored ? std::clamp<int64_t>(take.tie_cut - offset, 0, width) : 0;  // ties below tie_cut only
  take_span<Word, kScored, kFree, true>(scores, f, take.free_out + offset, r, theta + offset, 0, ties_end,
                                        take.threshold);
  take_span<Word, kScored, kFree, false>(scores, f, take.free_out + offset, r, theta + offset, ties_end, width,
                                         take.threshold);
}

template <class Word, bool kScored>
inline void take_variants(const float* scores, const std::vector<Take>& takes, int64_t offset, int64_t width,
                          const Word* theta) {
  for (const Take& take : takes) {
    if (take.free_in != nullptr) {
      take_tile<Word, kScored, true>(scores, take, offset, width, theta);
    } else {
      take_tile<Word, kScored, false>(scores, take, offset, width, theta);
    }
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
void take_all(const Scores& s, bool scored, const std::vector<Take>& takes, int64_t rows, int64_t cols, int threads) {
  const auto* theta = static_cast<const Word*>(s.theta);
  parallel_rows(rows, cols, threads, [&](int64_t, int64_t first, int64_t last) {
    if (!scored) {
      take_variants<Word, false>(nullptr, takes, first * cols, (last - first) * cols, theta);
      return;
    }
    by_source(s, [&]<int kSource, bool kPerRow>() {
      for_tiles<kSource, kPerRow>(s, first, last, cols, [&](int64_t offset, const float* scores, int64_t width) {
        take_variants<Word, true>(scores, takes, offset, width, theta);
      });
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

// The thresholds of one step of iterative merging for several variants at once (a sweep's merges of the
// same tensor, each with its own free mask and count): variant v takes its free positions whose score is
// > threshold[v], or == threshold[v] at a flat index below tie_cut[v] (exactly count[v] of them).
// Scores as in obim_take_many, computed once for all variants: a sample of every stride-th position
// brackets each variant's threshold, one pass counts the free scores above each bracket and gathers those
// inside it, and the gathered ones are ranked. status[v]: 0 found, 1 the bracket missed or held more than
// cap scores (the caller selects otherwise). Returns 0, or 2 when a score is NaN or negative.
int obim_select(const float* given, const void* theta, const void* base, const float* scale, int source, int per_row,
                uint64_t seed, int64_t rows, int64_t cols, int64_t stride, int variants, const uint8_t* const* free,
                const int64_t* count, const int64_t* num_free, int64_t cap, float* threshold, int64_t* tie_cut,
                int* status, int threads) {
  const Scores s{given, theta, base, scale, seed, source, per_row};
  const int64_t numel = rows * cols;
  std::vector<float> sampled;
  for (int64_t i = 0; i < numel; i += stride) sampled.push_back(score_at(s, i, cols));
  std::vector<Pick> picks(variants);
  for (int v = 0; v < variants; ++v) {
    picks[v] = Pick{free[v], count[v], num_free[v]};
    std::vector<float> sample;
    sample.reserve(sampled.size());
    for (size_t j = 0; j < sampled.size(); ++j) {
      if (free[v] == nullptr || free[v][static_cast<int64_t>(j) * stride]) sample.push_back(sampled[j]);
    }
    bracket(sample, picks[v]);
  }
  std::vector<Found> found(unit_count(rows, cols) * variants);
  std::atomic<bool> invalid{false};
  parallel_rows(rows, cols, threads, [&](int64_t u, int64_t first, int64_t last) {
    alignas(64) uint8_t inside[kTile + 8];
    by_source(s, [&]<int kSource, bool kPerRow>() {
      for_tiles<kSource, kPerRow>(s, first, last, cols, [&](int64_t offset, const float* __restrict scores, int64_t width) {
        uint8_t bad = 0;
        for (int64_t c = 0; c < width; ++c) bad |= !(scores[c] >= 0.0f);
        if (bad != 0) invalid = true;
        for (int v = 0; v < variants; ++v) {
          const Pick& pick = picks[v];
          Found& out = found[u * variants + v];
          if (pick.free != nullptr) {
            collect_tile<true>(scores, pick.free + offset, offset, width, pick.hi, pick.lo, inside, out);
          } else {
            collect_tile<false>(scores, nullptr, offset, width, pick.hi, pick.lo, inside, out);
          }
        }
      });
    });
  });
  if (invalid) return 2;
  for (int v = 0; v < variants; ++v) status[v] = finish_pick(picks[v], found, variants, v, cap, threshold + v, tie_cut + v);
  return 0;
}

// For each variant v: result[v] = theta at the free positions whose score is > threshold[v], or
// == threshold[v] at a flat index below tie_cut[v] (scored == 0: at every free position), bit for bit
// (result[v] == nullptr: no copy), and free_out[v] marks the positions still free afterwards (it may
// alias free_in[v]; free_in[v] == nullptr: all were free). Scores are computed once per position for all
// variants: `given`, with source 1/2 the OBM saliency of theta against the base (both bfloat16 or both
// float32) and the float32 scale, or with source 3 uniform hashes of (seed, position). elem_size is the
// byte width of results and theta (1, 2, 4 or 8). Returns 0, or 1 for another width.
int obim_take_many(const float* given, const void* theta, const void* base, const float* scale, int source, int per_row,
                   uint64_t seed, int scored, int variants, const uint8_t* const* free_in, uint8_t* const* free_out,
                   const float* threshold, const int64_t* tie_cut, void* const* result, int64_t rows, int64_t cols,
                   int elem_size, int threads) {
  const Scores s{given, theta, base, scale, seed, source, per_row};
  std::vector<Take> takes(variants);
  for (int v = 0; v < variants; ++v) {
    takes[v] = Take{free_in[v], free_out[v], scored ? threshold[v] : 0.0f, scored ? tie_cut[v] : 0, result[v]};
  }
  const bool has_scores = scored != 0;
  switch (elem_size) {
    case 1:
      take_all<uint8_t>(s, has_scores, takes, rows, cols, threads);
      return 0;
    case 2:
      take_all<uint16_t>(s, has_scores, takes, rows, cols, threads);
      return 0;
    case 4:
      take_all<uint32_t>(s, has_scores, takes, rows, cols, threads);
      return 0;
    case 8:
      take_all<uint64_t>(s, has_scores, takes, rows, cols, threads);
      return 0;
    default:
      return 1;
  }
}

}  // extern "C"
