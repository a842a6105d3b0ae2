// CPU kernels of the embedded engine (rollout/cpu_kernels.py builds and loads this file; each
// kernel's torch reference is there, and tests/test_cpu_kernels.py compares the two).
//
// decode_attention: one decode step's attention for every active slot, read straight from the
// per-slot KV cache. torch's SDPA on the same inputs (a length mask over the longest slot) took
// about twice as long as reading the keys and values once: its CPU kernel is built for long
// query blocks, and a decode step has one query per head. Here each (slot, kv head) is one work
// item: its G query heads' scores against the slot's own cached positions (no mask, no padding
// to the longest slot), a softmax, and the weighted sum of the values.
//
// rms_norm: one pass over each row (torch's CPU rms_norm runs five ops, each a pass and a
// dispatch: ~55 us for a decode step's [32, 576], this ~4 us).
//
// rope_store: a decode step's RoPE on q and k, with the new keys and values written into the
// cache at each slot's position (in torch: a concatenation, three elementwise ops and two
// index_copy_ per layer).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

inline float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// One (slot, kv head): q [g, d] (rows q_row apart), k and v [len, d] rows, out [g, d].
// s: scratch for the g x len scores. ND = d / Vec::size(), a compile-time constant so that the
// accumulators stay in registers.
template <int64_t ND>
void attend(const float* q, int64_t q_row, const float* k, const float* v, float* out, int64_t g,
            int64_t len, float scale, float* s) {
  constexpr int64_t W = Vec::size();
  constexpr int64_t d = ND * W;
  // Scores, four positions at a time: four independent sums per query head keep the FMA
  // pipeline full (one sum at a time waits on each FMA's latency). The prefetch asks for the
  // keys eight positions ahead: each slot's rows are a short run in memory, too short for the
  // hardware prefetcher to get ahead on its own.
  constexpr int64_t P = 4;
  int64_t p = 0;
  for (; p + P <= len; p += P) {
    const float* kp = k + p * d;
    for (int64_t i = 0; i < P * d; i += 16) __builtin_prefetch(kp + 8 * d + i);
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = q + j * q_row;
      Vec acc[P];
      for (int64_t i = 0; i < P; ++i) acc[i] = Vec(0.f);
      for (int64_t e = 0; e < ND; ++e) {
        const Vec qv = Vec::loadu(qj + e * W);
        for (int64_t i = 0; i < P; ++i) acc[i] = at::vec::fmadd(qv, Vec::loadu(kp + i * d + e * W), acc[i]);
      }
      for (int64_t i = 0; i < P; ++i) s[j * len + p + i] = sum_lanes(acc[i]) * scale;
    }
  }
  for (; p < len; ++p) {
    for (int64_t j = 0; j < g; ++j) {
      Vec acc(0.f);
      for (int64_t e = 0; e < ND; ++e) acc = at::vec::fmadd(Vec::loadu(q + j * q_row + e * W), Vec::loadu(k + p * d + e * W), acc);
      s[j * len + p] = sum_lanes(acc) * scale;
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* sj = s + j * len;
    const float top = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sj, len);
    at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, sj, sj, len);
    const float inv = 1.f / at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sj, len);
    Vec acc[ND];
    for (int64_t e = 0; e < ND; ++e) acc[e] = Vec(0.f);
    for (int64_t t = 0; t < len; ++t) {
      const float* vt = v + t * d;
      if (j == 0) {
        for (int64_t i = 0; i < d; i += 16) __builtin_prefetch(vt + 8 * d + i);
      }
      const Vec w(sj[t]);
      for (int64_t e = 0; e < ND; ++e) acc[e] = at::vec::fmadd(w, Vec::loadu(vt + e * W), acc[e]);
    }
    for (int64_t e = 0; e < ND; ++e) (acc[e] * Vec(inv)).store(out + j * d + e * W);
  }
}

// q [n, hkv, g, d] (last dim contiguous), k_cache / v_cache [B, hkv, S, d] contiguous with
// B >= n, lengths [n] int64 in 1..S: slot i attends to its positions 0..lengths[i]-1.
// Returns [n, hkv, g, d] contiguous.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "decode_attention: q and caches must be 4-d");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: caches must be contiguous and of one shape");
  TORCH_CHECK(q.stride(3) == 1, "decode_attention: q's last dim must be contiguous");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.dim() == 1, "decode_attention: lengths int64 [n]");
  const int64_t n = q.size(0), hkv = q.size(1), g = q.size(2), d = q.size(3), S = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) >= n && k_cache.size(1) == hkv && k_cache.size(3) == d && lengths.size(0) == n,
              "decode_attention: shapes of q, caches and lengths do not match");
  const int64_t nd = d / Vec::size();
  TORCH_CHECK(d % Vec::size() == 0 && (nd == 1 || nd == 2 || nd == 4 || nd == 8 || nd == 16), "decode_attention: head dim ", d, " not supported");
  const int64_t* len_of = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(len_of[i] >= 1 && len_of[i] <= S, "decode_attention: length ", len_of[i], " outside 1..", S);

  at::Tensor out = at::empty({n, hkv, g, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, n * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t slot = item / hkv, head = item % hkv, len = len_of[slot];
      scores.resize(g * len);
      const float* qi = qp + slot * qs0 + head * qs1;
      const float* ki = kp + item * S * d;
      const float* vi = vp + item * S * d;
      float* oi = op + item * g * d;
      switch (nd) {
        case 1: attend<1>(qi, qs2, ki, vi, oi, g, len, sc, scores.data()); break;
        case 2: attend<2>(qi, qs2, ki, vi, oi, g, len, sc, scores.data()); break;
        case 4: attend<4>(qi, qs2, ki, vi, oi, g, len, sc, scores.data()); break;
        case 8: attend<8>(qi, qs2, ki, vi, oi, g, len, sc, scores.data()); break;
        default: attend<16>(qi, qs2, ki, vi, oi, g, len, sc, scores.data()); break;
      }
    }
  });
  return out;
}

// x [..., E] contiguous, w [E] -> w * x / sqrt(mean(x^2) + eps) per row, in float32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: x [..., E] contiguous, w [E]");
  const int64_t E = w.size(0), rows = x.numel() / E;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  // About 32k elements per thread: a decode step's few rows stay on one thread (starting the
  // others costs more than the work), a prefill's thousands spread.
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / E), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * E;
      const float ss = at::vec::map_reduce_all<float>([](Vec v) { return v * v; }, [](Vec& a, Vec& b) { return a + b; }, xr, E);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(E) + e);
      at::vec::map2([inv](Vec a, Vec b) { return a * Vec(inv) * b; }, op + r * E, xr, wp, E);
    }
  });
  return out;
}

// qkv [n, H + 2 Hkv, D] contiguous (q heads, k heads, v heads of each slot's new token);
// cos, sin [S, D] (rope_tables: sin signed, so rotated = x * cos + swap_halves(x) * sin);
// positions [n] int64 in 0..S-1; k_cache / v_cache [B, Hkv, S, D] contiguous, B >= n.
// Writes slot i's rotated keys and its values at position positions[i]; returns the rotated
// queries [n, H, D].
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                      at::Tensor& k_cache, at::Tensor& v_cache, int64_t num_heads) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat, "rope_store: float32 only");
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "rope_store: layouts");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.dim() == 1, "rope_store: positions int64 [n]");
  const int64_t n = qkv.size(0), D = qkv.size(2), hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(qkv.size(1) == num_heads + 2 * hkv && k_cache.size(3) == D && k_cache.size(0) >= n && positions.size(0) == n &&
              cos.size(1) == D && sin.size(1) == D && cos.size(0) >= S && sin.size(0) >= S && D % 2 == 0,
              "rope_store: shapes of qkv, tables, positions and caches do not match");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(pos[i] >= 0 && pos[i] < S, "rope_store: position ", pos[i], " outside 0..", S - 1);
  at::Tensor q = at::empty({n, num_heads, D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  const int64_t heads = num_heads + 2 * hkv, half = D / 2;
  auto rotate = [&](const float* x, const float* c, const float* s, float* out) {
    for (int64_t e = 0; e < half; ++e) out[e] = x[e] * c[e] + x[e + half] * s[e];
    for (int64_t e = half; e < D; ++e) out[e] = x[e] * c[e] + x[e - half] * s[e];
  };
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / (heads * D)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = xp + i * heads * D;
      const float* c = cp + pos[i] * D;
      const float* s = sp + pos[i] * D;
      for (int64_t h = 0; h < num_heads; ++h) rotate(x + h * D, c, s, qp + (i * num_heads + h) * D);
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t row = ((i * hkv + h) * S + pos[i]) * D;
        rotate(x + (num_heads + h) * D, c, s, kp + row);
        std::copy(x + (num_heads + hkv + h) * D, x + (num_heads + hkv + h + 1) * D, vp + row);
      }
    }
  });
  return q;
}

}  // namespace

TORCH_LIBRARY(relayrl_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor", &decode_attention);
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, Tensor(a!) k_cache, Tensor(b!) v_cache, int num_heads) -> Tensor",
        &rope_store);
}
