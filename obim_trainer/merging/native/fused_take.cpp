// Fused passes of iterative merging (see obim_trainer/merging/fused_take.py), and TIES' disjoint merge.
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

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

// Calls body(i) for every i in [0, n), on up to `threads` threads that claim indices as they go: a thread the
// OS delays (the engine's reading thread shares the cores) takes fewer instead of holding the others up.
template <class Body>
void parallel_for(int64_t n, int threads, Body body) {
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t i = next++; i < n; i = next++) body(i);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < std::min<int64_t>(threads, n); ++t) pool.emplace_back(work);
  work();
  for (auto& worker : pool) worker.join();
}

// Calls body(unit, first_row, last_row) for every unit of about kChunk positions (parallel_for).
template <class Body>
void parallel_rows(int64_t rows, int64_t cols, int threads, Body body) {
  const int64_t step = unit_rows(cols);
  parallel_for(unit_count(rows, cols), threads, [&](int64_t u) { body(u, u * step, std::min(rows, (u + 1) * step)); });
}

[[gnu::always_inline]] inline float bf16_to_float(uint16_t bits) {
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
[[gnu::always_inline]] inline uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x45d9f3bu;
  v ^= v >> 16;
  v *= 0x45d9f3bu;
  v ^= v >> 16;
  return v;
}

// Uniform [0, 1) score of flat position i: 24 bits of a hash of (seed, i), the same on every device
// (obim_trainer/merging/random_scores.py computes it with torch). Always inlined: the tile loops vectorize it.
[[gnu::always_inline]] inline float random_score(uint64_t seed, int64_t i) {
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

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

constexpr int kBins = 1024;  // bins of the bracket's histogram (one bin then holds ~0.003% of the positions)

// One variant's selection in a step: its free mask, how many it takes, its bracket and histogram bins.
// Non-negative floats are ordered like their bits, so bin = (bits(score) - low_bits) >> shift orders the
// scores in [lo, hi] into kBins contiguous ranges.
struct Pick {
  const uint8_t* free;  // nullptr: every position is free
  int64_t count;        // 0 < count < num_free
  int64_t num_free;
  float hi = 0.0f, lo = 0.0f;
  uint32_t low_bits = 0, high_bits = 0;
  int shift = 0;
};

// The value of 0-based rank k from the top among values[first:], which are reordered so that values[k] holds it
// and every later value ranks below it (linear time).
inline float ranked(std::vector<float>& values, int64_t first, int64_t k) {
  std::nth_element(values.begin() + first, values.begin() + k, values.end(), [](float a, float b) { return a > b; });
  return values[k];
}

constexpr int64_t kSampleBlock = 4096;  // sampled positions scored per unit of work
constexpr double kSigmas = 5.0;  // half-width of the bracket in standard deviations of the sampled rank

// (hi, lo) that very probably hold the count-th largest free score between them: +-5 standard deviations
// of its rank in the sample around the expected rank (as topk.bracket_from_sample), and its bins.
void bracket(std::vector<float>& sample, Pick& pick) {
  const auto size = static_cast<int64_t>(sample.size());
  const double expected = static_cast<double>(pick.count) * static_cast<double>(size) / static_cast<double>(pick.num_free);
  const double spread = expected * std::max(1.0 - expected / static_cast<double>(std::max<int64_t>(size, 1)), 0.0);
  const double margin = kSigmas * std::sqrt(spread) + 8.0;
  const auto top = static_cast<int64_t>(std::floor(expected - margin));  // 0-based ranks from the top
  const auto bottom = static_cast<int64_t>(std::ceil(expected + margin));
  const float inf = std::numeric_limits<float>::infinity();
  const bool has_top = 0 <= top && top < size;
  pick.hi = has_top ? ranked(sample, 0, top) : inf;
  pick.lo = (0 <= bottom && bottom < size) ? ranked(sample, has_top ? top + 1 : 0, bottom) : -inf;  // bottom > top
  pick.low_bits = float_bits(std::max(pick.lo, 0.0f) + 0.0f);  // scores are >= 0; -0.0 counts as +0.0
  pick.high_bits = std::max(float_bits(pick.hi + 0.0f), pick.low_bits);
  while (((pick.high_bits - pick.low_bits) >> pick.shift) >= static_cast<uint32_t>(kBins)) ++pick.shift;
}

// What one unit of rows counted for one variant: its free scores above hi, and those in [lo, hi] by bin.
struct Counts {
  int64_t above = 0;
  std::vector<int64_t> bins;
};

// Whether a score of the tile is NaN or negative (saliencies never are).
inline bool any_invalid(const float* __restrict scores, int64_t width) {
  uint8_t bad = 0;
  for (int64_t c = 0; c < width; ++c) bad |= !(scores[c] >= 0.0f);  // vectorized
  return bad != 0;
}

inline void bin_score(const float* scores, int64_t j, const Pick& pick, int64_t* __restrict bins) {
  ++bins[(float_bits(scores[j] + 0.0f) - pick.low_bits) >> pick.shift];
}

// count_tile's loops on any CPU: one pass flags each position (a byte), a second bins the flagged few percent,
// eight flags at a time.
template <bool kFree>
void count_span(const float* __restrict scores, const uint8_t* __restrict f, int64_t width, const Pick& pick,
                uint8_t* __restrict inside, int64_t* __restrict bins, int64_t& above_out) {
  const float hi = pick.hi, lo = pick.lo;
  int32_t above = 0;
  for (int64_t c = 0; c < width; ++c) {  // vectorized: counts and flags
    const float v = scores[c];
    const uint8_t available = kFree ? f[c] : uint8_t(1);
    const uint8_t over = v > hi;
    above += available & over;
    inside[c] = available & static_cast<uint8_t>(v >= lo) & (over ^ uint8_t(1));
  }
  std::memset(inside + width, 0, 8);
  for (int64_t c = 0; c < width; c += 8) {
    uint64_t word;
    std::memcpy(&word, inside + c, sizeof word);
    while (word != 0) {
      bin_score(scores, c + __builtin_ctzll(word) / 8, pick, bins);
      word &= word - 1;
    }
  }
  above_out += above;
}

#if defined(__AVX2__)
// For each 8-bit mask, the lanes whose bit is set, first: a permutation that packs those lanes to the front.
struct PackTable {
  alignas(32) uint32_t lanes[256][8];
};

constexpr PackTable pack_table() {
  PackTable table{};
  for (int mask = 0; mask < 256; ++mask) {
    int k = 0;
    for (int lane = 0; lane < 8; ++lane) {
      if ((mask >> lane) & 1) table.lanes[mask][k++] = static_cast<uint32_t>(lane);
    }
  }
  return table;
}

constexpr PackTable kPack = pack_table();

// count_span for the first width - width % 8 positions with AVX2, without a branch per position: eight scores
// at a time become bit masks (free, above hi, at least lo), counted with popcount; the bins of those in the
// bracket are computed for all eight and packed into `binned`, counted after the loop (a branch per binned
// score, about one in 30, would mispredict: that was most of the pass).
template <bool kFree>
int64_t count_span_avx2(const float* __restrict scores, const uint8_t* __restrict f, int64_t width,
                        const Pick& pick, uint32_t* __restrict binned, int64_t* __restrict bins, int64_t& above_out) {
  const __m256 hi = _mm256_set1_ps(pick.hi), lo = _mm256_set1_ps(pick.lo), zero = _mm256_setzero_ps();
  const __m256i low_bits = _mm256_set1_epi32(static_cast<int>(pick.low_bits));
  const __m128i shift = _mm_cvtsi32_si128(pick.shift);
  const int64_t end = width - width % 8;
  int64_t above = 0, count = 0;
  for (int64_t c = 0; c < end; c += 8) {
    uint32_t available = 0xffu;
    if constexpr (kFree) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(f + c));
      available = ~static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, _mm_setzero_si128()))) & 0xffu;
    }
    const __m256 v = _mm256_loadu_ps(scores + c);
    const auto over = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, hi, _CMP_GT_OQ)));
    const auto at_least = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ)));
    above += __builtin_popcount(available & over);
    const uint32_t in = available & at_least & ~over;
    const __m256i bits = _mm256_castps_si256(_mm256_add_ps(v, zero));  // -0.0 counts as +0.0
    const __m256i bin = _mm256_srl_epi32(_mm256_sub_epi32(bits, low_bits), shift);
    const __m256i pack = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.lanes[in]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(binned + count), _mm256_permutevar8x32_epi32(bin, pack));
    count += __builtin_popcount(in);
  }
  for (int64_t j = 0; j < count; ++j) ++bins[binned[j]];
  above_out += above;
  return end;
}
#endif

// Counts the free scores of a tile above hi and bins those in [lo, hi]; `inside` has room for kTile + 8 values.
template <bool kFree>
void count_tile(const float* __restrict scores, const uint8_t* __restrict f, int64_t width, const Pick& pick,
                uint32_t* __restrict inside, Counts& out) {
  if (out.bins.empty()) out.bins.assign(kBins, 0);
  int64_t done = 0;
#if defined(__AVX2__)
  done = count_span_avx2<kFree>(scores, f, width, pick, inside, out.bins.data(), out.above);
#endif
  if (done < width) {
    auto* flags = reinterpret_cast<uint8_t*>(inside);
    count_span<kFree>(scores + done, kFree ? f + done : nullptr, width - done, pick, flags, out.bins.data(), out.above);
  }
}

// How a variant takes in the take pass: every free score >= threshold and, when need > 0, the need best of
// the free scores in [low, threshold), ties to the lowest index.
struct Choice {
  float threshold = 0.0f;
  float low = 0.0f;
  int64_t need = 0;
};

// The choice of one variant from the units' counts: the bin holding its count-th largest free score. What
// lies above that bin is taken by threshold; the need best inside it are ranked in the take pass. kMissed
// (1) when the bracket missed or the bin holds more than cap scores.
int choose(const Pick& pick, const std::vector<Counts>& counts, int variants, int v, int64_t cap, Choice& choice) {
  int64_t above = 0;
  std::vector<int64_t> bins(kBins, 0);
  for (size_t u = v; u < counts.size(); u += variants) {
    above += counts[u].above;
    for (size_t b = 0; b < counts[u].bins.size(); ++b) bins[b] += counts[u].bins[b];
  }
  if (above > pick.count) return 1;
  if (above == pick.count) {
    choice = Choice{bits_float(float_bits(pick.hi + 0.0f) + 1), 0.0f, 0};  // exactly the scores above hi (finite)
    return 0;
  }
  int64_t taken = above;
  int b = kBins - 1;
  for (; b >= 0 && taken + bins[b] < pick.count; --b) taken += bins[b];
  if (b < 0 || bins[b] > cap) return 1;
  const uint64_t top = std::min<uint64_t>(uint64_t(pick.high_bits) + 1, pick.low_bits + (uint64_t(b + 1) << pick.shift));
  // s >= threshold: s > hi or s in a bin above b (threshold is NaN, which no score reaches, when hi is +inf
  // and b the last bin)
  choice = Choice{bits_float(static_cast<uint32_t>(top)), bits_float(pick.low_bits + (uint32_t(b) << pick.shift)),
                  pick.count - taken};
  return 0;
}

// result = theta where free and score >= threshold, else the kept value (kPrev: prev's, else the result's own),
// over the width positions of a tile (result == nullptr: theta is the result already, only the free mask changes).
template <class Word, bool kScored, bool kFree, bool kPrev>
inline void take_span(const float* __restrict scores, const uint8_t* __restrict f, uint8_t* __restrict g,
                      Word* __restrict r, const Word* __restrict p, const Word* __restrict t, int64_t width,
                      float threshold) {
  if (r == nullptr) {
    for (int64_t c = 0; c < width; ++c) {
      const uint8_t available = kFree ? f[c] : uint8_t(1);
      uint8_t take = available;
      if constexpr (kScored) take &= static_cast<uint8_t>(scores[c] >= threshold);
      g[c] = available & (take ^ uint8_t(1));
    }
    return;
  }
  for (int64_t c = 0; c < width; ++c) {
    const Word available = kFree ? static_cast<Word>(f[c]) : Word(1);
    Word take = available;
    if constexpr (kScored) take &= static_cast<Word>(scores[c] >= threshold);
    const Word bits = static_cast<Word>(Word(0) - take);
    const Word kept = kPrev ? p[c] : r[c];
    r[c] = static_cast<Word>((t[c] & bits) | (kept & static_cast<Word>(~bits)));
    g[c] = static_cast<uint8_t>(available & (take ^ Word(1)));
  }
}

// Where one variant takes: its masks, its choice and its result.
struct Take {
  const uint8_t* free_in;  // nullptr: all free
  uint8_t* free_out;       // may alias free_in
  Choice choice;
  void* result;      // nullptr: theta is the result already
  const void* prev;  // what the result keeps where nothing is taken; nullptr: its own values
};

// The free scores of a tile in [low, threshold) with their indices, in index order (before the tile's take,
// which may overwrite the free mask).
template <bool kFree>
void gather_tile(const float* __restrict scores, const uint8_t* __restrict f, int64_t offset, int64_t width,
                 const Choice& choice, uint8_t* __restrict inside, std::vector<std::pair<float, int64_t>>& out) {
  uint8_t any = 0;  // most tiles hold none of the bin's few scores: one vectorized test skips them
  for (int64_t c = 0; c < width; ++c) {
    any |= static_cast<uint8_t>(scores[c] >= choice.low) & static_cast<uint8_t>(!(scores[c] >= choice.threshold));
  }
  if (any == 0) return;
  for (int64_t c = 0; c < width; ++c) {
    const uint8_t available = kFree ? f[c] : uint8_t(1);
    inside[c] = available & static_cast<uint8_t>(scores[c] >= choice.low) &
                static_cast<uint8_t>(!(scores[c] >= choice.threshold));
  }
  std::memset(inside + width, 0, 8);
  for (int64_t c = 0; c < width; c += 8) {
    uint64_t word;
    std::memcpy(&word, inside + c, sizeof word);
    while (word != 0) {
      const int64_t j = c + __builtin_ctzll(word) / 8;
      word &= word - 1;
      out.emplace_back(scores[j], offset + j);
    }
  }
}

template <class Word, bool kScored, bool kFree, bool kPrev>
inline void take_tile(const float* scores, const Take& take, int64_t offset, int64_t width, const Word* theta,
                      uint8_t* inside, std::vector<std::pair<float, int64_t>>* gathered) {
  const uint8_t* f = take.free_in + (kFree ? offset : 0);
  if (gathered != nullptr) gather_tile<kFree>(scores, f, offset, width, take.choice, inside, *gathered);
  Word* r = take.result == nullptr ? nullptr : static_cast<Word*>(take.result) + offset;
  const Word* p = kPrev ? static_cast<const Word*>(take.prev) + offset : nullptr;
  take_span<Word, kScored, kFree, kPrev>(scores, f, take.free_out + offset, r, p, theta + offset, width,
                                         take.choice.threshold);
}

// take_tile for one variant, with or without a free mask and a source of kept values.
template <class Word, bool kScored>
inline void take_variant(const float* scores, const Take& take, int64_t offset, int64_t width, const Word* theta,
                         uint8_t* inside, std::vector<std::pair<float, int64_t>>* gathered) {
  const bool prev = take.prev != nullptr && take.result != nullptr;
  if (take.free_in != nullptr) {
    if (prev) {
      take_tile<Word, kScored, true, true>(scores, take, offset, width, theta, inside, gathered);
    } else {
      take_tile<Word, kScored, true, false>(scores, take, offset, width, theta, inside, gathered);
    }
  } else if (prev) {
    take_tile<Word, kScored, false, true>(scores, take, offset, width, theta, inside, gathered);
  } else {
    take_tile<Word, kScored, false, false>(scores, take, offset, width, theta, inside, gathered);
  }
}

// The need best gathered scores of one variant (ties to the lowest index) are taken too: theta copied into
// the result there and the positions marked taken.
template <class Word>
void take_gathered(std::vector<std::pair<float, int64_t>>& gathered, const Take& take, const Word* theta) {
  const auto need = static_cast<size_t>(std::min<int64_t>(take.choice.need, gathered.size()));
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (need < gathered.size()) std::nth_element(gathered.begin(), gathered.begin() + need, gathered.end(), better);
  auto* result = static_cast<Word*>(take.result);
  for (size_t j = 0; j < need; ++j) {
    const int64_t i = gathered[j].second;
    if (result != nullptr) result[i] = theta[i];
    take.free_out[i] = 0;
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
  const auto variants = static_cast<int64_t>(takes.size());
  std::vector<std::vector<std::pair<float, int64_t>>> gathered(unit_count(rows, cols) * variants);
  parallel_rows(rows, cols, threads, [&](int64_t u, int64_t first, int64_t last) {
    if (!scored) {
      for (const Take& take : takes) {
        take_variant<Word, false>(nullptr, take, first * cols, (last - first) * cols, theta, nullptr, nullptr);
      }
      return;
    }
    alignas(64) uint8_t inside[kTile + 8];
    by_source(s, [&]<int kSource, bool kPerRow>() {
      for_tiles<kSource, kPerRow>(s, first, last, cols, [&](int64_t offset, const float* scores, int64_t width) {
        for (int64_t v = 0; v < variants; ++v) {
          auto* out = takes[v].choice.need > 0 ? &gathered[u * variants + v] : nullptr;
          take_variant<Word, true>(scores, takes[v], offset, width, theta, inside, out);
        }
      });
    });
  });
  for (int64_t v = 0; v < variants; ++v) {
    if (takes[v].choice.need == 0) continue;
    std::vector<std::pair<float, int64_t>> all;
    for (size_t u = v; u < gathered.size(); u += variants) all.insert(all.end(), gathered[u].begin(), gathered[u].end());
    take_gathered<Word>(all, takes[v], theta);
  }
}

// TIES' disjoint merge of positions [offset, offset + width) (see obim_disjoint_merge), the agreeing
// weights summed into div. Branch-free: a disagreeing delta or weight is masked to +0.0 by its bits.
template <bool kNormalize>
void disjoint_tile(const float* deltas, int64_t models, int64_t numel, const float* weights, const float* sign,
                   float* out, int64_t offset, int64_t width, float* __restrict div) {
  float* __restrict merged = out + offset;
  const float* __restrict elected = sign + offset;
  std::fill_n(merged, width, 0.0f);
  if constexpr (kNormalize) std::fill_n(div, width, 0.0f);
  for (int64_t k = 0; k < models; ++k) {
    const float* __restrict d = deltas + k * numel + offset;
    const uint32_t w = float_bits(weights[k]);
    for (int64_t i = 0; i < width; ++i) {
      const float own = static_cast<float>(d[i] > 0.0f) - static_cast<float>(d[i] < 0.0f);  // torch.sign, NaN: 0
      const uint32_t agree = 0u - static_cast<uint32_t>((own == elected[i]) & (elected[i] != 0.0f));
      merged[i] += bits_float(float_bits(d[i]) & agree);
      if constexpr (kNormalize) div[i] += bits_float(w & agree);
    }
  }
  if constexpr (kNormalize) {
    for (int64_t i = 0; i < width; ++i) {
      const uint32_t none = 0u - static_cast<uint32_t>(div[i] == 0.0f);
      merged[i] /= bits_float((float_bits(div[i]) & ~none) | (float_bits(1.0f) & none));
    }
  }
}

// Whether no value has an all-ones exponent (Inf or NaN), in blocks that each vectorize into one OR-reduction.
template <class Word>
int all_finite(const Word* __restrict data, int64_t n, Word exponent) {
  constexpr int64_t kBlock = 1 << 16;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    Word bad = 0;
    for (int64_t i = start; i < end; ++i) bad |= static_cast<Word>((data[i] & exponent) == exponent);
    if (bad != 0) return 0;
  }
  return 1;
}

}  // namespace

extern "C" {

// 1 when none of the n floating-point values at data (elem_size bytes each: 2, 4 or 8) is Inf or NaN, that is
// none has every bit of `exponent` (its format's exponent field) set; 0 when one is; -1 for another width.
// One thread and one pass at memory speed: it runs on the engine's reading thread, beside the merge.
int obim_all_finite(const void* data, int64_t n, int elem_size, uint64_t exponent) {
  switch (elem_size) {
    case 2:
      return all_finite(static_cast<const uint16_t*>(data), n, static_cast<uint16_t>(exponent));
    case 4:
      return all_finite(static_cast<const uint32_t*>(data), n, static_cast<uint32_t>(exponent));
    case 8:
      return all_finite(static_cast<const uint64_t*>(data), n, exponent);
    default:
      return -1;
  }
}

// TIES' disjoint merge (obim_trainer/merging/sign_consensus.py) in one pass instead of a dozen torch passes:
// out[i] = the sum, in checkpoint order, of deltas[k][i] whose sign is the elected sign[i] (never where it is
// 0), divided when `normalize` by the sum of their weights (by 1 where none agrees). deltas is [models, numel]
// float32, weighted already. The same float32 additions in the same order as torch's in-place ones, so the
// same bits (adding +0.0 where a checkpoint disagrees leaves a sum unchanged: it is never -0.0).
void obim_disjoint_merge(const float* deltas, int64_t models, const float* weights, const float* sign, int normalize,
                         float* out, int64_t numel, int threads) {
  parallel_rows(numel, 1, threads, [&](int64_t, int64_t first, int64_t last) {
    alignas(64) float div[kTile];
    for (int64_t offset = first; offset < last; offset += kTile) {
      const int64_t width = std::min(kTile, last - offset);
      if (normalize != 0) {
        disjoint_tile<true>(deltas, models, numel, weights, sign, out, offset, width, div);
      } else {
        disjoint_tile<false>(deltas, models, numel, weights, sign, out, offset, width, div);
      }
    }
  });
}

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

// How one step of iterative merging takes for several variants at once (a sweep's merges of the same
// tensor, each with its own free mask and count): variant v takes its free positions whose score is
// >= threshold[v], and then the need[v] best (ties to the lowest index) of its free scores in
// [low[v], threshold[v]) (obim_take_many does): exactly count[v] in all.
// Scores as in obim_take_many, computed once for all variants: a sample of every stride-th position
// brackets each variant's threshold, and one pass counts each variant's free scores above its bracket and
// bins those inside it. status[v]: 0 chosen, 1 the bracket missed or its bin holds more than cap scores
// (the caller selects otherwise). Returns 0, or 2 when a score is NaN or negative.
int obim_select(const float* given, const void* theta, const void* base, const float* scale, int source, int per_row,
                uint64_t seed, int64_t rows, int64_t cols, int64_t stride, int variants, const uint8_t* const* free,
                const int64_t* count, const int64_t* num_free, int64_t cap, float* threshold, float* low,
                int64_t* need, int* status, int threads) {
  const Scores s{given, theta, base, scale, seed, source, per_row};
  const int64_t numel = rows * cols;
  std::vector<float> sampled((numel + stride - 1) / stride);
  const auto samples = static_cast<int64_t>(sampled.size());
  parallel_for((samples + kSampleBlock - 1) / kSampleBlock, threads, [&](int64_t b) {
    for (int64_t j = b * kSampleBlock; j < std::min(samples, (b + 1) * kSampleBlock); ++j) {
      sampled[j] = score_at(s, j * stride, cols);
    }
  });
  std::vector<Pick> picks(variants);
  parallel_for(variants, threads, [&](int64_t v) {
    picks[v] = Pick{free[v], count[v], num_free[v]};
    std::vector<float> sample;
    sample.reserve(sampled.size());
    for (int64_t j = 0; j < samples; ++j) {
      if (free[v] == nullptr || free[v][j * stride]) sample.push_back(sampled[j]);
    }
    bracket(sample, picks[v]);
  });
  std::vector<Counts> counts(unit_count(rows, cols) * variants);
  std::atomic<bool> invalid{false};
  parallel_rows(rows, cols, threads, [&](int64_t u, int64_t first, int64_t last) {
    alignas(64) uint32_t inside[kTile + 8];  // the binned scores (AVX2) or the flags of a tile
    by_source(s, [&]<int kSource, bool kPerRow>() {
      for_tiles<kSource, kPerRow>(s, first, last, cols, [&](int64_t offset, const float* __restrict scores, int64_t width) {
        if (any_invalid(scores, width)) {  // every score, free or not; binning one would index out of range
          invalid = true;
          return;
        }
        for (int v = 0; v < variants; ++v) {
          const Pick& pick = picks[v];
          Counts& out = counts[u * variants + v];
          if (pick.free != nullptr) {
            count_tile<true>(scores, pick.free + offset, width, pick, inside, out);
          } else {
            count_tile<false>(scores, nullptr, width, pick, inside, out);
          }
        }
      });
    });
  });
  if (invalid) return 2;
  for (int v = 0; v < variants; ++v) {
    Choice choice;
    status[v] = choose(picks[v], counts, variants, v, cap, choice);
    threshold[v] = choice.threshold;
    low[v] = choice.low;
    need[v] = choice.need;
  }
  return 0;
}

// For each variant v: result[v] = theta at the free positions whose score is >= threshold[v], and at the
// need[v] best free scores in [low[v], threshold[v]) (ties to the lowest index; scored == 0: at every free
// position), bit for bit
// (result[v] == nullptr: no copy; prev[v] != nullptr: every other position of result[v] is prev[v]'s, so the
// result need not start as a copy), and free_out[v] marks the positions still free afterwards (it may
// alias free_in[v]; free_in[v] == nullptr: all were free). Scores are computed once per position for all
// variants: `given`, with source 1/2 the OBM saliency of theta against the base (both bfloat16 or both
// float32) and the float32 scale, or with source 3 uniform hashes of (seed, position). elem_size is the
// byte width of results and theta (1, 2, 4 or 8). Returns 0, or 1 for another width.
int obim_take_many(const float* given, const void* theta, const void* base, const float* scale, int source, int per_row,
                   uint64_t seed, int scored, int variants, const uint8_t* const* free_in, uint8_t* const* free_out,
                   const float* threshold, const float* low, const int64_t* need, void* const* result,
                   const void* const* prev, int64_t rows, int64_t cols, int elem_size, int threads) {
  const Scores s{given, theta, base, scale, seed, source, per_row};
  std::vector<Take> takes(variants);
  for (int v = 0; v < variants; ++v) {
    const Choice choice = scored ? Choice{threshold[v], low[v], need[v]} : Choice{};
    takes[v] = Take{free_in[v], free_out[v], choice, result[v], prev[v]};
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
