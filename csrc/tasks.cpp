// Task engines: Sudoku solving, generation and validation, and path-star graphs.
//
// Every random draw comes from the splitmix64 stream of blockmdm/tasks/_common.py (Stream, key),
// and the generators follow blockmdm/tasks/sudoku.py and pathfind.py step for step, so the
// native and Python paths give identical data for a seed. Puzzles and graphs are independent
// (each has its own stream keyed by its index), which is what lets them run in parallel.
#include "blockmdm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace blockmdm {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;

inline uint64_t fmix(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

uint64_t key(std::initializer_list<uint64_t> words) {
  uint64_t h = 0;
  for (uint64_t w : words) h = fmix((h ^ w) + kGolden);
  return h;
}

struct Stream {
  uint64_t s;
  uint64_t next() { return fmix(s += kGolden); }
  uint64_t below(uint64_t n) { return next() % n; }
  template <typename T>
  void shuffle(T* a, int n) {  // Fisher-Yates from the back
    for (int i = n - 1; i > 0; --i) std::swap(a[i], a[below(static_cast<uint64_t>(i) + 1)]);
  }
};

constexpr uint16_t kAll = 0x3FE;  // bits 1..9: the digits

struct Cells {
  uint8_t row[81], col[81], box[81];
  uint8_t peers[81][20];  // the other cells of a cell's row, column and box
  uint8_t units[27][9];   // rows, columns, boxes
  Cells() {
    for (int i = 0; i < 81; ++i) {
      row[i] = i / 9;
      col[i] = i % 9;
      box[i] = (i / 27) * 3 + (i % 9) / 3;
    }
    for (int i = 0; i < 81; ++i) {
      int n = 0;
      for (int j = 0; j < 81; ++j)
        if (j != i && (row[j] == row[i] || col[j] == col[i] || box[j] == box[i])) peers[i][n++] = j;
    }
    int fill[27] = {};
    for (int i = 0; i < 81; ++i) {
      units[row[i]][fill[row[i]]++] = i;
      units[9 + col[i]][fill[9 + col[i]]++] = i;
      units[18 + box[i]][fill[18 + box[i]]++] = i;
    }
  }
};
const Cells kCells;

// The random grid filler, sudoku.solve(..., rng=) step for step: depth-first over the blank
// cells, the one with the fewest candidates first (the first such cell in index order; a cell
// with <= 1 candidate is taken at once), digits shuffled by `rng`. Stops after `limit` solutions;
// the first is kept. (Counting solutions, where only the count matters, uses the faster Counter.)
struct Search {
  uint8_t g[81];
  uint16_t rows[9] = {}, cols[9] = {}, boxes[9] = {};
  Stream* rng = nullptr;
  int limit = 2;
  int found = 0;
  uint8_t first[81];

  // false when the givens already clash
  bool load(const uint8_t* grid) {
    std::memcpy(g, grid, 81);
    for (int i = 0; i < 81; ++i) {
      if (!g[i]) continue;
      const uint16_t bit = 1u << g[i];
      if ((rows[kCells.row[i]] | cols[kCells.col[i]] | boxes[kCells.box[i]]) & bit) return false;
      set(i, g[i]);
    }
    return true;
  }
  void set(int i, int d) {
    const uint16_t bit = 1u << d;
    g[i] = d;
    rows[kCells.row[i]] |= bit;
    cols[kCells.col[i]] |= bit;
    boxes[kCells.box[i]] |= bit;
  }
  void unset(int i, int d) {
    const uint16_t bit = ~(1u << d);
    g[i] = 0;
    rows[kCells.row[i]] &= bit;
    cols[kCells.col[i]] &= bit;
    boxes[kCells.box[i]] &= bit;
  }
  uint16_t candidates(int i) const {
    return kAll & ~(rows[kCells.row[i]] | cols[kCells.col[i]] | boxes[kCells.box[i]]);
  }
  bool run() {
    int best = -1, best_n = 10;
    uint16_t best_c = 0;
    for (int i = 0; i < 81; ++i) {
      if (g[i]) continue;
      const uint16_t c = candidates(i);
      const int n = __builtin_popcount(c);
      if (n < best_n) {
        best = i, best_c = c, best_n = n;
        if (n <= 1) break;
      }
    }
    if (best < 0) {
      if (found++ == 0) std::memcpy(first, g, 81);
      return found >= limit;
    }
    if (best_n == 0) return false;
    int digits[9], m = 0;
    for (int d = 1; d <= 9; ++d)
      if (best_c >> d & 1) digits[m++] = d;
    if (rng) rng->shuffle(digits, m);
    for (int j = 0; j < m; ++j) {
      set(best, digits[j]);
      const bool stop = run();
      unset(best, digits[j]);
      if (stop) return true;
    }
    return false;
  }
};

// Solution counting with constraint propagation: candidate masks per cell, naked and hidden
// singles placed until nothing changes, then a branch on a cell with the fewest candidates.
struct Counter {
  struct State {
    uint16_t cand[81];  // 0 for a filled cell
    uint8_t g[81];
    int left;
  };
  int limit = 2;
  int found = 0;
  uint8_t first[81];

  // false when the givens clash; `forbid_cell` loses the candidate `forbid_digit`
  static bool load(const uint8_t* grid, State& s, int forbid_cell = -1, int forbid_digit = 0) {
    uint16_t rows[9] = {}, cols[9] = {}, boxes[9] = {};
    s.left = 0;
    for (int i = 0; i < 81; ++i) {
      s.g[i] = grid[i];
      if (!grid[i]) {
        ++s.left;
        continue;
      }
      const uint16_t bit = 1u << grid[i];
      if ((rows[kCells.row[i]] | cols[kCells.col[i]] | boxes[kCells.box[i]]) & bit) return false;
      rows[kCells.row[i]] |= bit;
      cols[kCells.col[i]] |= bit;
      boxes[kCells.box[i]] |= bit;
    }
    for (int i = 0; i < 81; ++i)
      s.cand[i] = s.g[i] ? 0 : kAll & ~(rows[kCells.row[i]] | cols[kCells.col[i]] |
                                         boxes[kCells.box[i]]);
    if (forbid_cell >= 0) s.cand[forbid_cell] &= ~(1u << forbid_digit);
    return true;
  }
  static bool assign(State& s, int i, int d) {
    const uint16_t bit = 1u << d;
    s.g[i] = d;
    s.cand[i] = 0;
    --s.left;
    for (int p : kCells.peers[i]) {
      if (s.cand[p] & bit) {
        s.cand[p] &= ~bit;
        if (!s.cand[p]) return false;
      }
    }
    return true;
  }
  static bool propagate(State& s) {
    for (bool changed = true; changed;) {
      changed = false;
      for (int i = 0; i < 81; ++i) {
        const uint16_t c = s.cand[i];
        if (!s.g[i] && !c) return false;
        if (c && !(c & (c - 1))) {
          if (!assign(s, i, __builtin_ctz(c))) return false;
          changed = true;
        }
      }
      for (const auto& unit : kCells.units) {
        uint16_t once = 0, twice = 0, placed = 0;
        for (int c : unit) {
          if (s.g[c]) {
            placed |= 1u << s.g[c];
          } else {
            twice |= once & s.cand[c];
            once |= s.cand[c];
          }
        }
        if ((once | placed) != kAll) return false;  // a digit with no place left in the unit
        for (uint16_t single = once & ~twice & ~placed; single; single &= single - 1) {
          const int d = __builtin_ctz(single);
          int cell = -1;
          for (int c : unit)
            if (s.cand[c] >> d & 1) cell = c;
          if (cell < 0 || !assign(s, cell, d)) return false;
          changed = true;
        }
      }
    }
    return true;
  }
  // true once `limit` solutions are found
  bool run(State& s) {
    if (!propagate(s)) return false;
    if (s.left == 0) {
      if (found++ == 0) std::memcpy(first, s.g, 81);
      return found >= limit;
    }
    int best = -1, best_n = 10;
    for (int i = 0; i < 81; ++i) {
      const int n = __builtin_popcount(s.cand[i]);
      if (s.cand[i] && n < best_n) {
        best = i, best_n = n;
        if (n == 2) break;
      }
    }
    for (uint16_t c = s.cand[best]; c; c &= c - 1) {
      State t = s;
      if (assign(t, best, __builtin_ctz(c)) && run(t)) return true;
    }
    return false;
  }
};

// (puzzle, solution) with exactly `holes` blanks and one solution: fill a random grid, blank
// cells in random order keeping a blank only while the solution stays unique, start over when
// the order runs out before `holes` blanks.
void make_puzzle(uint64_t seed, int holes, uint64_t index, uint64_t attempt, uint8_t* puzzle,
                 uint8_t* solution) {
  Stream rng{key({seed, static_cast<uint64_t>(holes), index, attempt})};
  const uint8_t empty[81] = {};
  while (true) {
    Search fill;
    fill.load(empty);
    fill.rng = &rng;
    fill.limit = 1;
    fill.run();
    std::memcpy(solution, fill.first, 81);
    std::memcpy(puzzle, solution, 81);
    int order[81];
    for (int i = 0; i < 81; ++i) order[i] = i;
    rng.shuffle(order, 81);
    int blanks = 0;
    for (int j = 0; j < 81 && blanks < holes; ++j) {
      const int i = order[j];
      puzzle[i] = 0;
      // Unique iff no solution puts another digit in the cell just blanked.
      Counter check;
      Counter::State state;
      check.limit = 1;
      Counter::load(puzzle, state, i, solution[i]);
      if (state.cand[i] != 0 && check.run(state)) {
        puzzle[i] = solution[i];
      } else {
        ++blanks;
      }
    }
    if (blanks == holes) return;
  }
}

void check_grids(const at::Tensor& grids, const char* name) {
  TORCH_CHECK(grids.device().is_cpu() && grids.scalar_type() == at::kByte && grids.dim() == 2 &&
                  grids.size(1) == 81 && grids.is_contiguous(),
              name, " must be a contiguous CPU uint8 tensor [n, 81]");
}

}  // namespace

at::Tensor sudoku_generate(uint64_t seed, int64_t holes, int64_t first, int64_t n,
                           int64_t attempt) {
  TORCH_CHECK(holes >= 0 && holes <= 81 && first >= 0 && n >= 0 && attempt >= 0,
              "sudoku_generate: bad arguments");
  at::Tensor out = at::empty({n, 2, 81}, at::kByte);
  uint8_t* p = out.data_ptr<uint8_t>();
  // Dynamic schedule: the cost of a puzzle varies (restarts), so fixed chunks would idle a core.
  // One puzzle (the repeat redraws) runs on the calling thread: waking a team costs more.
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (n > 1)
  for (int64_t k = 0; k < n; ++k) {
    make_puzzle(seed, static_cast<int>(holes), static_cast<uint64_t>(first + k),
                static_cast<uint64_t>(attempt), p + k * 162, p + k * 162 + 81);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> sudoku_count(const at::Tensor& grids, int64_t limit) {
  check_grids(grids, "grids");
  TORCH_CHECK(limit >= 1, "limit must be >= 1");
  const int64_t n = grids.size(0);
  at::Tensor counts = at::empty({n}, at::kLong);
  at::Tensor solutions = at::zeros({n, 81}, at::kByte);
  const uint8_t* g = grids.data_ptr<uint8_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  uint8_t* s = solutions.data_ptr<uint8_t>();
  // One grid runs on the calling thread: a team's wake-up and barrier cost more than solving a
  // grid (tens of microseconds), and much more on a loaded machine.
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads()) if (n > 1)
  for (int64_t k = 0; k < n; ++k) {
    Counter counter;
    Counter::State state;
    counter.limit = static_cast<int>(limit);
    c[k] = 0;
    if (!Counter::load(g + k * 81, state)) continue;
    counter.run(state);
    c[k] = counter.found;
    if (counter.found) std::memcpy(s + k * 81, counter.first, 81);
  }
  return {counts, solutions};
}

at::Tensor sudoku_valid(const at::Tensor& grids) {
  check_grids(grids, "grids");
  const int64_t n = grids.size(0);
  at::Tensor out = at::empty({n}, at::kBool);
  const uint8_t* g = grids.data_ptr<uint8_t>();
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      uint16_t rows[9] = {}, cols[9] = {}, boxes[9] = {};
      bool ok = true;
      for (int i = 0; i < 81 && ok; ++i) {
        const int d = g[k * 81 + i];
        ok = d >= 1 && d <= 9;
        rows[kCells.row[i]] |= 1u << d;
        cols[kCells.col[i]] |= 1u << d;
        boxes[kCells.box[i]] |= 1u << d;
      }
      for (int j = 0; j < 9 && ok; ++j) ok = rows[j] == kAll && cols[j] == kAll && boxes[j] == kAll;
      o[k] = ok;
    }
  });
  return out;
}

std::vector<std::string> star_graphs(uint64_t seed, int64_t first, int64_t n, int64_t n_nodes,
                                     int64_t degree, int64_t path_len) {
  const int64_t m = 1 + degree * (path_len - 1);
  TORCH_CHECK(n >= 0 && first >= 0 && degree >= 1 && path_len >= 2 && m <= n_nodes,
              "star_graphs: bad arguments");
  std::vector<std::string> lines(n);
  at::parallel_for(0, n, 256, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> pool(n_nodes);
    std::vector<std::pair<int64_t, int64_t>> edges(degree * (path_len - 1));
    for (int64_t k = lo; k < hi; ++k) {
      Stream rng{key({seed, static_cast<uint64_t>(first + k)})};
      for (int64_t i = 0; i < n_nodes; ++i) pool[i] = i;
      for (int64_t i = 0; i < m; ++i)  // partial Fisher-Yates: m distinct nodes
        std::swap(pool[i], pool[i + rng.below(n_nodes - i)]);
      // arm a is source, pool[1 + a * (path_len - 1)], ..., pool[(a + 1) * (path_len - 1)]
      auto node = [&](int64_t a, int64_t i) { return i == 0 ? pool[0] : pool[a * (path_len - 1) + i]; };
      int64_t e = 0;
      for (int64_t a = 0; a < degree; ++a)
        for (int64_t i = 0; i + 1 < path_len; ++i) edges[e++] = {node(a, i), node(a, i + 1)};
      rng.shuffle(edges.data(), static_cast<int>(e));
      const int64_t arm = static_cast<int64_t>(rng.below(degree));
      std::string& s = lines[k];
      for (int64_t j = 0; j < e; ++j) {
        if (j) s += '|';
        s += std::to_string(edges[j].first) + ',' + std::to_string(edges[j].second);
      }
      s += '/' + std::to_string(pool[0]) + ',' + std::to_string(node(arm, path_len - 1)) + '=';
      for (int64_t i = 0; i < path_len; ++i) {
        if (i) s += ',';
        s += std::to_string(node(arm, i));
      }
    }
  });
  return lines;
}

}  // namespace blockmdm
