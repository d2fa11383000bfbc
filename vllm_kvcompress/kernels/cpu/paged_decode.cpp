// Paged decode attention over the page store, on CPU.
//
// One query token per request; a row is one (request, KV head), row = b * H + h,
// and its tokens sit in pages table[row, :ceil(lens[row] / S)] of the store's
// component tensors. A task attends the G query heads of one row:
//
//   table[row] -> page -> codes + fp16 scale/min of S slots -> dequantize into an
//   L1-sized float buffer [S, D] (float32 pages are read in place)
//   q[b, h*G:(h+1)*G] . keys -> logits [G, S] -> online softmax -> acc [G, D]
//
// Rows are spread over torch's intra-op threads. Head dims that are multiples of
// 16 (64, 128 compiled in) and pages of 16k slots take the vector path: 16 slots
// at a time in GCC/Clang vector types (one AVX-512 register, two AVX2 ones, four
// NEON ones), the 16 dot products reduced together by one transpose-and-add tree
// and a polynomial exp, so nothing needs -ffast-math and IEEE inf/NaN semantics
// hold. Other shapes take a plain scalar path. Dequantization follows
// paging/formats.py's decode (code * scale + min, float32).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

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
  const int32_t* table; // [R, width]
  const int64_t* lens;  // [R]
  float* out;           // [B, H * G, D]
  int64_t rows, heads, width;
  int G, D, S, groups;
  float scale;
};

// Ask for a page's bytes of one side ahead of use: pages sit anywhere in the pool,
// so the hardware prefetcher cannot follow a row from one page to the next.
inline void prefetch_page(const Side& side, int64_t page, int S, int D, size_t elem) {
  const size_t bytes = side.bits ? S * D * side.bits / 8 : S * D * elem;
  const char* base = static_cast<const char*>(side.data) + page * bytes;
  for (size_t off = 0; off < bytes; off += 256) __builtin_prefetch(base + off);
}

// Slots [0, n) of `page` as float32 rows of D in `buf`; float32 pages are returned in place.
template <typename scalar_t>
const float* load_page(const Side& side, int64_t page, int n, int S, int D, int groups,
                       float* buf) {
  const int gsize = D / groups;
  if (side.bits == 0) {
    const scalar_t* x = static_cast<const scalar_t*>(side.data) + page * S * D;
    if constexpr (std::is_same_v<scalar_t, float>) return x;
    for (int i = 0; i < n * D; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
  const int code_len = static_cast<int>(D * side.bits / 8);
  const uint8_t* codes = static_cast<const uint8_t*>(side.data) + page * S * code_len;
  const at::Half* scale = side.scale + page * S * groups;
  for (int s = 0; s < n; ++s) {
    for (int g = 0; g < groups; ++g) {
      const float sc = static_cast<float>(scale[s * groups + g]);
      float* out = buf + s * D + g * gsize;
      if (side.bits == 8) {
        const uint8_t* c = codes + s * code_len + g * gsize;
        for (int j = 0; j < gsize; ++j) out[j] = (static_cast<float>(c[j]) - 128.f) * sc;
      } else {
        const float mn = static_cast<float>(side.zero[(page * S + s) * groups + g]);
        const uint8_t* c = codes + s * code_len + g * gsize / 2;
        for (int j = 0; j < gsize / 2; ++j) {  // low nibble: even channel
          out[2 * j] = static_cast<float>(c[j] & 0x0F) * sc + mn;
          out[2 * j + 1] = static_cast<float>(c[j] >> 4) * sc + mn;
        }
      }
    }
  }
  return buf;
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

// 16 slots (keys, values: [16, DIM] float32) into the state of head `h` with query q.
// `bias`: log counts of the slots, or null; slots from `n` on are masked.
template <int DIM>
inline void attend16(Head<DIM>& h, const f32x16* q, const float* keys, const float* values,
                     const float* bias, int n, float scale) {
  constexpr int C = DIM / kLanes;
  f32x16 part[kLanes];
  for (int s = 0; s < kLanes; ++s) {
    f32x16 sum = q[0] * load16(keys + s * DIM);
    for (int c = 1; c < C; ++c) sum += q[c] * load16(keys + s * DIM + c * kLanes);
    part[kBitrev[s]] = sum;
  }
  f32x16 logits = sum_each(part) * scale;
  if (bias != nullptr) logits += load16(bias);
  if (n < kLanes) {
    const f32x16 inf = splat(-std::numeric_limits<float>::infinity());
    for (int s = n; s < kLanes; ++s) logits[s] = inf[0];
  }
  const float top = std::max(h.m, lane_max(logits));
  const float alpha = exp_nonpositive(h.m - top);
  const f32x16 p = exp16(logits - top);
  h.l = h.l * alpha + lane_sum(p);
  h.m = top;
  f32x16 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = h.acc[c] * alpha;
  for (int s = 0; s < kLanes; ++s)
    for (int c = 0; c < C; ++c) acc[c] += p[s] * load16(values + s * DIM + c * kLanes);
  for (int c = 0; c < C; ++c) h.acc[c] = acc[c];
}

// The vector path: DIM a multiple of 16, pages of 16k slots.
template <typename scalar_t, int DIM>
void decode_rows_vector(const Job& job) {
  constexpr int C = DIM / kLanes;
  const auto [q, k, v, count, table, lens, out, rows, heads, width, G, D, S, groups, scale] = job;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(S * DIM), vbuf(S * DIM), bias(S);
    std::vector<Head<DIM>> state(G);
    std::vector<f32x16> qv(G * C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / heads, h = row % heads;
      const float* qr = q + (b * heads * G + h * G) * DIM;
      for (int i = 0; i < G * C; ++i) qv[i] = load16(qr + i * kLanes);
      std::fill(state.begin(), state.end(), Head<DIM>{});
      const int64_t len = lens[row];
      for (int64_t first = 0; first < len; first += S) {
        const int64_t page = table[row * width + first / S];
        if (first + S < len) {
          const int64_t next = table[row * width + first / S + 1];
          prefetch_page(k, next, S, DIM, sizeof(scalar_t));
          prefetch_page(v, next, S, DIM, sizeof(scalar_t));
        }
        const int n = static_cast<int>(std::min<int64_t>(S, len - first));
        const float* keys = load_page<scalar_t>(k, page, S, S, DIM, groups, kbuf.data());
        const float* values = load_page<scalar_t>(v, page, S, S, DIM, groups, vbuf.data());
        if (count != nullptr)  // merged slots weigh count * exp(q . k)
          for (int s = 0; s < S; ++s) bias[s] = std::log(std::max(count[page * S + s], 1e-30f));
        for (int start = 0; start < n; start += kLanes)
          for (int g = 0; g < G; ++g)
            attend16<DIM>(state[g], qv.data() + g * C, keys + start * DIM,
                          values + start * DIM, count ? bias.data() + start : nullptr,
                          n - start, scale);
      }
      for (int g = 0; g < G; ++g) {
        float* o = out + (b * heads * G + h * G + g) * DIM;
        const f32x16 inv = splat(1.f / state[g].l);  // len 0 gives NaN, as in the torch path
        for (int c = 0; c < C; ++c) {
          const f32x16 x = state[g].acc[c] * inv;
          std::memcpy(o + c * kLanes, &x, sizeof(x));
        }
      }
    }
  });
}

// The scalar path, for any head_dim and page size.
template <typename scalar_t>
void decode_rows_scalar(const Job& job) {
  const auto [q, k, v, count, table, lens, out, rows, heads, width, G, D, S, groups, scale] = job;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(S * D), vbuf(S * D), logits(S), acc(G * D), m(G), l(G);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / heads, h = row % heads;
      const float* qr = q + (b * heads * G + h * G) * D;
      const int64_t len = lens[row];
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t first = 0; first < len; first += S) {
        const int64_t page = table[row * width + first / S];
        const int n = static_cast<int>(std::min<int64_t>(S, len - first));
        const float* keys = load_page<scalar_t>(k, page, n, S, D, groups, kbuf.data());
        const float* values = load_page<scalar_t>(v, page, n, S, D, groups, vbuf.data());
        for (int g = 0; g < G; ++g) {
          float top = m[g];
          for (int s = 0; s < n; ++s) {
            float x = 0.f;
            for (int d = 0; d < D; ++d) x += qr[g * D + d] * keys[s * D + d];
            logits[s] = x * scale;
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
        float* o = out + (b * heads * G + h * G + g) * D;
        const float inv = 1.f / l[g];  // len 0 gives NaN, as in the torch path
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

// q [B, Hq, D]; k/v: codes or model-dtype pages [P, S, *]; k_scale.. [P, S, groups] float16
// (unused sides may alias the codes); count [P, S] float32 or empty; table [R, W] int32;
// lens [R] int64. Returns [B, Hq, D] float32.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale,
                           torch::Tensor k_min, int64_t k_bits, torch::Tensor v,
                           torch::Tensor v_scale, torch::Tensor v_min, int64_t v_bits,
                           torch::Tensor count, torch::Tensor table, torch::Tensor lens,
                           double scale, int64_t groups, torch::ScalarType model_dtype) {
  const int64_t batch = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  const int64_t rows = table.size(0), heads = rows / batch;
  const int G = static_cast<int>(num_q_heads / heads), S = static_cast<int>(k.size(1));
  auto out = torch::empty({batch, num_q_heads, head_dim}, q.options().dtype(torch::kFloat32));
  const Side ks = side_of(k, k_scale, k_min, k_bits), vs = side_of(v, v_scale, v_min, v_bits);
  const float* counts = count.numel() ? count.data_ptr<float>() : nullptr;
  const Job job{q.data_ptr<float>(), ks, vs, counts, table.data_ptr<int32_t>(),
                lens.data_ptr<int64_t>(), out.data_ptr<float>(), rows, heads, table.size(1),
                G, static_cast<int>(head_dim), S, static_cast<int>(groups),
                static_cast<float>(scale)};
  const bool vector = S % kLanes == 0 && (head_dim == 64 || head_dim == 128);
  auto run = [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    if (vector && head_dim == 64) decode_rows_vector<scalar_t, 64>(job);
    else if (vector) decode_rows_vector<scalar_t, 128>(job);
    else decode_rows_scalar<scalar_t>(job);
  };
  switch (model_dtype) {
    case torch::kFloat32: run(std::type_identity<float>{}); break;
    case torch::kBFloat16: run(std::type_identity<at::BFloat16>{}); break;
    case torch::kHalf: run(std::type_identity<at::Half>{}); break;
    default: TORCH_CHECK(false, "paged_decode: model dtype ", model_dtype, " not supported");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention over the page store (CPU)");
}
