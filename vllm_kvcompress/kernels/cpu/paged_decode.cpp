// Paged decode attention over the page store, on CPU.
//
// One query token per request; a row is one (request, KV head), row = b * H + h,
// and its tokens sit in pages table[row, :ceil(lens[row] / S)] of the store's
// component tensors. A task attends the G query heads of one row:
//
//   table[row] -> pages -> codes + fp16 scale/min -> dequantize a tile of slots into
//   an L1-sized float buffer (float32 pages are read in place)
//   q[b, h*G:(h+1)*G] . keys -> logits [G, tile] -> online softmax -> acc [G, D]
//
// Tasks are spread over torch's intra-op threads; when there are too few rows for
// the threads, a row is cut into splits whose softmax states are merged after.
// Head dims 64 and 128 with pages of 16k slots take the vector path: runs of 16
// slots in GCC/Clang vector types (one AVX-512 register, two AVX2 ones, four NEON
// ones), the 16 dot products reduced together by one transpose-and-add tree, one
// softmax step per tile and a polynomial exp, so nothing needs -ffast-math and IEEE
// inf/NaN semantics hold. Other shapes take a plain scalar path. Dequantization
// follows paging/formats.py's decode (code * scale + min, float32). Slots past a
// row's end are never read into the output: they may hold anything.
//
// Optional, as in the torch path (kernels/paged_attention.py): a logit soft-cap
// (cap * tanh(logit / cap), before the log-count bias) and per-query-head attention
// sinks, one logit in the softmax's denominator with no value. A sink enters as the
// starting state of the online softmax (m = sink, l = 1, acc = 0) of a row's first
// split only, so merging splits counts it once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// One side (keys or values) of the store's pages; every tensor contiguous.
struct Side {
  const void* data;          // [P, S, D] model dtype (bits 0), [P, S, D * bits / 8] uint8
  const at::Half* scale;     // [P, S, groups] (bits 8 and 4)
  const at::Half* zero;      // [P, S, groups] (bits 4: the group's minimum)
  int64_t bits;
};

// One call's rows: the query, both sides of the pool, the page table and the shapes.
struct Job {
  const float* q;       // [B, H * G, D]
  Side k, v;
  const float* count;   // [P, S] or null
  const float* sinks;   // [H * G] logit per query head, or null
  const int32_t* table; // [R, width]
  const int64_t* lens;  // [R]
  float* out;           // [B, H * G, D]
  // Row b * H + h serves query heads h * G .. h * G + G - 1 of request b, so its
  // queries and outputs start at (row * G) * D: no need to split row into b and h.
  int64_t rows, width;
  int H, G, D, S, groups;
  float scale;
  float soft_cap;       // > 0: logits become soft_cap * tanh(logit / soft_cap); 0: off
};

// Ask for `n` slots' bytes of one side ahead of use: pages sit anywhere in the pool,
// so the hardware prefetcher cannot follow a row from one page to the next.
inline void prefetch_slots(const Side& side, int64_t slot, int n, int D, size_t elem) {
  const size_t slot_bytes = side.bits ? D * side.bits / 8 : D * elem;
  const char* base = static_cast<const char*>(side.data) + slot * slot_bytes;
  for (size_t off = 0; off < n * slot_bytes; off += 128) __builtin_prefetch(base + off);
}

using f32x16 = float __attribute__((vector_size(64)));
using i32x16 = int32_t __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}

inline f32x16 splat(float x) { return f32x16{} + x; }

// 16 bytes widened to int32 lanes. GCC 12 scalarizes __builtin_convertvector from
// uint8 lanes, so x86 gets the widening instructions by name.
inline i32x16 widen16(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<i32x16>(_mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i halves[2] = {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))};
  i32x16 x;
  std::memcpy(&x, halves, sizeof(x));
  return x;
#else
  i32x16 x;
  for (int i = 0; i < kLanes; ++i) x[i] = p[i];
  return x;
#endif
}

inline f32x16 to_float(i32x16 x) { return __builtin_convertvector(x, f32x16); }

// One group of `gsize` channels, a multiple of 32, from its codes: 16 codes per vector
// at 8 bits, 32 (two channels a byte, the low nibble first) at 4.
inline void dequantize_group(const uint8_t* codes, int bits, int gsize, float sc, float mn,
                             float* out) {
  for (int j = 0; j < gsize; j += 32) {
    if (bits == 8) {
      for (int h = 0; h < 32; h += 16) {
        const f32x16 y = (to_float(widen16(codes + j + h)) - 128.f) * sc;
        std::memcpy(out + j + h, &y, sizeof(y));
      }
    } else {
      const i32x16 c = widen16(codes + j / 2);
      const f32x16 lo = to_float(c & 15) * sc + mn;
      const f32x16 hi = to_float(c >> 4) * sc + mn;
      const f32x16 a = __builtin_shufflevector(lo, hi, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5,
                                               21, 6, 22, 7, 23);
      const f32x16 b = __builtin_shufflevector(lo, hi, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28,
                                               13, 29, 14, 30, 15, 31);
      std::memcpy(out + j, &a, sizeof(a));
      std::memcpy(out + j + 16, &b, sizeof(b));
    }
  }
}

// Slots [slot, slot + n) of the pool (slot = page * S + offset) as float32 rows of D in
// `buf`; float32 pages are returned in place.
template <typename scalar_t>
const float* load_slots(const Side& side, int64_t slot, int n, int D, int groups, float* buf) {
  const int gsize = D / groups;
  if (side.bits == 0) {
    const scalar_t* x = static_cast<const scalar_t*>(side.data) + slot * D;
    if constexpr (std::is_same_v<scalar_t, float>) return x;
    for (int i = 0; i < n * D; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
  const int code_len = static_cast<int>(D * side.bits / 8);
  const uint8_t* codes = static_cast<const uint8_t*>(side.data) + slot * code_len;
  const at::Half* scale = side.scale + slot * groups;
  for (int s = 0; s < n; ++s) {
    for (int g = 0; g < groups; ++g) {
      const float sc = static_cast<float>(scale[s * groups + g]);
      const float mn =
          side.bits == 4 ? static_cast<float>(side.zero[(slot + s) * groups + g]) : 0.f;
      const uint8_t* c = codes + s * code_len + g * gsize * side.bits / 8;
      float* out = buf + s * D + g * gsize;
      if (gsize % 32 == 0) {
        dequantize_group(c, static_cast<int>(side.bits), gsize, sc, mn, out);
      } else if (side.bits == 8) {
        for (int j = 0; j < gsize; ++j) out[j] = (static_cast<float>(c[j]) - 128.f) * sc;
      } else {
        for (int j = 0; j < gsize / 2; ++j) {  // low nibble: even channel
          out[2 * j] = static_cast<float>(c[j] & 0x0F) * sc + mn;
          out[2 * j + 1] = static_cast<float>(c[j] >> 4) * sc + mn;
        }
      }
    }
  }
  return buf;
}

// Lane reductions as trees of shuffles: a loop over the lanes would be a chain of 15
// dependent operations, which costs more than the page's arithmetic.
template <typename Op>
inline float reduce_lanes(f32x16 v, Op op) {
  v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

inline float lane_sum(f32x16 v) {
  return reduce_lanes(v, [](f32x16 a, f32x16 b) { return a + b; });
}

inline float lane_max(f32x16 v) {
  return reduce_lanes(v, [](f32x16 a, f32x16 b) { return a > b ? a : b; });
}

// exp of every lane, for lanes <= 0 (logits minus their running max): 2^n * 2^f with a
// degree-6 polynomial for 2^f on [-0.5, 0.5] (relative error ~2e-7); 0 below -87.
inline f32x16 exp16(f32x16 x) {
  const f32x16 low = splat(-87.f);
  const f32x16 y = (x < low ? low : x) * 1.4426950408889634f;
  const f32x16 n = (y + 12582912.f) - 12582912.f;  // round to nearest (|y| < 2**22)
  const f32x16 f = y - n;
  f32x16 p = splat(1.5353362e-4f);
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < low ? f32x16{} : p * two_n;
}

inline float exp_nonpositive(float x) { return exp16(splat(x))[0]; }

// tanh of every lane: Cephes' tanhf, an odd polynomial below 0.625 (where 1 - e^-2|x|
// would lose digits to cancellation), (1 - e) / (1 + e) with e = e^-2|x| above. |x| is
// clamped to 9 (tanh is 1.f from there), which also keeps NaN lanes (slots past a row's
// end, masked after) out of exp16's float-to-int conversion.
inline f32x16 tanh16(f32x16 x) {
  const f32x16 abs_x = x < 0.f ? -x : x;
  const f32x16 a = abs_x < 9.f ? abs_x : splat(9.f);  // NaN compares false: 9
  const f32x16 s = x * x;
  f32x16 p = splat(-5.70498872745e-3f);
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const f32x16 small = p * s * x + x;
  const f32x16 e = exp16(-2.f * a);
  const f32x16 t = (1.f - e) / (1.f + e);
  return a < 0.625f ? small : (x < 0.f ? -t : t);
}

// The start of a query head's online softmax: empty, or its sink (m = sink, l = 1).
inline void start_state(float& m, float& l, const Job& job, int64_t row, int g) {
  m = -std::numeric_limits<float>::infinity();
  l = 0.f;
  if (job.sinks != nullptr) {
    m = job.sinks[(row % job.H) * job.G + g];
    l = 1.f;
  }
}

// Lane i of the result is the sum of the lanes of x[i]. A tree of 15 adds and 30
// shuffles instead of 16 separate reductions; each level pairs vectors and halves
// the width of the partial sums, which leaves lane i holding input bitrev4(i):
// callers store slot s's partials at x[kBitrev[s]] to read the sums in order.
constexpr int kBitrev[kLanes] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

inline f32x16 sum_each(const f32x16* x) {
  f32x16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10,
                                   11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14,
                                   15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                   25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26,
                                   27, 14, 15, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28,
                                 14, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29,
                                 15, 31);
}

// Online-softmax state of one query head: running max, sum and output.
template <int DIM>
struct Head {
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.f;
  f32x16 acc[DIM / kLanes] = {};
};

// Slots one softmax step takes: 16 KiB of float32 keys (and as much of values) so that
// a tile stays in L1 while each of the G query heads reads it. One step per tile, not
// per 16 slots, amortizes the step's serial part (max, rescale, sums) over 2-4 chunks.
template <int DIM>
constexpr int kTile = 16384 / (4 * DIM);

// One tile of a row: `chunks` runs of 16 slots (the last one `tail` valid), each
// inside one page, as float32 [16, DIM] keys and values (in place or dequantized).
template <int DIM>
struct Tile {
  const float* keys[kTile<DIM> / kLanes];
  const float* values[kTile<DIM> / kLanes];
  const float* bias = nullptr;  // [chunks * 16] log counts, or null
  int chunks = 0, tail = kLanes;
};

// The tile into the state of head `h` with query q: 16 dot products per chunk reduced
// by one tree, one max and one rescale for the tile, then p . V on two accumulator
// sets, so the adds do not wait on one another.
template <int DIM>
inline void attend_tile(Head<DIM>& h, const f32x16* q, const Tile<DIM>& t, float scale,
                        float soft_cap) {
  constexpr int C = DIM / kLanes, J = kTile<DIM> / kLanes;
  f32x16 logits[J];
  for (int j = 0; j < t.chunks; ++j) {
    f32x16 part[kLanes];
    for (int s = 0; s < kLanes; ++s) {
      const float* key = t.keys[j] + s * DIM;
      f32x16 sum = q[0] * load16(key);
      for (int c = 1; c < C; ++c) sum += q[c] * load16(key + c * kLanes);
      part[kBitrev[s]] = sum;
    }
    logits[j] = sum_each(part) * scale;
    if (soft_cap > 0.f) logits[j] = tanh16(logits[j] * (1.f / soft_cap)) * soft_cap;
    if (t.bias != nullptr) logits[j] += load16(t.bias + j * kLanes);
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (int s = t.tail; s < kLanes; ++s) logits[t.chunks - 1][s] = -inf;
  f32x16 top_v = logits[0];
  for (int j = 1; j < t.chunks; ++j) top_v = top_v > logits[j] ? top_v : logits[j];
  const float top = std::max(h.m, lane_max(top_v));
  const float alpha = exp_nonpositive(h.m - top);
  alignas(64) float p[kTile<DIM>];
  f32x16 psum{};
  for (int j = 0; j < t.chunks; ++j) {
    const f32x16 e = exp16(logits[j] - top);
    psum += e;
    std::memcpy(p + j * kLanes, &e, sizeof(e));
  }
  h.l = h.l * alpha + lane_sum(psum);
  h.m = top;
  f32x16 even[C], odd[C] = {};
  for (int c = 0; c < C; ++c) even[c] = h.acc[c] * alpha;
  for (int j = 0; j < t.chunks; ++j) {
    const int n = j + 1 < t.chunks ? kLanes : t.tail;  // slots past the row hold anything
    const float* value = t.values[j];
    int s = 0;
    for (; s + 1 < n; s += 2)
      for (int c = 0; c < C; ++c) {
        even[c] += p[j * kLanes + s] * load16(value + s * DIM + c * kLanes);
        odd[c] += p[j * kLanes + s + 1] * load16(value + (s + 1) * DIM + c * kLanes);
      }
    if (s < n)
      for (int c = 0; c < C; ++c)
        even[c] += p[j * kLanes + s] * load16(value + s * DIM + c * kLanes);
  }
  for (int c = 0; c < C; ++c) h.acc[c] = even[c] + odd[c];
}

// The pool slot (page * S + offset) holding token `slot` of `row`.
inline int64_t slot_of(const Job& job, int64_t row, int64_t slot) {
  return job.table[row * job.width + slot / job.S] * job.S + slot % job.S;
}

// out[b, h * G + g] = acc / l for query head g of row b * H + h; l = 0 (a row of no
// tokens) gives NaN, as in the torch path.
template <int DIM>
inline void write_out(const Job& job, int64_t row, int g, const f32x16* acc, float l) {
  float* o = job.out + (row * job.G + g) * DIM;
  const f32x16 inv = splat(1.f / l);
  for (int c = 0; c < DIM / kLanes; ++c) {
    const f32x16 x = acc[c] * inv;
    std::memcpy(o + c * kLanes, &x, sizeof(x));
  }
}

// The vector path: DIM a multiple of 16, pages of 16k slots. A task is one split of a
// row: rows are cut into `splits` runs of whole tiles when there are too few rows to
// keep every thread busy, and the splits' states merged after.
template <typename scalar_t, int DIM>
void decode_rows_vector(const Job& job) {
  constexpr int C = DIM / kLanes, T = kTile<DIM>;
  const int64_t rows = job.rows;
  const int G = job.G;
  const int64_t threads = at::get_num_threads();
  int64_t longest = 0;
  for (int64_t r = 0; r < rows; ++r) longest = std::max(longest, job.lens[r]);
  // Enough tasks for 4 per thread, but no split shorter than 8 tiles; one thread (a
  // serving worker) has nothing to balance.
  const int64_t splits = threads == 1 ? 1 : std::clamp<int64_t>(
      std::min((4 * threads + rows - 1) / rows, (longest + 8 * T - 1) / (8 * T)), 1, 64);
  // [rows, splits, G, 2 + DIM]: m, l, acc of each split, when there are several.
  std::vector<float> partial(splits > 1 ? rows * splits * G * (2 + DIM) : 0);
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(T * DIM), vbuf(T * DIM), bias(T);
    std::vector<Head<DIM>> state(G);
    std::vector<f32x16> qv(G * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / splits, split = task % splits;
      const float* qr = job.q + row * G * DIM;
      for (int i = 0; i < G * C; ++i) qv[i] = load16(qr + i * kLanes);
      std::fill(state.begin(), state.end(), Head<DIM>{});
      if (split == 0)  // a sink counts once per row: in its first split
        for (int g = 0; g < G; ++g) start_state(state[g].m, state[g].l, job, row, g);
      const int64_t len = job.lens[row], tiles = (len + T - 1) / T;
      const int64_t per = (tiles + splits - 1) / splits;
      const int64_t stop = std::min(len, (split + 1) * per * T);
      for (int64_t first = split * per * T; first < stop; first += T) {
        const int n = static_cast<int>(std::min<int64_t>(T, stop - first));
        Tile<DIM> tile;
        tile.chunks = (n + kLanes - 1) / kLanes;
        tile.tail = n - (tile.chunks - 1) * kLanes;
        if (first + T < stop)  // the next tile's pages sit anywhere in the pool
          for (int64_t s = first + T; s < std::min(stop, first + 2 * T); s += kLanes) {
            const int64_t slot = slot_of(job, row, s);
            prefetch_slots(job.k, slot, kLanes, DIM, sizeof(scalar_t));
            prefetch_slots(job.v, slot, kLanes, DIM, sizeof(scalar_t));
          }
        for (int j = 0; j < tile.chunks; ++j) {
          const int64_t slot = slot_of(job, row, first + j * kLanes);
          tile.keys[j] = load_slots<scalar_t>(job.k, slot, kLanes, DIM, job.groups,
                                              kbuf.data() + j * kLanes * DIM);
          tile.values[j] = load_slots<scalar_t>(job.v, slot, kLanes, DIM, job.groups,
                                                vbuf.data() + j * kLanes * DIM);
          if (job.count != nullptr)  // merged slots weigh count * exp(q . k)
            for (int s = 0; s < kLanes; ++s)
              bias[j * kLanes + s] = std::log(std::max(job.count[slot + s], 1e-30f));
        }
        if (job.count != nullptr) tile.bias = bias.data();
        for (int g = 0; g < G; ++g)
          attend_tile<DIM>(state[g], qv.data() + g * C, tile, job.scale, job.soft_cap);
      }
      for (int g = 0; g < G; ++g) {
        if (splits > 1) {
          float* o = partial.data() + ((row * splits + split) * G + g) * (2 + DIM);
          o[0] = state[g].m;
          o[1] = state[g].l;
          std::memcpy(o + 2, state[g].acc, sizeof(state[g].acc));
          continue;
        }
        write_out<DIM>(job, row, g, state[g].acc, state[g].l);
      }
    }
  });
  if (splits == 1) return;
  // Merge: out = sum_i e^(m_i - m) acc_i / sum_i e^(m_i - m) l_i, m = max_i m_i. A split
  // past its row's end has m = -inf, l = 0 and weighs nothing.
  at::parallel_for(0, rows * G, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / G, g = i % G;
      const float* part = partial.data() + (row * splits * G + g) * (2 + DIM);
      const int64_t stride = G * (2 + DIM);
      float m = -std::numeric_limits<float>::infinity(), l = 0.f;
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, part[s * stride]);
      f32x16 acc[C] = {};
      for (int64_t s = 0; s < splits; ++s) {
        const float* p = part + s * stride;
        if (p[1] == 0.f) continue;
        const float w = exp_nonpositive(p[0] - m);
        l += w * p[1];
        for (int c = 0; c < C; ++c) acc[c] += w * load16(p + 2 + c * kLanes);
      }
      write_out<DIM>(job, row, g, acc, l);
    }
  });
}

// The scalar path, for any head_dim and page size.
template <typename scalar_t>
void decode_rows_scalar(const Job& job) {
  const int64_t width = job.width;
  const int G = job.G, D = job.D, S = job.S;
  const float* q = job.q;
  const float* count = job.count;
  at::parallel_for(0, job.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(S * D), vbuf(S * D), logits(S), acc(G * D), m(G), l(G);
    for (int64_t row = begin; row < end; ++row) {
      const float* qr = q + row * G * D;
      const int64_t len = job.lens[row];
      for (int g = 0; g < G; ++g) start_state(m[g], l[g], job, row, g);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0; first < len; first += S) {
        const int64_t page = job.table[row * width + first / S];
        const int n = static_cast<int>(std::min<int64_t>(S, len - first));
        const float* keys = load_slots<scalar_t>(job.k, page * S, n, D, job.groups, kbuf.data());
        const float* values = load_slots<scalar_t>(job.v, page * S, n, D, job.groups, vbuf.data());
        for (int g = 0; g < G; ++g) {
          float top = m[g];
          for (int s = 0; s < n; ++s) {
            float x = 0.f;
            for (int d = 0; d < D; ++d) x += qr[g * D + d] * keys[s * D + d];
            logits[s] = x * job.scale;
            if (job.soft_cap > 0.f) logits[s] = job.soft_cap * std::tanh(logits[s] / job.soft_cap);
            if (count != nullptr) logits[s] += std::log(std::max(count[page * S + s], 1e-30f));
            top = std::max(top, logits[s]);
          }
          const float alpha = exp_nonpositive(m[g] - top);
          l[g] *= alpha;
          float* a = acc.data() + g * D;
          for (int d = 0; d < D; ++d) a[d] *= alpha;
          for (int s = 0; s < n; ++s) {
            const float p = exp_nonpositive(logits[s] - top);
            l[g] += p;
            for (int d = 0; d < D; ++d) a[d] += p * values[s * D + d];
          }
          m[g] = top;
        }
      }
      for (int g = 0; g < G; ++g) {
        float* o = job.out + (row * G + g) * D;
        const float inv = 1.f / l[g];  // len 0 gives NaN (0 with a sink), as in the torch path
        for (int d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
      }
    }
  });
}

Side side_of(const torch::Tensor& data, const torch::Tensor& scale, const torch::Tensor& zero,
             int64_t bits) {
  return {data.data_ptr(), bits ? scale.data_ptr<at::Half>() : nullptr,
          bits == 4 ? zero.data_ptr<at::Half>() : nullptr, bits};
}

}  // namespace

// q [B, Hq, D] in the model dtype; k/v: codes or model-dtype pages [P, S, *]; k_scale..
// [P, S, groups] float16 (unused sides may alias the codes); count [P, S] float32 or None;
// table [R, W] int32; lens [R]; soft_cap > 0 or 0 (off); sinks [Hq] or None (any float
// dtype: read as float32). Returns [B, Hq, D] in the model dtype. The checks live
// here rather than in Python, where they cost more than a short row's attention.
// A type carried as a value (std::type_identity is C++20; torch 2.11 builds C++17).
template <typename T>
struct Tag {
  using type = T;
};

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale,
                           torch::Tensor k_min, int64_t k_bits, torch::Tensor v,
                           torch::Tensor v_scale, torch::Tensor v_min, int64_t v_bits,
                           std::optional<torch::Tensor> count, torch::Tensor table,
                           torch::Tensor lens, double scale, int64_t groups, double soft_cap,
                           std::optional<torch::Tensor> sinks) {
  TORCH_CHECK(q.dim() == 3, "q: [B, Hq, D], got ", q.sizes());
  const auto model_dtype = q.scalar_type();
  const int64_t batch = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(table.dim() == 2, "table: [rows, pages], got ", table.sizes());
  const int64_t rows = table.size(0);
  TORCH_CHECK(batch > 0 && rows > 0, "paged_decode: ", batch, " requests over ", rows,
              " rows; it needs at least one of each");
  TORCH_CHECK(rows % batch == 0, "table has ", rows, " rows, not a multiple of the batch ", batch);
  const int64_t heads = rows / batch;
  TORCH_CHECK(num_q_heads % heads == 0, num_q_heads, " query heads do not group onto ", heads);
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == rows, "lens ", lens.sizes(), " != (", rows, ",)");
  TORCH_CHECK(table.scalar_type() == torch::kInt && table.is_contiguous(),
              "table: contiguous int32");
  for (const auto* x : {&k, &k_scale, &k_min, &v, &v_scale, &v_min})
    TORCH_CHECK(x->is_contiguous() && x->dim() >= 2 && x->size(1) == k.size(1),
                "components: contiguous [P, S, *]");
  for (const auto& [side, bits] : {std::pair{&k, k_bits}, std::pair{&v, v_bits}})
    TORCH_CHECK(bits != 0 || side->scalar_type() == model_dtype, "unquantized pages are ",
                side->scalar_type(), ", q is ", model_dtype);
  TORCH_CHECK(!count || (count->scalar_type() == torch::kFloat && count->is_contiguous()),
              "count: [P, S] float32");
  TORCH_CHECK(soft_cap >= 0.0 && std::isfinite(soft_cap), "soft_cap: > 0, or 0 (off); got ",
              soft_cap);
  TORCH_CHECK(!sinks || (sinks->dim() == 1 && sinks->size(0) == num_q_heads &&
                         sinks->is_floating_point() && sinks->device().is_cpu()),
              "sinks: [", num_q_heads, "] floats on the CPU, got ",
              sinks ? sinks->sizes() : c10::IntArrayRef{});
  const auto sinks32 = sinks ? sinks->to(torch::kFloat32).contiguous() : torch::Tensor();
  const auto qf = q.to(torch::kFloat32).contiguous();  // no copy when it already is
  const auto lens64 = lens.to(torch::kInt64).contiguous();
  const int G = static_cast<int>(num_q_heads / heads), S = static_cast<int>(k.size(1));
  auto out = torch::empty({batch, num_q_heads, head_dim}, q.options().dtype(torch::kFloat32));
  const Side ks = side_of(k, k_scale, k_min, k_bits), vs = side_of(v, v_scale, v_min, v_bits);
  const Job job{qf.data_ptr<float>(), ks, vs, count ? count->data_ptr<float>() : nullptr,
                sinks ? sinks32.data_ptr<float>() : nullptr,
                table.data_ptr<int32_t>(), lens64.data_ptr<int64_t>(), out.data_ptr<float>(),
                rows, table.size(1), static_cast<int>(heads), G, static_cast<int>(head_dim), S,
                static_cast<int>(groups), static_cast<float>(scale),
                static_cast<float>(soft_cap)};
  const bool vector = S % kLanes == 0 && (head_dim == 64 || head_dim == 128);
  auto run = [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if (vector && head_dim == 64) decode_rows_vector<scalar_t, 64>(job);
    else if (vector) decode_rows_vector<scalar_t, 128>(job);
    else decode_rows_scalar<scalar_t>(job);
  };
  switch (model_dtype) {
    case torch::kFloat32: run(Tag<float>{}); break;
    case torch::kBFloat16: run(Tag<at::BFloat16>{}); break;
    case torch::kHalf: run(Tag<at::Half>{}); break;
    default: TORCH_CHECK(false, "paged_decode: model dtype ", model_dtype, " not supported");
  }
  return model_dtype == torch::kFloat32 ? out : out.to(model_dtype);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention over the page store (CPU)");
}
