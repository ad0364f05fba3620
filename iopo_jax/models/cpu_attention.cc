// Decode attention over a KV cache for XLA:CPU, as an XLA FFI custom call.
//
// Grouped-query attention of a few new tokens per row (t small: decode steps, speculative windows)
// against the cached keys/values, with the softmax in float32. On XLA:CPU the einsum formulation runs as
// a batched dot with one tiny [g, h] x [h, s] product per (row, kv head), at a few GFLOP/s; this kernel
// streams each row's cached keys and values once for all its query heads, skips masked-out slots (a
// cache's unused tail costs nothing), and spreads the rows (or (row, kv head) pairs when rows are few)
// over XLA's intra-op thread pool.
//
// Operands (float32 or bfloat16 q/k/v of one dtype; output in q's dtype):
//   q     [b, t, n, h]          the new tokens' queries (RoPE applied, not yet scaled)
//   k, v  [L, b, s, kh, h]      the stacked cache of L layers (L = 1 for a single layer's cache)
//   layer []  int32             which layer of the stack to read
//   mask  [b, t, s]  bool       who sees whom (slot written and causal); fully masked rows give zeros
// Result:
//   out   [b, t, n, h]
// Attribute:
//   scale float32               multiplies q.k (1/sqrt(h))
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) {  // bfloat16 bits -> float32
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void from_f32(float x, float* out) { *out = x; }
inline void from_f32(float x, uint16_t* out) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u) {  // inf / nan: truncate, keep nan a nan
    *out = static_cast<uint16_t>((u >> 16) | ((u & 0xffffu) ? 0x40u : 0u));
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  *out = static_cast<uint16_t>(u >> 16);
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), written so that the compiler vectorizes the
// loop that calls it (glibc's expf is a scalar call): x = n ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for e^r (Cephes' expf coefficients, ~1 ulp), and 2^n put into the exponent bits. Inputs below
// -87 (where e^x < 2^-126) give 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x <= -87.0f ? 0.0f : p * scale;
}

struct Dims {
  int64_t b, t, n, h, layers, s, kh;
};

// All t * (kv1 - kv0) * g queries of one row for kv heads [kv0, kv1). A cached slot's keys (and values)
// of all kv heads are adjacent, so with the whole range the cache is read as one contiguous stream.
// `work` is scratch of at least 2 * m * h + m * s + s floats (m = (kv1 - kv0) * g query heads).
template <typename T>
void AttendBlock(const T* q, const T* k, const T* v, const bool* mask, T* out, const Dims& d, int64_t layer,
                 int64_t row, int64_t kv0, int64_t kv1, float scale, std::vector<float>& work) {
  const int64_t g = d.n / d.kh, h = d.h, s_len = d.s, m = (kv1 - kv0) * g;
  const int64_t slot_stride = d.kh * h;  // between consecutive slots of one (layer, row)
  const int64_t base = ((layer * d.b + row) * s_len) * slot_stride + kv0 * h;
  const T* kb = k + base;
  const T* vb = v + base;
  work.resize(static_cast<size_t>(2 * m * h + m * s_len + s_len));
  float* qf = work.data();          // [m, h], scaled
  float* scores = qf + m * h;       // [m, slots]
  float* acc = scores + m * s_len;  // [m, h]
  int32_t* slots = reinterpret_cast<int32_t*>(acc + m * h);
  static_assert(sizeof(int32_t) == sizeof(float), "slot list shares the float scratch");

  for (int64_t ti = 0; ti < d.t; ++ti) {
    const bool* mk = mask + (row * d.t + ti) * s_len;
    const int64_t qoff = ((row * d.t + ti) * d.n + kv0 * g) * h;  // query heads of kv head c: [c*g, (c+1)*g)
    int64_t ns = 0;
    for (int64_t s = 0; s < s_len; ++s) {
      if (mk[s]) slots[ns++] = static_cast<int32_t>(s);
    }
    T* o = out + qoff;
    if (ns == 0) {
      for (int64_t i = 0; i < m * h; ++i) from_f32(0.0f, o + i);
      continue;
    }
    for (int64_t i = 0; i < m * h; ++i) qf[i] = to_f32(q[qoff + i]) * scale;

    // scores[i, j] = q[i] . k[slot j, kv head of i]
    for (int64_t j = 0; j < ns; ++j) {
      const T* kr = kb + slots[j] * slot_stride;
      for (int64_t i = 0; i < m; ++i) {
        const float* qr = qf + i * h;
        const T* kh_row = kr + (i / g) * h;
        float dot = 0.0f;
        for (int64_t e = 0; e < h; ++e) dot += qr[e] * to_f32(kh_row[e]);
        scores[i * ns + j] = dot;
      }
    }
    // softmax per query head (float32)
    for (int64_t i = 0; i < m; ++i) {
      float* sc = scores + i * ns;
      float mx = sc[0];
      for (int64_t j = 1; j < ns; ++j) mx = std::max(mx, sc[j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < ns; ++j) {
        sc[j] = exp_nonpositive(sc[j] - mx);
        sum += sc[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < ns; ++j) sc[j] *= inv;
    }
    // acc[i] = sum_j p[i, j] v[slot j, kv head of i]
    std::fill(acc, acc + m * h, 0.0f);
    for (int64_t j = 0; j < ns; ++j) {
      const T* vr = vb + slots[j] * slot_stride;
      for (int64_t i = 0; i < m; ++i) {
        const float p = scores[i * ns + j];
        const T* vh_row = vr + (i / g) * h;
        float* a = acc + i * h;
        for (int64_t e = 0; e < h; ++e) a[e] += p * to_f32(vh_row[e]);
      }
    }
    for (int64_t i = 0; i < m * h; ++i) from_f32(acc[i], o + i);
  }
}

// Work shared between the calling thread and the pool's tasks. Tasks hold it by shared_ptr: one that
// starts after the call has returned finds no pair left and touches nothing else.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
};

// Work item i: row i / chunks, kv heads of chunk i % chunks (chunks = 1: the whole row).
template <typename T>
void RunItems(const std::shared_ptr<Shared>& sh, const T* q, const T* k, const T* v, const bool* mask, T* out,
              const Dims& d, int64_t layer, float scale, int64_t chunks) {
  thread_local std::vector<float> work;
  int64_t mine = 0;
  const int64_t per = d.kh / chunks;
  for (int64_t i = sh->next.fetch_add(1); i < sh->total; i = sh->next.fetch_add(1)) {
    const int64_t c = i % chunks;
    AttendBlock<T>(q, k, v, mask, out, d, layer, i / chunks, c * per, (c + 1) * per, scale, work);
    ++mine;
  }
  if (mine && sh->done.fetch_add(mine) + mine == sh->total) {
    std::lock_guard<std::mutex> lock(sh->mu);
    sh->cv.notify_all();
  }
}

template <ffi::DataType DT, typename T>
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<DT> q, ffi::Buffer<DT> k, ffi::Buffer<DT> v,
                ffi::BufferR0<ffi::S32> layer_buf, ffi::Buffer<ffi::PRED> mask, float scale,
                ffi::Result<ffi::Buffer<DT>> out) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  auto md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || md.size() != 3 || v.dimensions().size() != 5) {
    return ffi::Error::InvalidArgument("decode attention: expected q [b,t,n,h], k/v [L,b,s,kh,h], mask [b,t,s]");
  }
  Dims d{qd[0], qd[1], qd[2], qd[3], kd[0], kd[2], kd[3]};
  if (kd[1] != d.b || kd[4] != d.h || d.n % d.kh != 0 || md[0] != d.b || md[1] != d.t || md[2] != d.s) {
    return ffi::Error::InvalidArgument("decode attention: shapes of q, k/v and mask do not agree");
  }
  for (int i = 0; i < 5; ++i) {
    if (v.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("decode attention: k and v differ in shape");
  }
  const int64_t layer = layer_buf.typed_data()[0];
  if (layer < 0 || layer >= d.layers) return ffi::Error::InvalidArgument("decode attention: layer out of range");

  const T* qp = reinterpret_cast<const T*>(q.typed_data());
  const T* kp = reinterpret_cast<const T*>(k.typed_data());
  const T* vp = reinterpret_cast<const T*>(v.typed_data());
  const bool* mp = mask.typed_data();
  T* op = reinterpret_cast<T*>(out->typed_data());

  // Whole rows (contiguous reads) when there are enough of them for the threads, else (row, kv head) items.
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunks = d.b >= 2 * threads ? 1 : d.kh;
  auto sh = std::make_shared<Shared>();
  sh->total = d.b * chunks;
  const int64_t helpers = std::min<int64_t>(threads - 1, sh->total - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([sh, qp, kp, vp, mp, op, d, layer, scale, chunks]() {
      RunItems<T>(sh, qp, kp, vp, mp, op, d, layer, scale, chunks);
    });
  }
  RunItems<T>(sh, qp, kp, vp, mp, op, d, layer, scale, chunks);
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load() == sh->total; });
  return ffi::Error::Success();
}

}  // namespace

#define IOPO_BIND(DT)                   \
  ffi::Ffi::Bind()                      \
      .Ctx<ffi::ThreadPool>()           \
      .Arg<ffi::Buffer<DT>>()           \
      .Arg<ffi::Buffer<DT>>()           \
      .Arg<ffi::Buffer<DT>>()           \
      .Arg<ffi::BufferR0<ffi::S32>>()   \
      .Arg<ffi::Buffer<ffi::PRED>>()    \
      .Attr<float>("scale")             \
      .Ret<ffi::Buffer<DT>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(IopoDecodeAttentionF32, (Impl<ffi::F32, float>), IOPO_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(IopoDecodeAttentionBF16, (Impl<ffi::BF16, uint16_t>), IOPO_BIND(ffi::BF16));
