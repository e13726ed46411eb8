"""Weight-only int8/int4 matmul kernels for AVX2 CPUs, compiled once on first use and loaded with ctypes.

Why our own: on AVX2-only CPUs torch's weight-only kernels take scalar fallback paths with float32 activations
(`_weight_int8pack_mm` is 1.6-2.6x *slower* than the float32 matmul at M = 1 and grows linearly with M, the int4
op is worse: benchmarks/linear_kernels.py, docs/performance.md), while batch-1 decoding is bound by reading the weights.
These kernels stream each quantised weight once per call and keep the activations in float32.

Layout: output channels in super-blocks of 32 (N zero-padded to a multiple of 32); a super-block's weights are
one contiguous stream, row k holding the 32 codes of input k:
  * int8 per output channel: [NS, K, 32] int8 + a float32 scale per output: y = scale[n] * sum_k x[k] q[n, k];
  * grouped (int4: codes 0..15, two k per byte, low nibble first -> [NS, K/2, 32] uint8; int8 groups: signed
    codes -> [NS, K, 32] int8) + a float16 scale and minimum per (group of `group` inputs, output):
    W = code * scale + minimum, computed as scale * sum_k x[k] code[k] + minimum * sum_k x[k] per group.
Each output is one AVX2 lane that accumulates over k = 0..K-1 in order with FMAs (per group for the grouped
formats). That order does not depend on M, on the row's place in the batch or on the tile shape, so a row's result
is bitwise the same in a width-1 decode step and in a width-(k+1) verification (tested): speculation is exactly
lossless on top. Tiles of up to 12 accumulators (NV blocks of 8 outputs x MT rows) sweep a super-block with the
rows innermost, so its weights come from DRAM once per call and from L1/L2 for the other rows.

The shared object is built with the system C++ compiler ($CXX, c++, g++ or clang++; ~20 s once) into
kernel_dir()/wq-<hash>.so. Without a compiler, on a CPU without AVX2/FMA/F16C, or with UNDERSTUDY_NATIVE_KERNELS=0,
`load()` returns None and the quantised layers use torch's own ops (same weights, slow on AVX2).
Threads: each call splits its outputs across a small pool of persistent workers (the pool in SOURCE), as many as
`get_threads` says: an Engine's own count inside its steps (threads_scope, from EngineConfig.num_threads), else the
process's (set_threads). Every output is computed by one thread in its fixed order, so results do not depend on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

// Unrolled early so that GCC keeps the accumulator arrays in registers (otherwise every accumulator is stored
// to the stack on every k, and the loop is bound by stores).
#define UNROLL _Pragma("GCC unroll 8")

namespace {

constexpr int SB = 32;  // outputs per super-block: its weights are one contiguous stream, 32 codes per k
// Software prefetch this far ahead in the weight stream (one 64-byte line per two 32-byte rows). Measured at M = 1
// on a 576x3072 int8 weight streamed from DRAM: 7.0 -> 10.3 GB/s (a plain sum reads 11.8 GB/s); presumably the
// hardware prefetcher ramps up too slowly on streams of a few hundred KB. Prefetching changes no arithmetic.
constexpr int64_t PREFETCH_BYTES = 2048;

inline float hsum8(__m256 v) {  // (v0+v4 + v2+v6) + (v1+v5 + v3+v7): a fixed order
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Scale, add the bias and store a tile (NV blocks of 8 outputs from n0, MT rows); the accumulators arrive spilled
// to memory after the k loop, so that the loop's registers never have their address taken.
template <int MT, int NV>
inline void store_tile(const float (&acc)[MT][NV][8], const float* scale, const float* bias, float* y,
                       int64_t ldy, int64_t n0, int64_t N) {
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + 8 * v;
    if (n >= N) break;  // padding outputs
    const __m256 s = scale ? _mm256_loadu_ps(scale + n) : _mm256_set1_ps(1.0f);
    for (int m = 0; m < MT; ++m) {
      __m256 r = _mm256_mul_ps(_mm256_load_ps(acc[m][v]), s);
      float* dst = y + m * ldy + n;
      if (n + 8 <= N) {
        if (bias) r = _mm256_add_ps(r, _mm256_loadu_ps(bias + n));
        _mm256_storeu_ps(dst, r);
      } else {  // the last, partial block of outputs
        float tmp[8];
        _mm256_storeu_ps(tmp, r);
        for (int64_t j = 0; n + j < N; ++j) dst[j] = bias ? tmp[j] + bias[n + j] : tmp[j];
      }
    }
  }
}

// int8 per output channel: w [NS, K, 32] int8, scale [NS*32] float32;
// y[m, n] = scale[n] * sum_k x[m, k] q[n, k] (+ bias[n]). The tile covers outputs n0 .. n0 + 8*NV of one super-block.
template <int MT, int NV>
void tile_i8(const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale, const float* bias,
             float* y, int64_t ldy, int64_t n0, int64_t N) {
  __m256 acc[MT][NV];
  UNROLL
  for (int m = 0; m < MT; ++m)
    UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  const int8_t* wb = w + (n0 / SB) * K * SB + (n0 % SB);
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 1) == 0) _mm_prefetch((const char*)(wb + k * SB) + PREFETCH_BYTES, _MM_HINT_T0);
    __m256 wv[NV];
    UNROLL
    for (int v = 0; v < NV; ++v)
      wv[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wb + k * SB + v * 8))));
    UNROLL
    for (int m = 0; m < MT; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      UNROLL
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  alignas(32) float out[MT][NV][8];
  UNROLL
  for (int m = 0; m < MT; ++m)
    UNROLL
    for (int v = 0; v < NV; ++v) _mm256_store_ps(out[m][v], acc[m][v]);
  store_tile<MT, NV>(out, scale, bias, y, ldy, n0, N);
}

// Grouped codes (BITS = 4: codes 0..15; BITS = 8: signed codes -127..127): w [NS, K*BITS/8, 32] -- with 4 bits,
// byte j of row k2 holds the codes of k = 2*k2 (low nibble) and k = 2*k2 + 1 (high nibble) -- and scale/minv
// [NS, K/group, 32] float16; W = code * scale + minv. The scale is factored out of each group:
//   sum_k x[k] W[k] = scale * sum_k x[k] code[k] + minv * xsum[g],  xsum[g] = sum of x over the group,
// so a weight costs a code-to-float conversion and one FMA per row (no dequantising FMA), and the group's two
// FMAs per output are shared by its `group` weights. xsum is computed once per call, in a fixed order.
template <int MT, int NV, int BITS>
void tile_grp(const float* x, int64_t ldx, const float* xsum, const uint8_t* w, int64_t K, const uint16_t* scale,
              const uint16_t* minv, int64_t group, const float* bias, float* y, int64_t ldy, int64_t n0, int64_t N) {
  constexpr int CPB = 8 / BITS;  // codes per byte
  __m256 acc[MT][NV];
  UNROLL
  for (int m = 0; m < MT; ++m)
    UNROLL
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  const int64_t sb = n0 / SB, j0 = n0 % SB, G = K / group, rows = K / CPB;
  const uint8_t* wb = w + sb * rows * SB + j0;
  const __m256i low4 = _mm256_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g) {
    __m256 part_acc[MT][NV];
    UNROLL
    for (int m = 0; m < MT; ++m)
      UNROLL
      for (int v = 0; v < NV; ++v) part_acc[m][v] = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += CPB) {
      if (((k / CPB) & 1) == 0) _mm_prefetch((const char*)(wb + (k / CPB) * SB) + PREFETCH_BYTES, _MM_HINT_T0);
      UNROLL
      for (int part = 0; part < CPB; ++part) {  // one k at a time (low nibble first)
        __m256 wv[NV];
        UNROLL
        for (int v = 0; v < NV; ++v) {
          const __m128i bytes = _mm_loadl_epi64((const __m128i*)(wb + (k / CPB) * SB + v * 8));
          __m256i q;
          if (BITS == 8) {
            q = _mm256_cvtepi8_epi32(bytes);
          } else {
            const __m256i raw = _mm256_cvtepu8_epi32(bytes);
            q = part ? _mm256_srli_epi32(raw, 4) : _mm256_and_si256(raw, low4);
          }
          wv[v] = _mm256_cvtepi32_ps(q);
        }
        UNROLL
        for (int m = 0; m < MT; ++m) {
          const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k + part);
          UNROLL
          for (int v = 0; v < NV; ++v) part_acc[m][v] = _mm256_fmadd_ps(xb, wv[v], part_acc[m][v]);
        }
      }
    }
    UNROLL
    for (int v = 0; v < NV; ++v) {
      const int64_t off = (sb * G + g) * SB + j0 + v * 8;
      const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(scale + off)));
      const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(minv + off)));
      UNROLL
      for (int m = 0; m < MT; ++m) {
        acc[m][v] = _mm256_fmadd_ps(part_acc[m][v], sc, acc[m][v]);
        acc[m][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(xsum + m * G + g), mn, acc[m][v]);
      }
    }
  }
  alignas(32) float out[MT][NV][8];
  UNROLL
  for (int m = 0; m < MT; ++m)
    UNROLL
    for (int v = 0; v < NV; ++v) _mm256_store_ps(out[m][v], acc[m][v]);
  store_tile<MT, NV>(out, nullptr, bias, y, ldy, n0, N);
}

// Tiles: up to 3 rows x a whole super-block (4 blocks of 8 outputs), or up to 6 rows x half a super-block
// (the other half follows at once, from L1/L2): <= 12 accumulators of the 16 AVX2 registers.
template <template <int, int> class F, int NV, typename... A>
void by_rows(int mt, A... a) {
  switch (mt) {
    case 1: F<1, NV>::go(a...); break;
    case 2: F<2, NV>::go(a...); break;
    case 3: F<3, NV>::go(a...); break;
    case 4: F<4, NV>::go(a...); break;
    case 5: F<5, NV>::go(a...); break;
    default: F<6, NV>::go(a...); break;
  }
}
// float32 weights as a torch Linear holds them, [N, K] row-major, read in place (no packed copy):
// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]). Each output sums in 8 lanes (lane j takes k = j, j+8, ... in order),
// then the lanes in a fixed order (hsum8), then the bias: an order that depends on neither M nor the tile, so a
// row's result is bitwise the same at width 1 and in a verification. A tile is MT rows x NO outputs (NO weight rows
// streamed side by side; the other row tiles of the same outputs read them again from L1/L2). Each weight row
// prefetches the same place of the next tile's row: one tile ahead (NO * K * 4 bytes) instead of PREFETCH_BYTES.
// Measured on SmolLM2-135M's 30 layers (float32, 120-token prefix, one thread, same run): width 5 44.2 -> 35.8 ms,
// width 1 32.0 -> 30.7 ms; a fixed 2 KB ahead was too short for a 5-row tile, 4 KB too far at K = 1536.
template <int MT, int NO>
void tile_f32(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* y, int64_t ldy,
              int64_t n0) {
  __m256 acc[MT][NO];
  UNROLL
  for (int m = 0; m < MT; ++m)
    UNROLL
    for (int o = 0; o < NO; ++o) acc[m][o] = _mm256_setzero_ps();
  const float* wb = w + n0 * K;
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[NO];
    UNROLL
    for (int o = 0; o < NO; ++o) {
      if ((k & 15) == 0) _mm_prefetch((const char*)(wb + (NO + o) * K + k), _MM_HINT_T0);  // the next tile
      wv[o] = _mm256_loadu_ps(wb + o * K + k);
    }
    UNROLL
    for (int m = 0; m < MT; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      UNROLL
      for (int o = 0; o < NO; ++o) acc[m][o] = _mm256_fmadd_ps(xv, wv[o], acc[m][o]);
    }
  }
  alignas(32) float out[MT][NO][8];
  UNROLL
  for (int m = 0; m < MT; ++m)
    UNROLL
    for (int o = 0; o < NO; ++o) _mm256_store_ps(out[m][o], acc[m][o]);
  for (int m = 0; m < MT; ++m)
    for (int o = 0; o < NO; ++o) {
      const float s = hsum8(_mm256_load_ps(out[m][o]));
      y[m * ldy + n0 + o] = bias ? s + bias[n0 + o] : s;
    }
}
template <int MT, int NO> struct F32 {
  template <typename... A> static void go(A... a) { tile_f32<MT, NO>(a...); }
};

template <int MT, int NV> struct I8 {
  template <typename... A> static void go(A... a) { tile_i8<MT, NV>(a...); }
};
template <int MT, int NV> struct G4 {
  template <typename... A> static void go(A... a) { tile_grp<MT, NV, 4>(a...); }
};
template <int MT, int NV> struct G8 {
  template <typename... A> static void go(A... a) { tile_grp<MT, NV, 8>(a...); }
};


// ---- threads: one matmul's outputs split across cores ----------------------------------------------------------
// Batch-1 decoding reads every weight once per step, and on the 2-vCPU AVX2 machines this project runs on, one core
// streams ~15 GB/s while two stream ~31 (measured on a 424 MB float32 weight: 27.6 -> 13.7 ms at M = 1, 34.0 ->
// 17.3 ms at M = 5). torch's intra-op threads are no help here (oneDNN at M = 1..8 is slower on two threads), so a
// linear's outputs are cut into chunks (4 per thread) that the calling thread and the pool's workers claim from a
// shared counter: a worker that is slow to wake or is preempted costs at most the chunk it holds, not half the
// call. Every output is still computed by one thread in its fixed k order, so results are bitwise the same at any
// thread count and whoever computes a chunk (tested).
// Workers are persistent: a call publishes its task by bumping a generation counter; a worker spins on it (the
// next matmul of a forward comes within microseconds) and sleeps on a condition variable after SPIN_SECONDS idle.
// One caller at a time: a concurrent caller (engines in several Python threads) finds the pool busy and runs its
// call on its own thread. A forked child makes its own pool (the parent's threads do not exist there).
constexpr double SPIN_SECONDS = 2e-3;
constexpr int CHUNKS_PER_THREAD = 4;
int64_t g_min_parallel = 1 << 16;  // calls reading fewer weights than this run on one thread (wq_set_min_parallel)

class Pool {
 public:
  explicit Pool(int workers) : workers_(workers), pid_(getpid()) {
    for (int i = 0; i < workers; ++i) std::thread([this] { loop(); }).detach();
  }
  int workers() const { return workers_; }
  pid_t pid() const { return pid_; }

  // fn(chunk) for chunk = 0 .. chunks-1, each exactly once, on the calling thread and the workers. Returns false,
  // having run nothing, if another caller holds the pool.
  template <class F>
  bool run(int chunks, F& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    const uint64_t g = gen_.load(std::memory_order_relaxed) + 1;
    task_ = &invoke<F>;
    arg_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    cursor_.store(g << 32 | (uint64_t)chunks, std::memory_order_release);  // generation | chunks left to claim
    gen_.store(g, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    work(g);
    while (done_.load(std::memory_order_acquire) < chunks) _mm_pause();
    return true;
  }

 private:
  template <class F>
  static void invoke(void* a, int chunk) { (*static_cast<F*>(a))(chunk); }

  // Claim chunks of task g until none is left. A claim succeeds only while task g still has unclaimed chunks, so
  // the caller cannot have finished it (nor published the next task): task_ and arg_ read after it are g's.
  void work(uint64_t g) {
    for (;;) {
      uint64_t v = cursor_.load(std::memory_order_acquire);
      do {
        if ((v >> 32) != g || (v & 0xffffffffu) == 0) return;
      } while (!cursor_.compare_exchange_weak(v, v - 1, std::memory_order_acq_rel, std::memory_order_acquire));
      task_(arg_, (int)((v & 0xffffffffu) - 1));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = 0;  // not a load: a task published before this thread started must still be seen as new
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(SPIN_SECONDS);
      for (int i = 1; gen_.load(std::memory_order_acquire) == seen; ++i) {
        _mm_pause();
        if ((i & 255) == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          while (gen_.load(std::memory_order_seq_cst) == seen) cv_.wait(lk);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      work(seen);
    }
  }

  const int workers_;
  const pid_t pid_;
  std::mutex busy_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0}, cursor_{0};
  std::atomic<int> done_{0}, sleepers_{0};
  void (*task_)(void*, int) = nullptr;
  void* arg_ = nullptr;
};

// The process's pool with at least `workers` workers (never freed: detached threads may still wait on it at exit).
Pool* pool_for(int workers) {
  static std::mutex mu;
  static Pool* pool = nullptr;
  std::lock_guard<std::mutex> lk(mu);
  if (pool == nullptr || pool->pid() != getpid() || pool->workers() < workers) pool = new Pool(workers);
  return pool;
}

// body(begin, end) over [0, n) in chunks whose bounds are multiples of `align` (the last takes the rest), on
// `threads` threads; on the calling thread alone for one thread, a call reading fewer than g_min_parallel weights
// (`work`), or a busy pool.
template <class B>
void split(int64_t threads, int64_t n, int64_t align, int64_t work, B body) {
  const int64_t units = (n + align - 1) / align;
  const int64_t want = threads * CHUNKS_PER_THREAD;
  const int chunks = (int)(want < units ? want : units);
  if (threads <= 1 || chunks <= 1 || work < g_min_parallel) {
    body((int64_t)0, n);
    return;
  }
  auto chunk = [&](int c) {
    const int64_t b = units * c / chunks * align, e = units * (c + 1) / chunks * align;
    body(b, e < n ? e : n);
  };
  if (!pool_for((int)threads - 1)->run(chunks, chunk)) body((int64_t)0, n);
}

}  // namespace

extern "C" {

int wq_version() { return 9; }

// Calls reading fewer weights than this run on one thread (default 65536: SmolLM2's smallest linear reads 331,776;
// a handoff costs microseconds). Tests set 0 to split their tiny models' calls too.
void wq_set_min_parallel(int64_t weights) { g_min_parallel = weights; }

// float32 [N, K] weights (K a multiple of 8): 1-3 rows x 4 outputs per tile, or up to 6 rows x 2 outputs (<= 12
// accumulators, so that every row of a verification shares one read of the weights); left-over outputs one at a time.
// Outputs n_begin .. n_end-1 (n_begin a multiple of 4) of y [M, N].
static void f32_linear_range(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, const float* bias,
                             float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const int no = M <= 3 ? 4 : 2, mt_max = M <= 3 ? 3 : 6;
  int64_t n = n_begin;
  for (; n + no <= n_end; n += no)
    for (int64_t m = 0; m < M; m += mt_max) {
      const int mt = (int)(M - m < mt_max ? M - m : mt_max);
      const float* xm = x + m * ldx;
      float* ym = y + m * N;
      if (no == 4) {
        switch (mt) {
          case 1: F32<1, 4>::go(xm, ldx, w, K, bias, ym, N, n); break;
          case 2: F32<2, 4>::go(xm, ldx, w, K, bias, ym, N, n); break;
          default: F32<3, 4>::go(xm, ldx, w, K, bias, ym, N, n); break;
        }
      } else {
        switch (mt) {
          case 1: F32<1, 2>::go(xm, ldx, w, K, bias, ym, N, n); break;
          case 2: F32<2, 2>::go(xm, ldx, w, K, bias, ym, N, n); break;
          case 3: F32<3, 2>::go(xm, ldx, w, K, bias, ym, N, n); break;
          case 4: F32<4, 2>::go(xm, ldx, w, K, bias, ym, N, n); break;
          case 5: F32<5, 2>::go(xm, ldx, w, K, bias, ym, N, n); break;
          default: F32<6, 2>::go(xm, ldx, w, K, bias, ym, N, n); break;
        }
      }
    }
  for (; n < n_end; ++n)
    for (int64_t m = 0; m < M; ++m) F32<1, 1>::go(x + m * ldx, ldx, w, K, bias, y + m * N, N, n);
}

void wq_f32_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const float* w, const float* bias, float* y,
                   int64_t N, int64_t threads) {
  split(threads, N, 4, N * K, [&](int64_t b, int64_t e) { f32_linear_range(x, M, K, ldx, w, bias, y, N, b, e); });
}

void wq_int8_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, const float* scale,
                    const float* bias, float* y, int64_t N, int64_t threads) {
  const int nv = M <= 3 ? 4 : 2, mt_max = M <= 3 ? 3 : 6;
  const int64_t NS = (N + SB - 1) / SB;
  split(threads, NS * SB, SB, N * K, [&](int64_t b, int64_t e) {  // whole super-blocks per thread
    for (int64_t n0 = b; n0 < e; n0 += 8 * nv)
      for (int64_t m = 0; m < M; m += mt_max) {
        const int mt = (int)(M - m < mt_max ? M - m : mt_max);
        if (nv == 4)
          by_rows<I8, 4>(mt, x + m * ldx, ldx, w, K, scale, bias, y + m * N, N, n0, N);
        else
          by_rows<I8, 2>(mt, x + m * ldx, ldx, w, K, scale, bias, y + m * N, N, n0, N);
      }
  });
}

void wq_grouped_linear(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, const uint16_t* scale,
                       const uint16_t* minv, int64_t group, int64_t bits, const float* bias, float* y, int64_t N,
                       int64_t threads) {
  // Tiles hold a group accumulator besides each output accumulator (<= 12 of the 16 registers in all):
  const int64_t G = K / group;
  std::vector<float> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[m * ldx + k];
      xsum[m * G + g] = s;
    }
  // 1 row x 4 blocks, or up to 3 rows x 2 blocks (measured: 6 rows x 1 block is slower from M = 4 on)
  const int nv = M == 1 ? 4 : 2, mt_max = M == 1 ? 1 : 3;
  const int64_t NS = (N + SB - 1) / SB;
  split(threads, NS * SB, SB, N * K, [&](int64_t b, int64_t e) {  // whole super-blocks per thread
    for (int64_t n0 = b; n0 < e; n0 += 8 * nv)
      for (int64_t m = 0; m < M; m += mt_max) {
        const int mt = (int)(M - m < mt_max ? M - m : mt_max);
        const float* xm = x + m * ldx;
        const float* xs = xsum.data() + m * G;
        float* ym = y + m * N;
        if (bits == 4) {
          if (nv == 4) by_rows<G4, 4>(mt, xm, ldx, xs, w, K, scale, minv, group, bias, ym, N, n0, N);
          else by_rows<G4, 2>(mt, xm, ldx, xs, w, K, scale, minv, group, bias, ym, N, n0, N);
        } else {
          if (nv == 4) by_rows<G8, 4>(mt, xm, ldx, xs, w, K, scale, minv, group, bias, ym, N, n0, N);
          else by_rows<G8, 2>(mt, xm, ldx, xs, w, K, scale, minv, group, bias, ym, N, n0, N);
        }
      }
  });
}

// ---- the whole decoder stack of a quantised model in one call (decode steps and verification) ----------------
// At batch 1 a quantised step is half outside the matmuls when run op by op from Python (~41 aten calls per
// layer: norms, RoPE, cache writes, SDPA, SiLU-gate, residuals, views); here each is a loop over the rows of one
// call. Every row is computed on its own, in a fixed order (norm sums, the attention's keys 0..pos, the matmuls'
// k order), so a row's result does not depend on M, T or its place in the batch: width-1 decoding and a
// width-(k+1) verification agree bit for bit, and so speculation stays exactly lossless on this path.

// exp on 8 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor series to r^7 (relative error < 2e-7 on the
// range), 2^n put into the exponent field. Inputs are clamped to [-87.3, 88.3] (e^x stays a normal float).
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: hi exact in float
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// y[m] = x[m] / rms(x[m]) * w, per row (n a multiple of 8)
static void rms_norm_rows(const float* x, int64_t M, int64_t n, const float* w, float eps, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * n;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float r = 1.0f / sqrtf(hsum8(acc) / (float)n + eps);
    const __m256 rv = _mm256_set1_ps(r);
    for (int64_t i = 0; i < n; i += 8)
      _mm256_storeu_ps(y + m * n + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), rv),
                                                    _mm256_loadu_ps(w + i)));
  }
}

// One linear as the table describes it (8 int64 fields): kind (0 int8 per channel, 1 grouped, 2 float32 [N, K]),
// bits, group, N, w, scale, minimum, bias.
static void qlinear(const int64_t* d, const float* x, int64_t M, int64_t K, float* y, int64_t threads) {
  const void* w = (const void*)d[4];
  if (d[0] == 2)
    wq_f32_linear(x, M, K, K, (const float*)w, (const float*)d[7], y, d[3], threads);
  else if (d[0] == 0)
    wq_int8_linear(x, M, K, K, (const int8_t*)w, (const float*)d[5], (const float*)d[7], y, d[3], threads);
  else
    wq_grouped_linear(x, M, K, K, (const uint8_t*)w, (const uint16_t*)d[5], (const uint16_t*)d[6], d[2], d[1],
                      (const float*)d[7], y, d[3], threads);
}

static constexpr int64_t LAYER_FIELDS = 2 + 4 * 8 + 2;  // norm1, norm2, qkv, o, w13, w2 (8 each), k cache, v cache

// x [M = B*T, H]: the residual stream, updated in place through every layer (the final norm is the caller's).
// Row m = b*T + t is token t of sequence b, at positions[m], in cache slot slot0 + b; its keys/values are written
// there and it attends to cache positions 0..positions[m] of its slot. Caches [S, Hkv, C, D] float32 per layer.
// Returns 0, or -1 if a position is outside the rotary table or the cache, -2 if D is not a multiple of 8.
int wq_decoder_forward(float* x, int64_t B, int64_t T, const int64_t* positions, int64_t L, int64_t H, int64_t Hq,
                       int64_t Hkv, int64_t D, int64_t I, float eps, const float* cos_t, const float* sin_t,
                       int64_t P, const int64_t* table, int64_t slot0, int64_t S, int64_t C, int64_t threads) {
  const int64_t M = B * T, G = Hq / Hkv, QKV = (Hq + 2 * Hkv) * D, half = D / 2;
  if (D % 16 != 0 || H % 8 != 0 || I % 8 != 0) return -2;
  for (int64_t m = 0; m < M; ++m)
    if (positions[m] < 0 || positions[m] >= P || positions[m] >= C) return -1;
  if (slot0 < 0 || slot0 + B > S) return -1;
  int64_t kv_len = 0;
  for (int64_t m = 0; m < M; ++m) kv_len = positions[m] + 1 > kv_len ? positions[m] + 1 : kv_len;
  std::vector<float> h(M * H), qkv(M * QKV), att(M * Hq * D), tmp(M * H), gu(M * 2 * I), act(M * I), sc(kv_len);
  const float scale = 1.0f / sqrtf((float)D);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* t = table + l * LAYER_FIELDS;
    const int64_t *lq = t + 2, *lo = t + 10, *l13 = t + 18, *l2 = t + 26;
    float* kc = (float*)t[34];
    float* vc = (float*)t[35];
    // attention block
    if (t[0])
      rms_norm_rows(x, M, H, (const float*)t[0], eps, h.data());
    else  // no input norm (an EAGLE drafter's layer: its input is already normed features)
      memcpy(h.data(), x, M * H * sizeof(float));
    qlinear(lq, h.data(), M, H, qkv.data(), threads);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t pos = positions[m], slot = slot0 + m / T;
      const float* cr = cos_t + pos * D;
      const float* sr = sin_t + pos * D;
      float* row = qkv.data() + m * QKV;
      for (int64_t hd = 0; hd < Hq + Hkv; ++hd) {  // rotate q and k heads: x*cos + roll(x, D/2)*sin
        float* v = row + hd * D;
        for (int64_t i = 0; i < half; i += 8) {
          const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + half + i);
          const __m256 ra = _mm256_fmadd_ps(b, _mm256_loadu_ps(sr + i), _mm256_mul_ps(a, _mm256_loadu_ps(cr + i)));
          const __m256 rb = _mm256_fmadd_ps(a, _mm256_loadu_ps(sr + half + i),
                                            _mm256_mul_ps(b, _mm256_loadu_ps(cr + half + i)));
          _mm256_storeu_ps(v + i, ra);
          _mm256_storeu_ps(v + half + i, rb);
        }
      }
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t off = ((slot * Hkv + g) * C + pos) * D;
        memcpy(kc + off, row + (Hq + g) * D, D * sizeof(float));
        memcpy(vc + off, row + (Hq + Hkv + g) * D, D * sizeof(float));
      }
    }
    for (int64_t m = 0; m < M; ++m) {  // after every row's keys/values are in: a row may attend to its own batch
      const int64_t pos = positions[m], slot = slot0 + m / T, n = pos + 1;
      for (int64_t hq = 0; hq < Hq; ++hq) {
        const float* q = qkv.data() + m * QKV + hq * D;
        const float* kb = kc + (slot * Hkv + hq / G) * C * D;
        const float* vb = vc + (slot * Hkv + hq / G) * C * D;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          __m256 acc = _mm256_setzero_ps();
          for (int64_t i = 0; i < D; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kb + j * D + i), acc);
          sc[j] = hsum8(acc) * scale;
          mx = sc[j] > mx ? sc[j] : mx;
        }
        __m256 sum8 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
          const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc.data() + j), _mm256_set1_ps(mx)));
          _mm256_storeu_ps(sc.data() + j, e);
          sum8 = _mm256_add_ps(sum8, e);
        }
        float sum = hsum8(sum8);
        if (j < n) {  // the tail, padded to 8 lanes with -inf (exp -> 0)
          alignas(32) float buf[8];
          for (int64_t i = 0; i < 8; ++i) buf[i] = j + i < n ? sc[j + i] - mx : -INFINITY;
          const __m256 e = exp8(_mm256_load_ps(buf));
          _mm256_store_ps(buf, e);
          for (int64_t i = 0; j + i < n; ++i) sc[j + i] = buf[i];
          float tail = 0.0f;
          for (int64_t i = 0; j + i < n; ++i) tail += buf[i];
          sum += tail;
        }
        const float inv = 1.0f / sum;
        float* o = att.data() + m * Hq * D + hq * D;
        for (int64_t i = 0; i < D; i += 16) {
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          for (int64_t jj = 0; jj < n; ++jj) {
            const __m256 p = _mm256_set1_ps(sc[jj]);
            a0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vb + jj * D + i), a0);
            a1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vb + jj * D + i + 8), a1);
          }
          _mm256_storeu_ps(o + i, _mm256_mul_ps(a0, _mm256_set1_ps(inv)));
          _mm256_storeu_ps(o + i + 8, _mm256_mul_ps(a1, _mm256_set1_ps(inv)));
        }
      }
    }
    qlinear(lo, att.data(), M, Hq * D, tmp.data(), threads);
    for (int64_t i = 0; i < M * H; i += 8)
      _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(tmp.data() + i)));
    // MLP block: w2(silu(gate) * up)
    rms_norm_rows(x, M, H, (const float*)t[1], eps, h.data());
    qlinear(l13, h.data(), M, H, gu.data(), threads);
    for (int64_t m = 0; m < M; ++m) {
      const float* gr = gu.data() + m * 2 * I;
      for (int64_t i = 0; i < I; i += 8) {
        const __m256 g = _mm256_loadu_ps(gr + i);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(act.data() + m * I + i, _mm256_mul_ps(s, _mm256_loadu_ps(gr + I + i)));
      }
    }
    qlinear(l2, act.data(), M, I, tmp.data(), threads);
    for (int64_t i = 0; i < M * H; i += 8)
      _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(tmp.data() + i)));
  }
  return 0;
}

}  // extern "C"
"""

FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared", "-fno-math-errno"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not = ""


def cpu_supported() -> bool:
    """AVX2 + FMA + F16C on x86-64 (read from /proc/cpuinfo; torch's capability string does not list FMA/F16C)."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    have = set(flags.split(":", 1)[-1].split())
    return {"avx2", "fma", "f16c"} <= have


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _build(cxx: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp) / "wq.cpp", Path(tmp) / "wq.so"
        src.write_text(SOURCE + f'\nextern "C" const char* wq_source_key() {{ return "{SOURCE_KEY}"; }}\n')
        proc = subprocess.run([cxx, *FLAGS, str(src), "-o", str(so)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr[-2000:]}")
        os.replace(so, out)  # atomic: concurrent builders never load a half-written file


SOURCE_KEY = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]  # what a prebuilt lib must match


def _prebuilt() -> ctypes.CDLL | None:
    """$UNDERSTUDY_KERNEL_LIB: a library built ahead of time (`python -m understudy.engine.qkernels OUT`, as the
    Docker image does, which ships no compiler). Used only if it was built from this very source."""
    path = os.environ.get("UNDERSTUDY_KERNEL_LIB")
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.wq_source_key.restype = ctypes.c_char_p
        if lib.wq_source_key().decode() != SOURCE_KEY:
            raise OSError(f"built from another version of the kernels (key {lib.wq_source_key().decode()}, "
                          f"this package needs {SOURCE_KEY}); rebuild it")
        return lib
    except (OSError, AttributeError) as e:
        log.warning("UNDERSTUDY_KERNEL_LIB=%s cannot be used (%s); building or falling back instead", path, e)
        return None


def load() -> ctypes.CDLL | None:
    """The compiled kernels: a prebuilt library ($UNDERSTUDY_KERNEL_LIB), else built once with the system compiler
    (cached by source + compiler); None where they cannot run."""
    global _lib, _tried, _why_not
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("UNDERSTUDY_NATIVE_KERNELS", "1") == "0":
            _why_not = "disabled by UNDERSTUDY_NATIVE_KERNELS=0"
            return None
        if not cpu_supported():
            _why_not = "this CPU lacks AVX2/FMA/F16C"
            return None
        lib = _prebuilt()
        if lib is None:
            cxx = _compiler()
            if cxx is None:
                _why_not = "no C++ compiler (install g++ or set CXX)"
                return None
            version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
            key = hashlib.sha256((SOURCE + " ".join(FLAGS) + str(version)).encode()).hexdigest()[:16]
            path = kernel_dir() / f"wq-{key}.so"
            try:
                if not path.exists():
                    log.info("building the int8/int4 CPU kernels with %s (once) into %s", cxx, path)
                    _build(cxx, path)
                lib = ctypes.CDLL(str(path))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                _why_not = f"could not build or load the kernels: {e}"
                log.warning("native int8/int4 kernels unavailable (%s); using torch's ops", _why_not)
                return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.wq_int8_linear.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64]
        lib.wq_int8_linear.restype = None
        lib.wq_grouped_linear.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, i64, i64]
        lib.wq_grouped_linear.restype = None
        lib.wq_f32_linear.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64]
        lib.wq_f32_linear.restype = None
        lib.wq_decoder_forward.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, ptr, ptr,
                                           i64, ptr, i64, i64, i64, i64]
        lib.wq_decoder_forward.restype = ctypes.c_int
        lib.wq_set_min_parallel.argtypes = [i64]
        lib.wq_set_min_parallel.restype = None
        _lib = lib
        return lib


_threads = 1  # the native kernels' thread count for this process (set_threads)
_scoped = threading.local()  # a calling thread's own count while an engine steps (threads_scope)


def set_threads(n: int) -> None:
    """Threads for the native kernel calls of this process from now on, like torch.set_num_threads; an engine's
    steps use its own count instead (threads_scope). Results do not depend on it: each output is computed by one
    thread in a fixed order."""
    global _threads
    if n < 1:
        raise ValueError(f"native kernel threads must be >= 1, got {n}")
    _threads = int(n)


def get_threads() -> int:
    """The count the calling thread's native calls use now."""
    return getattr(_scoped, "threads", None) or _threads


@contextlib.contextmanager
def threads_scope(n: int) -> Iterator[None]:
    """Native calls made by this Python thread inside the block use `n` threads: what an Engine wraps its step in,
    so that engines stepped by different threads (RL rollout workers, a server's engine thread) each keep their
    own count whatever another engine was given."""
    before = getattr(_scoped, "threads", None)
    _scoped.threads = n
    try:
        yield
    finally:
        _scoped.threads = before


def set_min_parallel(weights: int) -> None:
    """Calls reading fewer weights than this run on one thread whatever set_threads says (default 65,536); tests
    set 0 so that their tiny models' calls are split too."""
    lib = load()
    if lib is not None:
        lib.wq_set_min_parallel(weights)


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int,
               threads: int | None = None) -> torch.Tensor | None:
    """x [..., K] @ weight[N, K].T (+ bias) with `wq_f32_linear`, reading a torch Linear's float32 weight in place;
    None where the kernel does not take it (more than `max_rows` rows, not float32 on CPU, K not a multiple of 8,
    a non-contiguous weight, no kernels), and the caller runs its own matmul. Each row's result is bitwise the same
    at any number of rows (the fused decoder's order), so an LM head here gives a verification exactly the logits
    of a width-1 step, and the same on any number of `threads` (default: set_threads')."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if not (0 < rows <= max_rows) or K % 8 or x.dtype != torch.float32 or weight.dtype != torch.float32 or \
            not x.is_cpu or not weight.is_cpu or weight.dim() != 2 or weight.shape[1] != K or \
            not weight.is_contiguous() or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous())):
        return None
    lib = load()
    if lib is None:
        return None
    x2 = x.reshape(rows, K).contiguous()
    N = weight.shape[0]
    y = torch.empty(rows, N, dtype=torch.float32)
    lib.wq_f32_linear(x2.data_ptr(), rows, K, K, weight.data_ptr(), None if bias is None else bias.data_ptr(),
                      y.data_ptr(), N, threads or get_threads())
    return y.view(*x.shape[:-1], N)


def kernel_dir() -> Path:
    """$UNDERSTUDY_CACHE/kernels, else $XDG_CACHE_HOME/understudy/kernels, else ~/.cache/understudy/kernels (the
    rule of loader.cache_dir, which this module cannot import: the loader imports it)."""
    if env := os.environ.get("UNDERSTUDY_CACHE"):
        return Path(env) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "understudy" / "kernels"


def unavailable_reason() -> str:
    return _why_not


# ---- packing (pure torch) -----------------------------------------------------------------------------------
SUPER_BLOCK = 32  # output channels per contiguous weight stream (SB in the kernels)


def _rows_padded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, ...] -> [NS*32, ...] in `dtype`, zero rows appended."""
    n = -(-t.shape[0] // SUPER_BLOCK) * SUPER_BLOCK
    out = torch.zeros((n, *t.shape[1:]), dtype=dtype)
    out[:t.shape[0]] = t.to(dtype)
    return out


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """[NS*32, R] -> [NS, R, 32]: row r of super-block s holds column r of its 32 output channels."""
    n, r = t.shape
    return t.view(n // SUPER_BLOCK, SUPER_BLOCK, r).transpose(1, 2).contiguous()


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 -> [NS, K, 32]."""
    return _interleave(_rows_padded(q, torch.int8))


def pack_codes8(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] int8 -> [NS, K, 32] (the grouped 8-bit layout)."""
    return _interleave(_rows_padded(codes, torch.int8))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 -> [NS, K/2, 32] uint8: byte j of row k2 = code[32s+j, 2k2] | code[32s+j, 2k2+1] << 4."""
    c = _rows_padded(codes, torch.uint8)
    return _interleave(c[:, 0::2] | (c[:, 1::2] << 4))


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_int4 -> codes [n, K]."""
    rows = unpack(packed, n)  # [n, K/2] bytes
    return torch.stack([rows & 15, rows >> 4], dim=-1).reshape(n, -1)


def unpack(t: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of _interleave(_rows_padded(...)) -> [n, R]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def pack_groups(t: torch.Tensor) -> torch.Tensor:
    """Per-group values [N, G] -> [NS, G, 32] float16."""
    return _interleave(_rows_padded(t, torch.float16))


def pad_vector(v: torch.Tensor) -> torch.Tensor:
    """Per-output values [N] -> [NS*32] float32."""
    return _rows_padded(v, torch.float32)


if __name__ == "__main__":  # python -m understudy.engine.qkernels OUT.so: build ahead of time (Docker image)
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m understudy.engine.qkernels OUT.so")
    cxx = _compiler()
    if cxx is None:
        sys.exit("no C++ compiler: install g++ (or set CXX)")
    _build(cxx, Path(sys.argv[1]).absolute())
    print(f"built {sys.argv[1]} (kernel source key {SOURCE_KEY}); run with UNDERSTUDY_KERNEL_LIB={sys.argv[1]}")
