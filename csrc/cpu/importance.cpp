// CPU kernel of prefixkv::importance (semantics: prefixkv_vllm/ops/reference.py).
//
// Two deterministic passes, no atomics, never more than one key tile of logits
// per work item:
//   pass 1 (skipped when `lse` is given): per (seq, kv head, query tile), stream
//     over the causal key tiles with an online max/sum to get each scoring
//     query's row log-sum-exp, for all query heads of the group at once.
//   pass 2: per (seq, kv head, key tile), gather the tile once, then add
//     exp(scale * q.k - lse) over the group's query heads and every scoring
//     query that can see the tile; the tile owns its slice of `scores`.
// Only queries at positions >= min_query_pos are scored, so pass 1 computes
// the lse of those only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"

#if defined(__GNUC__) && !defined(__clang__)
// The v8f helpers have internal linkage, so the vector-ABI note GCC gives
// when a target lacks 256-bit registers (e.g. no -mavx) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace prefixkv {
namespace {

constexpr int kKeyTile = 64;    // keys per tile (columns of one logits block)
constexpr int kQueryTile = 32;  // queries per pass-1 work item
constexpr int kRowBlock = 4;    // query rows sharing one sweep over a key tile

// 8-lane float/int vectors (GCC/Clang vector extensions: portable C++ that
// lowers to AVX2 with -mavx2 and to pairs of 128-bit ops elsewhere). Used
// instead of plain loops because GCC will not vectorize the clamped exp below
// without -fno-trapping-math.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int kLanes = 8;
constexpr int kTileVecs = kKeyTile / kLanes;

inline v8f splat(float a) { return v8f{a, a, a, a, a, a, a, a}; }
inline v8f load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(v8f v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(v8f v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

// exp(x), relative error ~1e-7 (Cephes polynomial). Exactly 0 below ~-87.7
// (so -inf gives 0); inputs are clamped to [-88, 88].
inline v8f exp_v8(v8f x) {
  const v8f lo = splat(-88.0f), hi = splat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // n = round(x / ln 2) via the 1.5 * 2^23 trick (kept: no -fassociative-math).
  v8f n = x * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;
  const v8f r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  v8f y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  // 2^n; n = -127 (x < ~-87.7) gives the bit pattern 0, i.e. exactly 0.
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return y * (v8f)bits;  // same-size vector cast reinterprets the bits
}

// Key (block, slot, head, dim) lives at data + block * block_stride +
// slot_offsets[slot] + head * head_stride + dim_offsets[dim]: the offset
// tables cover every paged form, strided or tiled (ops.h).
template <typename scalar_t>
struct PagedKeys {
  const scalar_t* data;
  int64_t block_stride, head_stride;
  int64_t block_size;
  const int64_t* slot_offsets;  // [block_size]
  const int64_t* dim_offsets;   // [head_dim]
};

// Element offsets of each index of a tiled dimension pair (sizes n_hi x n_lo).
std::vector<int64_t> tile_offsets(int64_t n_lo, int64_t stride_hi, int64_t stride_lo,
                                  int64_t count) {
  std::vector<int64_t> offsets(count);
  for (int64_t i = 0; i < count; ++i) offsets[i] = (i / n_lo) * stride_hi + (i % n_lo) * stride_lo;
  return offsets;
}

// Copies keys [k0, k0 + n) of kv head `head` into Kt, transposed to
// [D][kKeyTile] float; columns n..kKeyTile-1 are zeroed.
template <typename scalar_t>
void gather_key_tile(const PagedKeys<scalar_t>& keys, const int32_t* block_ids,
                     int64_t head, int64_t k0, int n, int head_dim, float* Kt) {
  for (int j = 0; j < n; ++j) {
    const int64_t t = k0 + j;
    const int64_t block = block_ids[t / keys.block_size];
    const scalar_t* src = keys.data + block * keys.block_stride +
                          keys.slot_offsets[t % keys.block_size] +
                          head * keys.head_stride;
    // vLLM's CPU caches store keys transposed or tiled: head_dim is rarely contiguous.
    for (int d = 0; d < head_dim; ++d) {
      Kt[static_cast<int64_t>(d) * kKeyTile + j] = static_cast<float>(src[keys.dim_offsets[d]]);
    }
  }
  if (n < kKeyTile) {
    for (int d = 0; d < head_dim; ++d) {
      std::fill(Kt + static_cast<int64_t>(d) * kKeyTile + n,
                Kt + static_cast<int64_t>(d + 1) * kKeyTile, 0.0f);
    }
  }
}

// Computes the logits scale * q[r].k_j of R query rows against the whole key
// tile, 16 columns at a time so the R x 16 accumulators stay in registers
// while sweeping head_dim, and hands each (row, 16 columns) block to
// `epilogue(r, c, s0, s1)` (columns c..c+7 in s0, c+8..c+15 in s1).
template <int R, typename Epilogue>
inline void tile_logits(const float* const* q, const float* Kt, int head_dim,
                        float scale, Epilogue&& epilogue) {
  for (int c = 0; c < kKeyTile; c += 2 * kLanes) {
    v8f acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = splat(0.0f);
    const float* k = Kt + c;
    for (int d = 0; d < head_dim; ++d, k += kKeyTile) {
      const v8f k0 = load(k), k1 = load(k + kLanes);
      for (int r = 0; r < R; ++r) {
        const v8f qd = splat(q[r][d]);
        acc0[r] += qd * k0;
        acc1[r] += qd * k1;
      }
    }
    for (int r = 0; r < R; ++r) epilogue(r, c, acc0[r] * scale, acc1[r] * scale);
  }
}

// The two block kernels are kept out of line so register allocation sees only
// the micro-kernel (inlined into the big work loops, GCC spilled accumulators).

// Pass 1: out[r][j] = scale * q[r].k_j.
template <int R>
__attribute__((noinline)) void block_logits(const float* const* q, const float* Kt,
                                            int head_dim, float scale,
                                            float (*out)[kKeyTile]) {
  tile_logits<R>(q, Kt, head_dim, scale, [&](int r, int c, v8f s0, v8f s1) {
    store(&out[r][c], s0);
    store(&out[r][c + kLanes], s1);
  });
}

// Pass 2: acc[j] += sum_r exp(scale * q[r].k_j - lse[r]) over columns
// j < lim[r] (all columns when !kMasked).
template <int R, bool kMasked>
__attribute__((noinline)) void block_probs(const float* const* q, const float* Kt,
                                           int head_dim, float scale, const float* lse,
                                           const int* lim, v8f* acc) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  tile_logits<R>(q, Kt, head_dim, scale, [&](int r, int c, v8f s0, v8f s1) {
    const v8f l = splat(lse[r]);
    const v8f p0 = exp_v8(s0 - l), p1 = exp_v8(s1 - l);
    if (kMasked) {
      // Column c + lane (s0) / c + 8 + lane (s1) is kept iff it is < lim[r].
      const v8i rel = lane - (lim[r] - c);
      const v8f zero = splat(0.0f);
      acc[c / kLanes] += rel < 0 ? p0 : zero;
      acc[c / kLanes + 1] += rel < -kLanes ? p1 : zero;
    } else {
      acc[c / kLanes] += p0;
      acc[c / kLanes + 1] += p1;
    }
  });
}

void logits_rows(const float* const* q, int rows, const float* Kt, int head_dim,
                 float scale, float (*out)[kKeyTile]) {
  switch (rows) {
    case 4: block_logits<4>(q, Kt, head_dim, scale, out); break;
    case 3: block_logits<3>(q, Kt, head_dim, scale, out); break;
    case 2: block_logits<2>(q, Kt, head_dim, scale, out); break;
    default: block_logits<1>(q, Kt, head_dim, scale, out); break;
  }
}

template <bool kMasked>
void probs_rows(const float* const* q, int rows, const float* Kt, int head_dim,
                float scale, const float* lse, const int* lim, v8f* acc) {
  switch (rows) {
    case 4: block_probs<4, kMasked>(q, Kt, head_dim, scale, lse, lim, acc); break;
    case 3: block_probs<3, kMasked>(q, Kt, head_dim, scale, lse, lim, acc); break;
    case 2: block_probs<2, kMasked>(q, Kt, head_dim, scale, lse, lim, acc); break;
    default: block_probs<1, kMasked>(q, Kt, head_dim, scale, lse, lim, acc); break;
  }
}

// Per-thread [D][kKeyTile] float buffer, 64-byte aligned.
class TileBuffer {
 public:
  explicit TileBuffer(int head_dim)
      : storage_(static_cast<size_t>(head_dim) * kKeyTile + 16) {}
  float* data() {
    const auto addr = reinterpret_cast<uintptr_t>(storage_.data());
    return storage_.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }

 private:
  std::vector<float> storage_;
};

struct SeqInfo {
  int64_t q_begin;  // first row of this sequence in `query`
  int64_t q_len;
  int64_t seq_len;
  int64_t first_scored;  // local index of the first query that is scored
};

struct WorkItem {
  int64_t seq;
  int64_t kv_head;
  int64_t tile;  // query tile (pass 1) or key tile (pass 2)
  int64_t cost;
};

int num_threads_for_op() {
  return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
}

template <typename scalar_t>
void importance_impl(const at::Tensor& qf,  // [T, Hq, D] float, contiguous
                     const at::Tensor& key_cache,  // tiled 6-D view
                     const int32_t* block_table,
                     int64_t bt_stride, const std::vector<SeqInfo>& seqs,
                     float scale, at::Tensor& scores, at::Tensor& lse_buf,
                     bool have_lse) {
  const int64_t num_q_heads = qf.size(1);
  const int head_dim = static_cast<int>(qf.size(2));
  const int64_t num_kv_heads = key_cache.size(3);
  const int64_t group = num_q_heads / num_kv_heads;
  const float* q_data = qf.data_ptr<float>();
  float* lse_data = lse_buf.data_ptr<float>();  // [Hq, T] contiguous
  const int64_t num_tokens = qf.size(0);

  const int64_t block_size = key_cache.size(1) * key_cache.size(2);
  const std::vector<int64_t> slot_offsets =
      tile_offsets(key_cache.size(2), key_cache.stride(1), key_cache.stride(2), block_size);
  const std::vector<int64_t> dim_offsets =
      tile_offsets(key_cache.size(5), key_cache.stride(4), key_cache.stride(5), head_dim);
  PagedKeys<scalar_t> keys{key_cache.data_ptr<scalar_t>(), key_cache.stride(0),
                           key_cache.stride(3), block_size, slot_offsets.data(),
                           dim_offsets.data()};
  const int nthreads = num_threads_for_op();

  auto q_row = [&](int64_t token, int64_t head) {
    return q_data + (token * num_q_heads + head) * head_dim;
  };

  // ---- pass 1: lse of every scored query --------------------------------
  if (!have_lse) {
    std::vector<WorkItem> work;
    for (int64_t b = 0; b < static_cast<int64_t>(seqs.size()); ++b) {
      const SeqInfo& s = seqs[b];
      const int64_t pos0 = s.seq_len - s.q_len;
      for (int64_t i0 = s.first_scored; i0 < s.q_len; i0 += kQueryTile) {
        const int64_t i1 = std::min(s.q_len, i0 + kQueryTile);
        for (int64_t g = 0; g < num_kv_heads; ++g) {
          work.push_back({b, g, i0, (pos0 + i1) * (i1 - i0)});
        }
      }
    }
    // Most expensive first so dynamic scheduling balances the tail.
    std::stable_sort(work.begin(), work.end(),
                     [](const WorkItem& a, const WorkItem& b) {
                       return a.cost > b.cost;
                     });
    const int64_t num_work = static_cast<int64_t>(work.size());
#pragma omp parallel num_threads(nthreads)
    {
      TileBuffer Kt(head_dim);
      const int64_t max_rows = group * kQueryTile;
      std::vector<float> row_max(max_rows), row_sum(max_rows);
      std::vector<const float*> row_q(max_rows);
      std::vector<int64_t> row_pos(max_rows);
      alignas(64) float logits[kRowBlock][kKeyTile];

#pragma omp for schedule(dynamic, 1)
      for (int64_t w = 0; w < num_work; ++w) {
        const WorkItem& item = work[w];
        const SeqInfo& s = seqs[item.seq];
        const int32_t* block_ids = block_table + item.seq * bt_stride;
        const int64_t pos0 = s.seq_len - s.q_len;
        const int64_t i0 = item.tile;
        const int64_t i1 = std::min(s.q_len, i0 + kQueryTile);
        const int64_t nq = i1 - i0;
        const int64_t rows = group * nq;
        // Row order: query-major, heads of the group inner.
        for (int64_t i = 0; i < nq; ++i) {
          for (int64_t h = 0; h < group; ++h) {
            const int64_t r = i * group + h;
            row_q[r] = q_row(s.q_begin + i0 + i, item.kv_head * group + h);
            row_pos[r] = pos0 + i0 + i;
            row_max[r] = -std::numeric_limits<float>::infinity();
            row_sum[r] = 0.0f;
          }
        }
        const int64_t last_key = pos0 + i1 - 1;  // inclusive
        for (int64_t k0 = 0; k0 <= last_key; k0 += kKeyTile) {
          const int n = static_cast<int>(std::min<int64_t>(kKeyTile, last_key + 1 - k0));
          gather_key_tile(keys, block_ids, item.kv_head, k0, n, head_dim, Kt.data());
          // Rows whose position is < k0 see nothing of this tile; rows are
          // sorted by position, so start at the first row that does.
          int64_t r_begin = 0;
          while (r_begin < rows && row_pos[r_begin] < k0) ++r_begin;
          for (int64_t r0 = r_begin; r0 < rows; r0 += kRowBlock) {
            const int rb = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
            logits_rows(&row_q[r0], rb, Kt.data(), head_dim, scale, logits);
            for (int rr = 0; rr < rb; ++rr) {
              const int64_t r = r0 + rr;
              const int lim = static_cast<int>(std::min<int64_t>(n, row_pos[r] - k0 + 1));
              float* lg = logits[rr];
              // Keys past the query (or past the tile) get probability 0.
              std::fill(lg + lim, lg + kKeyTile, -std::numeric_limits<float>::infinity());
              v8f vm = load(lg);
              for (int v = 1; v < kTileVecs; ++v) vm = vmax(vm, load(lg + v * kLanes));
              const float new_max = std::max(row_max[r], hmax(vm));
              const v8f m = splat(new_max);
              v8f sum = splat(0.0f);
              for (int v = 0; v < kTileVecs; ++v) sum += exp_v8(load(lg + v * kLanes) - m);
              row_sum[r] = row_sum[r] * std::exp(row_max[r] - new_max) + hsum(sum);
              row_max[r] = new_max;
            }
          }
        }
        for (int64_t i = 0; i < nq; ++i) {
          for (int64_t h = 0; h < group; ++h) {
            const int64_t r = i * group + h;
            lse_data[(item.kv_head * group + h) * num_tokens + s.q_begin + i0 + i] =
                row_max[r] + std::log(row_sum[r]);
          }
        }
      }
    }
  }

  // ---- pass 2: accumulate probabilities per key tile ----------------------
  std::vector<WorkItem> work;
  for (int64_t b = 0; b < static_cast<int64_t>(seqs.size()); ++b) {
    const SeqInfo& s = seqs[b];
    if (s.first_scored >= s.q_len) continue;
    const int64_t pos0 = s.seq_len - s.q_len;
    for (int64_t k0 = 0; k0 < s.seq_len; k0 += kKeyTile) {
      // Scoring queries that see part of this tile.
      const int64_t first = std::max(s.first_scored, k0 - pos0);
      if (first >= s.q_len) break;
      for (int64_t g = 0; g < num_kv_heads; ++g) {
        work.push_back({b, g, k0 / kKeyTile, s.q_len - first});
      }
    }
  }
  std::stable_sort(work.begin(), work.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  const int64_t num_work = static_cast<int64_t>(work.size());
  float* scores_data = scores.data_ptr<float>();
  const int64_t sc_b = scores.stride(0), sc_g = scores.stride(1), sc_k = scores.stride(2);
  const float inv_group = 1.0f / static_cast<float>(group);

#pragma omp parallel num_threads(nthreads)
  {
    TileBuffer Kt(head_dim);
    v8f acc[kTileVecs];
    const float* row_q[kRowBlock];
    float row_lse[kRowBlock];
    int row_lim[kRowBlock];

#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < num_work; ++w) {
      const WorkItem& item = work[w];
      const SeqInfo& s = seqs[item.seq];
      const int32_t* block_ids = block_table + item.seq * bt_stride;
      const int64_t pos0 = s.seq_len - s.q_len;
      const int64_t k0 = item.tile * kKeyTile;
      const int n = static_cast<int>(std::min<int64_t>(kKeyTile, s.seq_len - k0));
      const int64_t first = std::max(s.first_scored, k0 - pos0);
      gather_key_tile(keys, block_ids, item.kv_head, k0, n, head_dim, Kt.data());
      for (int v = 0; v < kTileVecs; ++v) acc[v] = splat(0.0f);

      // Rows (query i, head h), query-major; blocks of kRowBlock rows.
      const int64_t rows = (s.q_len - first) * group;
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int rb = static_cast<int>(std::min<int64_t>(kRowBlock, rows - r0));
        bool full = true;
        for (int rr = 0; rr < rb; ++rr) {
          const int64_t r = r0 + rr;
          const int64_t i = first + r / group;
          const int64_t h = item.kv_head * group + r % group;
          const int64_t token = s.q_begin + i;
          row_q[rr] = q_row(token, h);
          row_lse[rr] = lse_data[h * num_tokens + token];
          row_lim[rr] = static_cast<int>(std::min<int64_t>(n, pos0 + i - k0 + 1));
          full = full && row_lim[rr] == kKeyTile;
        }
        if (full) {
          probs_rows<false>(row_q, rb, Kt.data(), head_dim, scale, row_lse, row_lim, acc);
        } else {
          // Diagonal or last tile: keys past the query (or the sequence) add 0.
          probs_rows<true>(row_q, rb, Kt.data(), head_dim, scale, row_lse, row_lim, acc);
        }
      }
      float* out = scores_data + item.seq * sc_b + item.kv_head * sc_g + k0 * sc_k;
      for (int j = 0; j < n; ++j) out[j * sc_k] += acc[j / kLanes][j % kLanes] * inv_group;
    }
  }
}

}  // namespace

void importance_cpu(const at::Tensor& query, const at::Tensor& key_cache,
                    const at::Tensor& block_table,
                    const at::Tensor& query_start_loc,
                    const at::Tensor& seq_lens,
                    const at::Tensor& min_query_pos, double scale,
                    at::Tensor& scores, const std::optional<at::Tensor>& lse) {
  check_importance_args(query, key_cache, block_table, query_start_loc, seq_lens,
                        min_query_pos, scores, lse);
  constexpr const char* op = "prefixkv::importance";
  TORCH_CHECK(query.device().is_cpu(), op, ": importance_cpu got a ",
              query.device(), " tensor");

  const int64_t batch = seq_lens.size(0);
  const int64_t num_tokens = query.size(0);
  const int64_t num_blocks = key_cache.size(0);
  const int64_t block_size = paged_block_size(key_cache);
  const at::Tensor bt = block_table.contiguous();
  const at::Tensor qsl = query_start_loc.contiguous();
  const at::Tensor sl = seq_lens.contiguous();
  const at::Tensor mqp = min_query_pos.contiguous();
  const int32_t* bt_data = bt.data_ptr<int32_t>();
  const int32_t* qsl_data = qsl.data_ptr<int32_t>();
  const int32_t* sl_data = sl.data_ptr<int32_t>();
  const int32_t* mqp_data = mqp.data_ptr<int32_t>();
  const int64_t bt_stride = bt.size(1);

  // Host-side validation of the index contents (cheap: O(B * max_blocks)).
  std::vector<SeqInfo> seqs(batch);
  bool any_work = false;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_begin = qsl_data[b], q_end = qsl_data[b + 1];
    const int64_t seq_len = sl_data[b];
    TORCH_CHECK(0 <= q_begin && q_begin <= q_end && q_end <= num_tokens, op,
                ": query_start_loc must be non-decreasing within [0, T = ",
                num_tokens, "], got [", q_begin, ", ", q_end, "] for sequence ", b);
    const int64_t q_len = q_end - q_begin;
    TORCH_CHECK(seq_len >= q_len, op, ": seq_lens[", b, "] = ", seq_len,
                " is smaller than its query count ", q_len);
    TORCH_CHECK(seq_len <= scores.size(2), op, ": seq_lens[", b, "] = ", seq_len,
                " exceeds scores.shape[2] = ", scores.size(2));
    const int64_t needed_blocks = (seq_len + block_size - 1) / block_size;
    TORCH_CHECK(needed_blocks <= bt_stride, op, ": seq_lens[", b, "] = ", seq_len,
                " needs ", needed_blocks, " blocks but block_table has ", bt_stride,
                " columns");
    for (int64_t k = 0; k < needed_blocks; ++k) {
      const int64_t id = bt_data[b * bt_stride + k];
      TORCH_CHECK(0 <= id && id < num_blocks, op, ": block_table[", b, ", ", k,
                  "] = ", id, " is out of range [0, ", num_blocks, ")");
    }
    const int64_t pos0 = seq_len - q_len;
    const int64_t first_scored =
        std::min(q_len, std::max<int64_t>(0, static_cast<int64_t>(mqp_data[b]) - pos0));
    seqs[b] = {q_begin, q_len, seq_len, first_scored};
    any_work = any_work || first_scored < q_len;
  }
  if (!any_work || query.size(1) == 0 || query.size(2) == 0) return;

  const at::Tensor qf = query.to(at::kFloat).contiguous();
  at::Tensor lse_buf = lse.has_value()
                           ? lse->contiguous()
                           : at::empty({query.size(1), num_tokens},
                                       query.options().dtype(at::kFloat));

  const at::Tensor keys = tiled_view(key_cache);
  AT_DISPATCH_FLOATING_TYPES_AND4(
      at::kBFloat16, at::kHalf, at::kFloat8_e4m3fn, at::kFloat8_e5m2,
      key_cache.scalar_type(), "importance_cpu", [&] {
        importance_impl<scalar_t>(qf, keys, bt_data, bt_stride, seqs,
                                  static_cast<float>(scale), scores, lse_buf,
                                  lse.has_value());
      });
}

}  // namespace prefixkv
