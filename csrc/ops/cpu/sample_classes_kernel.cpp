// CPU class sampler: expected O(S + B) work (hash sets or a bitmap of at most 64 S bits, rejection draws, a
// bucket pass), never a sort or a top-k over num_local. Sequential and seeded, so the result depends only on the inputs and the seed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace partialfc {
namespace {

// splitmix64: a small, well-mixed 64-bit generator.
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Unbiased uniform integer in [0, n) (Lemire's multiply-and-reject).
  uint64_t below(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
};

// Open-addressing set of non-negative int64 keys, sized for `capacity` keys at load <= 1/2.
class IntSet {
 public:
  explicit IntSet(int64_t capacity) {
    int64_t size = 16;
    while (size < 2 * capacity) size <<= 1;
    slots_.assign(size, -1);
    mask_ = static_cast<uint64_t>(size - 1);
  }
  // True when `key` was not in the set.
  bool insert(int64_t key) {
    uint64_t h = (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ULL) >> 17;
    while (true) {
      int64_t& slot = slots_[h & mask_];
      if (slot == key) return false;
      if (slot < 0) {
        slot = key;
        return true;
      }
      ++h;
    }
  }

 private:
  std::vector<int64_t> slots_;
  uint64_t mask_;
};

// Sorts values drawn from [0, limit) in expected O(n) for spread-out values: one counting pass over n
// buckets, then each (small) bucket sorted on its own.
void bucket_sort(std::vector<int64_t>& values, int64_t limit) {
  const int64_t n = static_cast<int64_t>(values.size());
  if (n < 64) {
    std::sort(values.begin(), values.end());
    return;
  }
  auto bucket_of = [&](int64_t v) {
    return static_cast<int64_t>(static_cast<unsigned __int128>(v) * n / static_cast<uint64_t>(limit));
  };
  std::vector<int64_t> start(n + 1, 0);
  for (int64_t v : values) ++start[bucket_of(v) + 1];
  for (int64_t b = 0; b < n; ++b) start[b + 1] += start[b];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  std::vector<int64_t> sorted(n);
  for (int64_t v : values) sorted[fill[bucket_of(v)]++] = v;
  for (int64_t b = 0; b < n; ++b) {
    if (start[b + 1] - start[b] > 1) std::sort(sorted.begin() + start[b], sorted.begin() + start[b + 1]);
  }
  values.swap(sorted);
}

std::tuple<at::Tensor, at::Tensor> sample_classes_cpu(const at::Tensor& labels, int64_t class_start,
                                                      int64_t num_local, int64_t num_sample, int64_t seed) {
  TORCH_CHECK(labels.dim() == 1 && labels.scalar_type() == at::kLong,
              "sample_classes: labels must be a 1-D int64 tensor, got ", labels.dim(), "-D ", labels.scalar_type());
  TORCH_CHECK(num_local >= 0, "sample_classes: num_local must be >= 0, got ", num_local);
  TORCH_CHECK(num_sample >= 0, "sample_classes: num_sample must be >= 0, got ", num_sample);
  const at::Tensor lab = labels.contiguous();
  const int64_t batch = lab.numel();
  const int64_t* y = lab.const_data_ptr<int64_t>();
  at::Tensor remapped = at::empty({batch}, lab.options());
  int64_t* out_label = remapped.mutable_data_ptr<int64_t>();

  if (num_sample >= num_local) {
    // Every class is sampled: index = arange(num_local), labels keep their local id.
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t local = y[b] - class_start;
      out_label[b] = (local >= 0 && local < num_local) ? local : -1;
    }
    return {at::arange(num_local, lab.options()), remapped};
  }

  // Positives: the distinct local labels, O(B) with a hash set.
  std::vector<int64_t> positives;
  {
    IntSet seen(batch);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t local = y[b] - class_start;
      if (local >= 0 && local < num_local && seen.insert(local)) positives.push_back(local);
    }
  }
  std::sort(positives.begin(), positives.end());
  const int64_t num_pos = static_cast<int64_t>(positives.size());
  const int64_t total = std::max(num_sample, num_pos);
  const int64_t num_neg = total - num_pos;
  const int64_t available = num_local - num_pos;  // >= num_neg because num_sample < num_local
  SplitMix64 rng(static_cast<uint64_t>(seed));

  std::vector<int64_t> chosen;
  chosen.reserve(total);
  if (num_neg == 0) {
    chosen = positives;
  } else if (2 * num_neg <= available && num_local <= 64 * total) {
    // Sparse regime with a table small against S (sample_rate >= 1/64): the same rejection draws as below,
    // on a bitmap of num_local bits (128 KiB at 1M classes, cache-resident) instead of a hash set; the
    // sorted index is then read off the bitmap, num_local / 64 words <= S. Same draws, same result.
    std::vector<uint64_t> taken((num_local + 63) / 64, 0);
    for (int64_t p : positives) taken[p >> 6] |= uint64_t(1) << (p & 63);
    int64_t drawn = 0;
    while (drawn < num_neg) {
      const int64_t v = static_cast<int64_t>(rng.below(static_cast<uint64_t>(num_local)));
      uint64_t& word = taken[v >> 6];
      const uint64_t bit = uint64_t(1) << (v & 63);
      if (!(word & bit)) {
        word |= bit;
        ++drawn;
      }
    }
    for (int64_t k = 0; k < static_cast<int64_t>(taken.size()); ++k) {
      for (uint64_t word = taken[k]; word != 0; word &= word - 1) chosen.push_back(64 * k + __builtin_ctzll(word));
    }
  } else if (2 * num_neg <= available) {
    // Sparse regime: rejection draws; each draw is accepted with probability >= 1/2, so O(S) expected.
    IntSet taken(total);
    for (int64_t p : positives) {
      taken.insert(p);
      chosen.push_back(p);
    }
    int64_t drawn = 0;
    while (drawn < num_neg) {
      const int64_t v = static_cast<int64_t>(rng.below(static_cast<uint64_t>(num_local)));
      if (taken.insert(v)) {
        chosen.push_back(v);
        ++drawn;
      }
    }
    bucket_sort(chosen, num_local);
  } else {
    // Dense regime (more than half of the non-positives are sampled, so num_local <= 2 S + B): draw the
    // complement by rejection on a byte mask and keep the rest, which comes out sorted.
    std::vector<uint8_t> mask(num_local, 0);
    for (int64_t p : positives) mask[p] = 1;
    int64_t excluded = 0;
    const int64_t to_exclude = available - num_neg;
    while (excluded < to_exclude) {
      const int64_t v = static_cast<int64_t>(rng.below(static_cast<uint64_t>(num_local)));
      if (mask[v] == 0) {
        mask[v] = 2;
        ++excluded;
      }
    }
    for (int64_t v = 0; v < num_local; ++v) {
      if (mask[v] != 2) chosen.push_back(v);
    }
  }

  at::Tensor index = at::empty({total}, lab.options());
  int64_t* idx = index.mutable_data_ptr<int64_t>();
  std::copy(chosen.begin(), chosen.end(), idx);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t local = y[b] - class_start;
    if (local >= 0 && local < num_local) {
      out_label[b] = static_cast<int64_t>(std::lower_bound(idx, idx + total, local) - idx);
    } else {
      out_label[b] = -1;
    }
  }
  return {index, remapped};
}

}  // namespace
}  // namespace partialfc

TORCH_LIBRARY_IMPL(partialfc, CPU, m) {
  m.impl("sample_classes", &partialfc::sample_classes_cpu);
}
