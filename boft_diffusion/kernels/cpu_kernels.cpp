// CPU kernels of the per-step parameter pipeline: Cayley blocks and the rotation chunks built from them,
// and (fp32, b = 8, AVX2) rows times the butterfly factors with its backward (kernels.rotate on CPU).
//
// The same arithmetic as butterfly.Cayley and chunks.BuildChunks (the PyTorch reference, which
// tests hold these to), as plain loops: Cayley 16 blocks at a time (each elimination step one vector
// op across them), and the chunk build one top chunk at a time, so that the products below the top
// and their gradients stay in a per-thread scratch in cache instead of passing through memory
// between a dozen small torch ops. Sizes that matter for vectorising (b, the width of the chunks
// below) are template parameters for the common powers of two; 0 means "read at run time". With AVX2
// and FMA (a -march=native build on x86), fp32 with b = 8, the case SD training runs, has hand-vectorised
// versions of the Cayley solve and of the build's backward (about 2x faster); everything else, fp64
// included (which gradcheck uses), runs the portable loops.
// Plain C ABI on raw pointers (contiguous tensors), loaded with ctypes (kernels/cpu.py): no torch headers.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// Runs body(lo, hi) over [0, n) on up to `threads` threads; one thread for small work.
template <class F>
void parallel(int64_t n, int threads, int64_t numbers, F body) {
  if (threads <= 1 || n < 2 || numbers < (1 << 16)) {
    body(0, n);
    return;
  }
  const int t = static_cast<int>(std::min<int64_t>(threads, n));
  std::vector<std::thread> pool;
  for (int i = 1; i < t; ++i) pool.emplace_back(body, n * i / t, n * (i + 1) / t);
  body(0, n / t);
  for (auto& th : pool) th.join();
}

// Per-thread scratch: a local array when its size is known at compile time (so the compiler sees it
// aliases nothing), else heap memory.
template <class T, int N>
struct Scratch {
  T local[N > 0 ? N : 1];
  std::vector<T> heap;
  explicit Scratch(int n) : heap(N > 0 ? 0 : n) {}
  T* data() { return N > 0 ? local : heap.data(); }
};

constexpr int LANES = 16;  // Cayley blocks per pass: each elimination step is one vector op across them

// Q = 2 (I + S)^-1 - I for packed skew blocks (n, b(b-1)/2), upper triangle row by row.
// Gauss-Jordan without pivoting: I + S has symmetric part I, so every pivot is >= 1.
template <class T, int BC>
void cayley_forward(const T* __restrict__ packed, T* __restrict__ out, int64_t n, int b_rt, int threads) {
  const int B = BC ? BC : b_rt, np = B * (B - 1) / 2;
  parallel((n + LANES - 1) / LANES, threads, n * B * B, [=](int64_t lo, int64_t hi) {
    Scratch<T, BC * BC * LANES> buf(B * B * LANES);
    T* __restrict__ a = buf.data();  // a[(i * B + j) * LANES + w]
    auto at = [=](int i, int j) { return a + (i * B + j) * LANES; };
    for (int64_t grp = lo; grp < hi; ++grp) {
      const int64_t k0 = grp * LANES;
      const int cnt = static_cast<int>(std::min<int64_t>(LANES, n - k0));
      for (int i = 0; i < B; ++i)
        for (int j = 0; j < B; ++j)
          for (int w = 0; w < LANES; ++w) at(i, j)[w] = (i == j);  // lanes past n: identity
      for (int w = 0; w < cnt; ++w) {
        const T* p = packed + (k0 + w) * np;
        for (int r = 0, e = 0; r < B; ++r)
          for (int c = r + 1; c < B; ++c, ++e) {
            at(r, c)[w] = p[e];
            at(c, r)[w] = -p[e];
          }
      }
      for (int k = 0; k < B; ++k) {
        T pivot[LANES];
        for (int w = 0; w < LANES; ++w) {
          pivot[w] = T(1) / at(k, k)[w];
          at(k, k)[w] = 1;
        }
        for (int j = 0; j < B; ++j)
          for (int w = 0; w < LANES; ++w) at(k, j)[w] *= pivot[w];
        for (int i = 0; i < B; ++i) {
          if (i == k) continue;
          T f[LANES];
          for (int w = 0; w < LANES; ++w) {
            f[w] = at(i, k)[w];
            at(i, k)[w] = 0;
          }
          for (int j = 0; j < B; ++j)
            for (int w = 0; w < LANES; ++w) at(i, j)[w] -= f[w] * at(k, j)[w];
        }
      }
      for (int w = 0; w < cnt; ++w) {
        T* o = out + (k0 + w) * B * B;
        for (int i = 0; i < B; ++i)
          for (int j = 0; j < B; ++j) o[i * B + j] = 2 * at(i, j)[w] - (i == j);
      }
    }
  });
}

// dL/dpacked from Q and G = dL/dQ: with K = Q + I = 2 (I + S)^-1, dL/dS = -K^T G K^T / 2.
template <class T, int BC>
void cayley_backward(const T* __restrict__ q, const T* __restrict__ grad, T* __restrict__ grad_packed, int64_t n, int b_rt, int threads) {
  const int B = BC ? BC : b_rt, np = B * (B - 1) / 2, BB = B * B;
  parallel((n + LANES - 1) / LANES, threads, n * BB, [=](int64_t lo, int64_t hi) {
    Scratch<T, BC * BC * LANES> kq_buf(BB * LANES), g_buf(BB * LANES), m_buf(BB * LANES), gs_buf(BB * LANES);
    T *__restrict__ kq = kq_buf.data(), *__restrict__ g = g_buf.data(), *__restrict__ m = m_buf.data(),
                   *__restrict__ gs = gs_buf.data();
    for (int64_t grp = lo; grp < hi; ++grp) {
      const int64_t k0 = grp * LANES;
      const int cnt = static_cast<int>(std::min<int64_t>(LANES, n - k0));
      std::fill(kq, kq + BB * LANES, T(0));
      std::fill(g, g + BB * LANES, T(0));
      std::fill(m, m + BB * LANES, T(0));
      std::fill(gs, gs + BB * LANES, T(0));
      for (int w = 0; w < cnt; ++w)
        for (int i = 0; i < BB; ++i) {
          kq[i * LANES + w] = q[(k0 + w) * BB + i];
          g[i * LANES + w] = grad[(k0 + w) * BB + i];
        }
      for (int i = 0; i < B; ++i)
        for (int w = 0; w < LANES; ++w) kq[i * (B + 1) * LANES + w] += 1;
      for (int r = 0; r < B; ++r)  // M = K^T G
        for (int i = 0; i < B; ++i)
          for (int j = 0; j < B; ++j)
            for (int w = 0; w < LANES; ++w) m[(i * B + j) * LANES + w] += kq[(r * B + i) * LANES + w] * g[(r * B + j) * LANES + w];
      for (int r = 0; r < B; ++r)  // Gs = M K^T
        for (int i = 0; i < B; ++i)
          for (int j = 0; j < B; ++j)
            for (int w = 0; w < LANES; ++w) gs[(i * B + j) * LANES + w] += m[(i * B + r) * LANES + w] * kq[(j * B + r) * LANES + w];
      for (int w = 0; w < cnt; ++w) {
        T* gp = grad_packed + (k0 + w) * np;
        for (int r = 0, e = 0; r < B; ++r)
          for (int c = r + 1; c < B; ++c, ++e) gp[e] = T(-0.5) * (gs[(r * B + c) * LANES + w] - gs[(c * B + r) * LANES + w]);
      }
    }
  });
}

#if defined(__AVX2__) && defined(__FMA__)
// fp32, b = 8, AVX2: one block at a time with its eight rows in eight registers, so that nothing is
// transposed into lanes and back (half of the lanes version's time went to those scalar copies).
inline __m256 lane(__m256 row, int k) { return _mm256_permutevar8x32_ps(row, _mm256_set1_epi32(k)); }

inline __m256 unit(int k) {  // e_k
  return _mm256_castsi256_ps(_mm256_and_si256(
      _mm256_cmpeq_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(k)), _mm256_castps_si256(_mm256_set1_ps(1.0f))));
}

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

void cayley_forward_b8(const float* __restrict__ packed, float* __restrict__ out, int64_t n, int threads) {
  constexpr int NB = 2;  // blocks in flight: the elimination is a chain of dependent steps, so interleave
  parallel((n + NB - 1) / NB, threads, n * 64, [=](int64_t lo, int64_t hi) {
    alignas(32) float a[NB][64];
    for (int64_t grp = lo; grp < hi; ++grp) {
      const int64_t b0 = grp * NB;
      const int cnt = static_cast<int>(std::min<int64_t>(NB, n - b0));
      for (int w = 0; w < NB; ++w) {
        for (int i = 0; i < 64; ++i) a[w][i] = (i % 9 == 0);
        if (w >= cnt) continue;  // past n: identity
        const float* p = packed + (b0 + w) * 28;
        for (int r = 0, e = 0; r < 8; ++r)
          for (int c = r + 1; c < 8; ++c, ++e) {
            a[w][r * 8 + c] = p[e];
            a[w][c * 8 + r] = -p[e];
          }
      }
      __m256 row[NB][8];
      for (int w = 0; w < NB; ++w)
        for (int i = 0; i < 8; ++i) row[w][i] = _mm256_load_ps(a[w] + 8 * i);
      const __m256 one = _mm256_set1_ps(1.0f);
      for (int k = 0; k < 8; ++k) {  // Gauss-Jordan in place, as cayley_forward
        const __m256 ek = unit(k), keep = _mm256_sub_ps(one, ek);  // 1 except at k
        for (int w = 0; w < NB; ++w) {
          const __m256 inv = _mm256_div_ps(one, lane(row[w][k], k));
          row[w][k] = _mm256_mul_ps(_mm256_fmadd_ps(row[w][k], keep, ek), inv);  // a[k][k] = 1, then the row / pivot
        }
        for (int i = 0; i < 8; ++i) {
          if (i == k) continue;
          for (int w = 0; w < NB; ++w)
            row[w][i] = _mm256_fnmadd_ps(lane(row[w][i], k), row[w][k], _mm256_mul_ps(row[w][i], keep));
        }
      }
      for (int w = 0; w < cnt; ++w) {
        float* o = out + (b0 + w) * 64;
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_sub_ps(_mm256_add_ps(row[w][i], row[w][i]), unit(i)));
      }
    }
  });
}

void cayley_backward_b8(const float* __restrict__ q, const float* __restrict__ grad, float* __restrict__ grad_packed,
                        int64_t n, int threads) {
  parallel(n, threads, n * 64, [=](int64_t lo, int64_t hi) {
    alignas(32) float mm[64], d[64];
    for (int64_t blk = lo; blk < hi; ++blk) {
      const float* qb = q + blk * 64;
      const float* gb = grad + blk * 64;
      __m256 m[8], qt[8], gs[8];
      for (int i = 0; i < 8; ++i) m[i] = _mm256_loadu_ps(gb + 8 * i);  // M = K^T G = Q^T G + G
      for (int r = 0; r < 8; ++r) {
        const __m256 gr = _mm256_loadu_ps(gb + 8 * r);
        for (int i = 0; i < 8; ++i) m[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(qb + 8 * r + i), gr, m[i]);
      }
      for (int i = 0; i < 8; ++i) {
        _mm256_store_ps(mm + 8 * i, m[i]);
        qt[i] = _mm256_loadu_ps(qb + 8 * i);
      }
      transpose8(qt);
      for (int i = 0; i < 8; ++i) {  // Gs = M K^T = M Q^T + M
        gs[i] = m[i];
        for (int r = 0; r < 8; ++r) gs[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(mm + 8 * i + r), qt[r], gs[i]);
      }
      __m256 gst[8];
      for (int i = 0; i < 8; ++i) gst[i] = gs[i];
      transpose8(gst);
      const __m256 halfv = _mm256_set1_ps(0.5f);
      for (int i = 0; i < 8; ++i) _mm256_store_ps(d + 8 * i, _mm256_mul_ps(_mm256_sub_ps(gst[i], gs[i]), halfv));
      float* gp = grad_packed + blk * 28;  // -(Gs[r][c] - Gs[c][r]) / 2 = d[r][c]
      for (int r = 0, e = 0; r < 8; ++r)
        for (int c = r + 1; c < 8; ++c, ++e) gp[e] = d[r * 8 + c];
    }
  });
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// Rows times butterfly factors (kernels.rotate / rotate_backward on CPU), fp32, b = 8: every factor acts
// within a top chunk of c = 8 * 2^(top factor) features, so a tile of rows x c sits in a scratch in cache
// while all factors pass over it in place. A block of factor f takes the half-blocks (4 features) at
// off0 and off1 (2^f half-blocks apart inside its chunk) and writes its 8 outputs back there.
// 8 multiply-adds a feature a factor (m * b), against c for one dense chunk matmul.
constexpr int ROWS_TILE = 32;
// Below this many numbers a call stays on the calling thread: one call lasts a few hundred microseconds
// at most, less than starting a thread costs when torch's OpenMP workers still spin on the other cores.
constexpr int64_t ROWS_PARALLEL_NUMBERS = int64_t(1) << 22;

inline void block_offsets(int lb, int f, int& off0, int& off1) {
  const int pairs = 1 << f, ch = lb >> f, p = lb & (pairs - 1);
  off0 = f == 0 ? ch * 8 : ch * (8 << f) + p * 4;
  off1 = f == 0 ? ch * 8 + 4 : ch * (8 << f) + pairs * 4 + p * 4;
}

inline __m256 load_halves(const float* row, int off0, int off1) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(row + off0)), _mm_loadu_ps(row + off1), 1);
}

inline void store_halves(float* row, int off0, int off1, __m256 v) {
  _mm_storeu_ps(row + off0, _mm256_castps256_ps128(v));
  _mm_storeu_ps(row + off1, _mm256_extractf128_ps(v, 1));
}

void rows_factor_b8(float* __restrict__ tile, int rows, int c, const float* __restrict__ fb, int f, bool transpose) {
  for (int lb = 0; lb < c / 8; ++lb) {
    int off0, off1;
    block_offsets(lb, f, off0, off1);
    __m256 q[8];
    for (int r = 0; r < 8; ++r) q[r] = _mm256_loadu_ps(fb + lb * 64 + 8 * r);
    if (transpose) transpose8(q);
    int t = 0;
    for (; t + 2 <= rows; t += 2) {
      float* r0 = tile + t * c; float* r1 = r0 + c;
      __m256 a0 = _mm256_mul_ps(_mm256_broadcast_ss(r0 + off0), q[0]), b0 = _mm256_mul_ps(_mm256_broadcast_ss(r0 + off1), q[4]);
      __m256 a1 = _mm256_mul_ps(_mm256_broadcast_ss(r1 + off0), q[0]), b1 = _mm256_mul_ps(_mm256_broadcast_ss(r1 + off1), q[4]);
      for (int r = 1; r < 4; ++r) {
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(r0 + off0 + r), q[r], a0);
        b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(r0 + off1 + r), q[4 + r], b0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(r1 + off0 + r), q[r], a1);
        b1 = _mm256_fmadd_ps(_mm256_broadcast_ss(r1 + off1 + r), q[4 + r], b1);
      }
      store_halves(r0, off0, off1, _mm256_add_ps(a0, b0));
      store_halves(r1, off0, off1, _mm256_add_ps(a1, b1));
    }
    if (t < rows) {
      float* r0 = tile + t * c;
      __m256 a0 = _mm256_mul_ps(_mm256_broadcast_ss(r0 + off0), q[0]), b0 = _mm256_mul_ps(_mm256_broadcast_ss(r0 + off1), q[4]);
      for (int r = 1; r < 4; ++r) {
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(r0 + off0 + r), q[r], a0);
        b0 = _mm256_fmadd_ps(_mm256_broadcast_ss(r0 + off1 + r), q[4 + r], b0);
      }
      store_halves(r0, off0, off1, _mm256_add_ps(a0, b0));
    }
  }
}

// grad_fb (+)= a^T g per block of factor f (its transpose when the rows were multiplied by Q^T), summed over
// the tile: stored by the first tile of rows, added by the others.
void rows_factor_grad_b8(const float* __restrict__ a, const float* __restrict__ g, int rows, int c,
                         float* __restrict__ grad_fb, int f, bool transpose, bool add) {
  for (int lb = 0; lb < c / 8; ++lb) {
    int off0, off1;
    block_offsets(lb, f, off0, off1);
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
    for (int t = 0; t < rows; ++t) {
      const float* ar = a + t * c;
      const __m256 gv = load_halves(g + t * c, off0, off1);
      for (int r = 0; r < 4; ++r) {
        acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(ar + off0 + r), gv, acc[r]);
        acc[4 + r] = _mm256_fmadd_ps(_mm256_broadcast_ss(ar + off1 + r), gv, acc[4 + r]);
      }
    }
    if (transpose) transpose8(acc);
    float* out = grad_fb + lb * 64;
    for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + 8 * r, add ? _mm256_add_ps(_mm256_loadu_ps(out + 8 * r), acc[r]) : acc[r]);
  }
}

struct Rows {
  int64_t rows, d, per_factor;  // x is (rows, d); blocks of factor i start at blocks + i * per_factor
  const int* order;             // factors in application order
  int n, c;                     // len(order), top chunk width
  bool transpose;
  const float* factor(const float* blocks, int j, int64_t chunk) const { return blocks + order[j] * per_factor + chunk * c * 8; }
};

void rows_load(float* tile, const float* src, const Rows& p, int64_t chunk, int64_t t0, int rows) {
  for (int t = 0; t < rows; ++t) std::memcpy(tile + t * p.c, src + (t0 + t) * p.d + chunk * p.c, p.c * sizeof(float));
}

void rows_store(float* dst, const float* tile, const Rows& p, int64_t chunk, int64_t t0, int rows) {
  for (int t = 0; t < rows; ++t) std::memcpy(dst + (t0 + t) * p.d + chunk * p.c, tile + t * p.c, p.c * sizeof(float));
}

void rows_forward_b8(const float* x, const float* blocks, const Rows p, float* y, int threads) {
  if (p.rows * p.d < ROWS_PARALLEL_NUMBERS) threads = 1;
  parallel(p.d / p.c, threads, p.rows * p.d, [&](int64_t lo, int64_t hi) {
    std::vector<float> tile(ROWS_TILE * p.c);
    for (int64_t chunk = lo; chunk < hi; ++chunk)
      for (int64_t t0 = 0; t0 < p.rows; t0 += ROWS_TILE) {
        const int rows = static_cast<int>(std::min<int64_t>(ROWS_TILE, p.rows - t0));
        rows_load(tile.data(), x, p, chunk, t0, rows);
        for (int j = 0; j < p.n; ++j) rows_factor_b8(tile.data(), rows, p.c, p.factor(blocks, j, chunk), p.order[j], p.transpose);
        rows_store(y, tile.data(), p, chunk, t0, rows);
      }
  });
}

// Per tile: each factor's input recomputed from x in scratch, then the gradient walks back through the
// factors (Q^T undoes Q), summing each block's a^T g on the way. grad_x and grad_blocks may be null; the
// blocks of factors in `order` are overwritten (rows > 0), the others left alone.
void rows_backward_b8(const float* x, const float* grad, const float* blocks, const Rows p, float* grad_x,
                      float* grad_blocks, int64_t grad_per_factor, int threads) {
  if (p.rows * p.d * 3 < ROWS_PARALLEL_NUMBERS) threads = 1;
  parallel(p.d / p.c, threads, p.rows * p.d * 3, [&](int64_t lo, int64_t hi) {
    const int size = ROWS_TILE * p.c;
    std::vector<float> inputs(static_cast<size_t>(size) * p.n), g(size);
    for (int64_t chunk = lo; chunk < hi; ++chunk)
      for (int64_t t0 = 0; t0 < p.rows; t0 += ROWS_TILE) {
        const int rows = static_cast<int>(std::min<int64_t>(ROWS_TILE, p.rows - t0));
        if (grad_blocks) {
          rows_load(inputs.data(), x, p, chunk, t0, rows);
          for (int j = 0; j + 1 < p.n; ++j) {
            float* next = inputs.data() + static_cast<size_t>(j + 1) * size;
            std::memcpy(next, next - size, static_cast<size_t>(rows) * p.c * sizeof(float));
            rows_factor_b8(next, rows, p.c, p.factor(blocks, j, chunk), p.order[j], p.transpose);
          }
        }
        rows_load(g.data(), grad, p, chunk, t0, rows);
        for (int j = p.n - 1; j >= 0; --j) {
          if (grad_blocks)
            rows_factor_grad_b8(inputs.data() + static_cast<size_t>(j) * size, g.data(), rows, p.c,
                                grad_blocks + p.order[j] * grad_per_factor + chunk * p.c * 8, p.order[j], p.transpose,
                                t0 > 0);
          if (j > 0 || grad_x) rows_factor_b8(g.data(), rows, p.c, p.factor(blocks, j, chunk), p.order[j], !p.transpose);
        }
        if (grad_x) rows_store(grad_x, g.data(), p, chunk, t0, rows);
      }
  });
}
#endif

// One level of the chunk build (chunks._level), for chunks [0, n) of the pointers given: out (n, c, c)
// = chunks of factor `factor` (blocks (n * 2^f, b, b), b = 2 * half) times the block-diagonal product
// below (chunks of width `small`).
// out[k][(q, p, r)][(s, g, j)] = sum_t Q_{k,p}[(q, r), (s, t)] below[(2k + s) groups + g][(p', t)][j]
// for p = g * (small / half) + p'; every other entry (other g) is zero.
template <class T, int SC, int HC>
void level_forward(const T* __restrict__ blocks, const T* __restrict__ below, T* __restrict__ out, int64_t n,
                   int half_rt, int factor, int small_rt) {
  const int half = HC ? HC : half_rt, small = SC ? SC : small_rt, b = 2 * half;
  const int c = b << factor, hc = c / 2, pairs = 1 << factor, groups = hc / small, per_group = small / half;
  Scratch<T, SC> buf(small);
  T* __restrict__ acc = buf.data();
  for (int64_t k = 0; k < n; ++k) {
    T* o = out + k * c * c;
    if (groups > 1) std::memset(o, 0, sizeof(T) * c * c);
    for (int p = 0; p < pairs; ++p) {
      const int g = p / per_group, pp = p % per_group;
      const T* qb = blocks + (k * pairs + p) * b * b;
      for (int s = 0; s < 2; ++s) {
        const T* rows = below + ((k * 2 + s) * groups + g) * small * small + pp * half * small;
        for (int q = 0; q < 2; ++q)
          for (int r = 0; r < half; ++r) {
            const T* w = qb + (q * half + r) * b + s * half;
            for (int j = 0; j < small; ++j) acc[j] = w[0] * rows[j];
            for (int t = 1; t < half; ++t)
              for (int j = 0; j < small; ++j) acc[j] += w[t] * rows[t * small + j];
            std::memcpy(o + (q * hc + p * half + r) * c + s * hc + g * small, acc, sizeof(T) * small);
          }
      }
    }
  }
}

// chunks._level_backward for chunks [0, n): dL/dblocks of the factor and dL/dbelow from dL/dout.
template <class T, int SC, int HC>
void level_backward(const T* __restrict__ blocks, const T* __restrict__ below, const T* __restrict__ grad,
                    T* __restrict__ grad_blocks, T* __restrict__ grad_below, int64_t n, int half_rt, int factor,
                    int small_rt) {
  const int half = HC ? HC : half_rt, small = SC ? SC : small_rt, b = 2 * half;
  const int c = b << factor, hc = c / 2, pairs = 1 << factor, groups = hc / small, per_group = small / half;
  Scratch<T, SC> buf(small);
  T* __restrict__ acc = buf.data();
  for (int64_t k = 0; k < n; ++k) {
    const T* go = grad + k * c * c;
    for (int p = 0; p < pairs; ++p) {
      const int g = p / per_group, pp = p % per_group;
      const T* qb = blocks + (k * pairs + p) * b * b;
      T* gq = grad_blocks + (k * pairs + p) * b * b;
      for (int s = 0; s < 2; ++s) {
        const int64_t at = ((k * 2 + s) * groups + g) * small * small + pp * half * small;
        for (int t = 0; t < half; ++t) {  // row t of dL/dbelow accumulates in registers across (q, r)
          const T* __restrict__ row = below + at + t * small;
          for (int j = 0; j < small; ++j) acc[j] = 0;
          for (int q = 0; q < 2; ++q)
            for (int r = 0; r < half; ++r) {
              const T* __restrict__ gr = go + (q * hc + p * half + r) * c + s * hc + g * small;
              const int e = (q * half + r) * b + s * half + t;
              T dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int j = 0; j < small; ++j) dot += gr[j] * row[j];
              gq[e] = dot;
              const T w = qb[e];
              for (int j = 0; j < small; ++j) acc[j] += w * gr[j];
            }
          std::memcpy(grad_below + at + t * small, acc, sizeof(T) * small);
        }
      }
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Four dot products' partial-sum vectors -> their four sums, in one 128-bit register.
inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// level_backward for fp32 and b = 8 (the common case), small a multiple of 8: each row of dL/dout is
// loaded once per (chunk, p, s) and used for both its four dot products with the rows below (the four
// dL/dblocks entries of that row, summed together: no horizontal sum per dot) and its share of
// dL/dbelow, whose four rows stay in registers across the block's eight rows.
template <int SC>
void level_backward_b8(const float* __restrict__ blocks, const float* __restrict__ below, const float* __restrict__ grad,
                       float* __restrict__ grad_blocks, float* __restrict__ grad_below, int64_t n, int factor,
                       int small_rt) {
  constexpr int half = 4, b = 8, MAXV = 8;
  const int small = SC ? SC : small_rt, nv = small / 8;
  const int c = b << factor, hc = c / 2, pairs = 1 << factor, groups = hc / small, per_group = small / half;
  for (int64_t k = 0; k < n; ++k) {
    const float* go = grad + k * c * c;
    for (int p = 0; p < pairs; ++p) {
      const int g = p / per_group, pp = p % per_group;
      const float* qb = blocks + (k * pairs + p) * b * b;
      float* gq = grad_blocks + (k * pairs + p) * b * b;
      for (int s = 0; s < 2; ++s) {
        const int64_t at = ((k * 2 + s) * groups + g) * small * small + pp * half * small;
        const float* rows = below + at;
        __m256 acc[half][MAXV];
        for (int t = 0; t < half; ++t)
          for (int v = 0; v < nv; ++v) acc[t][v] = _mm256_setzero_ps();
        for (int qr = 0; qr < 2 * half; ++qr) {
          const float* gr = go + ((qr / half) * hc + p * half + qr % half) * c + s * hc + g * small;
          const float* w = qb + qr * b + s * half;
          __m256 dot[half], wt[half];
          for (int t = 0; t < half; ++t) {
            dot[t] = _mm256_setzero_ps();
            wt[t] = _mm256_broadcast_ss(w + t);
          }
          for (int v = 0; v < nv; ++v) {
            const __m256 gv = _mm256_loadu_ps(gr + 8 * v);
            for (int t = 0; t < half; ++t) {
              dot[t] = _mm256_fmadd_ps(gv, _mm256_loadu_ps(rows + t * small + 8 * v), dot[t]);
              acc[t][v] = _mm256_fmadd_ps(wt[t], gv, acc[t][v]);
            }
          }
          _mm_storeu_ps(gq + qr * b + s * half, sum4(dot[0], dot[1], dot[2], dot[3]));
        }
        for (int t = 0; t < half; ++t)
          for (int v = 0; v < nv; ++v) _mm256_storeu_ps(grad_below + at + t * small + 8 * v, acc[t][v]);
      }
    }
  }
}
#endif

#define BOFT_LEVEL_CASES(CALL)                      \
  if (half == 4 && small == 8) return CALL(8, 4);   \
  if (half == 4 && small == 16) return CALL(16, 4); \
  if (half == 4 && small == 32) return CALL(32, 4); \
  if (half == 4 && small == 64) return CALL(64, 4); \
  if (half == 2 && small == 4) return CALL(4, 2);   \
  if (half == 2 && small == 8) return CALL(8, 2);   \
  if (half == 2 && small == 16) return CALL(16, 2); \
  if (half == 2 && small == 32) return CALL(32, 2); \
  if (half == 8 && small == 16) return CALL(16, 8); \
  if (half == 8 && small == 32) return CALL(32, 8); \
  if (half == 8 && small == 64) return CALL(64, 8); \
  return CALL(0, 0);

template <class T>
void level_forward_any(const T* bl, const T* be, T* o, int64_t n, int half, int f, int small) {
#define BOFT_CALL(S, H) level_forward<T, S, H>(bl, be, o, n, half, f, small)
  BOFT_LEVEL_CASES(BOFT_CALL)
#undef BOFT_CALL
}

template <class T>
void level_backward_any(const T* bl, const T* be, const T* g, T* gbl, T* gbe, int64_t n, int half, int f, int small) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    if (half == 4 && small <= 64 && small % 8 == 0) {
      switch (small) {
        case 8: return level_backward_b8<8>(bl, be, g, gbl, gbe, n, f, small);
        case 16: return level_backward_b8<16>(bl, be, g, gbl, gbe, n, f, small);
        case 32: return level_backward_b8<32>(bl, be, g, gbl, gbe, n, f, small);
        default: return level_backward_b8<0>(bl, be, g, gbl, gbe, n, f, small);
      }
    }
  }
#endif
#define BOFT_CALL(S, H) level_backward<T, S, H>(bl, be, g, gbl, gbe, n, half, f, small)
  BOFT_LEVEL_CASES(BOFT_CALL)
#undef BOFT_CALL
}

// chunks.BuildChunks with factors[0] == 0 and at least two factors: the chunks (n_top, C, C) of
// R = B_{f_last} ... B_{f_1} B_0, one top chunk at a time, so that every product below the top
// stays in a per-thread scratch in cache and never goes through memory. blocks: (m, D/b, b, b).
struct Plan {
  int64_t per_factor, per_top;  // numbers of one factor's blocks; numbers of one top chunk's blocks
  int b, nf, top;               // block size, active factors, C
  const int* factors;
  int width(int j) const { return b << factors[j]; }  // chunk width after level j
  int64_t chunks(int j) const { return top / width(j); }  // level-j chunks in one top chunk
};

template <class T>
void build_forward(const T* blocks, const Plan plan, int64_t n_top, T* out, int threads) {
  parallel(n_top, threads, n_top * plan.top * plan.top, [&](int64_t lo, int64_t hi) {
    std::vector<T> ping(plan.top * plan.top / 2), pong(plan.top * plan.top / 2);
    for (int64_t k = lo; k < hi; ++k) {
      const T* below = blocks + k * plan.per_top;  // factor 0's blocks: chunks of width b
      for (int j = 1; j < plan.nf; ++j) {
        T* dst = j == plan.nf - 1 ? out + k * plan.top * plan.top : (j % 2 ? ping : pong).data();
        level_forward_any<T>(blocks + plan.factors[j] * plan.per_factor + k * plan.per_top, below, dst, plan.chunks(j),
                             plan.b / 2, plan.factors[j], plan.width(j - 1));
        below = dst;
      }
    }
  });
}

// dL/dblocks of the active factors (the rest untouched) from dL/dchunks: per top chunk, the products
// below the top are recomputed in scratch (cheap, in cache) and the gradient walks back down.
template <class T>
void build_backward(const T* blocks, const Plan plan, int64_t n_top, const T* grad, T* grad_blocks, int threads) {
  parallel(n_top, threads, n_top * plan.top * plan.top, [&](int64_t lo, int64_t hi) {
    std::vector<T> products(plan.top * plan.top), ping(plan.top * plan.top / 2), pong(plan.top * plan.top / 2);
    std::vector<const T*> below(plan.nf);
    for (int64_t k = lo; k < hi; ++k) {
      below[0] = blocks + k * plan.per_top;
      T* next = products.data();
      for (int j = 1; j < plan.nf - 1; ++j) {  // products of levels 1 .. nf-2
        level_forward_any<T>(blocks + plan.factors[j] * plan.per_factor + k * plan.per_top, below[j - 1], next,
                             plan.chunks(j), plan.b / 2, plan.factors[j], plan.width(j - 1));
        below[j] = next;
        next += plan.top * plan.width(j);
      }
      const T* g = grad + k * plan.top * plan.top;
      for (int j = plan.nf - 1; j >= 1; --j) {
        const int64_t at = plan.factors[j] * plan.per_factor + k * plan.per_top;
        T* grad_below = j == 1 ? grad_blocks + k * plan.per_top : (j % 2 ? ping : pong).data();
        level_backward_any<T>(blocks + at, below[j - 1], g, grad_blocks + at, grad_below, plan.chunks(j), plan.b / 2,
                              plan.factors[j], plan.width(j - 1));
        g = grad_below;
      }
    }
  });
}

// Sizes with a compiled specialisation; anything else runs the run-time-sized loops.
template <class T>
void cayley_forward_any(const T* p, T* o, int64_t n, int b, int th) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    if (b == 8) return cayley_forward_b8(p, o, n, th);
  }
#endif
  switch (b) {
    case 4: return cayley_forward<T, 4>(p, o, n, b, th);
    case 8: return cayley_forward<T, 8>(p, o, n, b, th);
    case 16: return cayley_forward<T, 16>(p, o, n, b, th);
    default: return cayley_forward<T, 0>(p, o, n, b, th);
  }
}

template <class T>
void cayley_backward_any(const T* q, const T* g, T* gp, int64_t n, int b, int th) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    if (b == 8) return cayley_backward_b8(q, g, gp, n, th);
  }
#endif
  switch (b) {
    case 4: return cayley_backward<T, 4>(q, g, gp, n, b, th);
    case 8: return cayley_backward<T, 8>(q, g, gp, n, b, th);
    case 16: return cayley_backward<T, 16>(q, g, gp, n, b, th);
    default: return cayley_backward<T, 0>(q, g, gp, n, b, th);
  }
}

}  // namespace

extern "C" {
#define BOFT_EXPORT(T, NAME)                                                                                        \
  void boft_cayley_forward_##NAME(const T* p, T* o, int64_t n, int b, int th) { cayley_forward_any<T>(p, o, n, b, th); } \
  void boft_cayley_backward_##NAME(const T* q, const T* g, T* gp, int64_t n, int b, int th) {                       \
    cayley_backward_any<T>(q, g, gp, n, b, th);                                                                     \
  }                                                                                                                 \
  void boft_build_forward_##NAME(const T* blocks, int64_t per_factor, const int* factors, int nf, int b,          \
                                 int64_t n_top, T* out, int th) {                                                   \
    const Plan plan{per_factor, (int64_t)(b << factors[nf - 1]) * b, b, nf, b << factors[nf - 1], factors};         \
    build_forward<T>(blocks, plan, n_top, out, th);                                                                 \
  }                                                                                                                 \
  void boft_build_backward_##NAME(const T* blocks, int64_t per_factor, const int* factors, int nf, int b,         \
                                  int64_t n_top, const T* grad, T* grad_blocks, int th) {                           \
    const Plan plan{per_factor, (int64_t)(b << factors[nf - 1]) * b, b, nf, b << factors[nf - 1], factors};         \
    build_backward<T>(blocks, plan, n_top, grad, grad_blocks, th);                                                  \
  }
BOFT_EXPORT(float, f32)
BOFT_EXPORT(double, f64)
// Rows times butterfly factors: 1 when done, 0 when this build has no kernel for it (b != 8, no AVX2/FMA).
int boft_rows_supported(int b) {
#if defined(__AVX2__) && defined(__FMA__)
  return b == 8;
#else
  (void)b;
  return 0;
#endif
}

int boft_rows_forward_f32(const float* x, int64_t rows, int64_t d, const float* blocks, int64_t per_factor,
                          const int* order, int n, int b, int transpose, float* y, int th) {
  if (!boft_rows_supported(b) || n < 1) return 0;
#if defined(__AVX2__) && defined(__FMA__)
  const int top = *std::max_element(order, order + n);
  rows_forward_b8(x, blocks, Rows{rows, d, per_factor, order, n, b << top, transpose != 0}, y, th);
#endif
  return 1;
}

int boft_rows_backward_f32(const float* x, const float* grad, int64_t rows, int64_t d, const float* blocks,
                           int64_t per_factor, const int* order, int n, int b, int transpose, float* grad_x,
                           float* grad_blocks, int64_t grad_per_factor, int th) {
  if (!boft_rows_supported(b) || n < 1) return 0;
#if defined(__AVX2__) && defined(__FMA__)
  const int top = *std::max_element(order, order + n);
  rows_backward_b8(x, grad, blocks, Rows{rows, d, per_factor, order, n, b << top, transpose != 0}, grad_x, grad_blocks,
                   grad_per_factor, th);
#endif
  return 1;
}
}
