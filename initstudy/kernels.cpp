// The LeNet's CPU kernels, forward and backward; built and called by kernels.py, which states
// their contracts. Every array is contiguous, channels last.
//
// first_block: a 5x5 convolution of one channel into C = 128 on a zero-padded 32x32 image, a
// 2x2 max-pool, a ReLU. pool_relu: a 2x2 max-pool and a ReLU of any n x h x w x c.
//
// Both forwards write the pooled and ReLU'd output and one byte per output value: which of the
// pool's four positions won (0-3, row-major, the first of equals, as PyTorch's max-pool), or
// NONE where the ReLU zeroed it; the backwards need only those bytes (and first_block's input).
// first_block's weight and bias gradients are summed over fixed chunks of images and then over
// the chunks in order, so a result does not depend on the number of threads.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {
constexpr int C = 128, K = 5, KK = K * K, IN = 32, OUT = 14;  // OUT = (IN - K + 1) / 2
static_assert(OUT % 2 == 0, "the forward takes output positions in pairs");
constexpr uint8_t NONE = 255;
constexpr int CHUNK = 8;  // images per partial sum of the weight gradient
constexpr int AHEAD = 8;  // pooled positions between a prefetch and its use

struct bf16 { uint16_t bits; };
template <typename T> struct Compute { typedef T S; };  // what a stored T is computed in
template <> struct Compute<bf16> { typedef float S; };

// One vector of S as wide as an x86 CPU's registers (64 bytes with AVX-512, else AVX2's 32)
// and integer lanes of its width. A vector wider than the registers does not keep the taps in
// them, and gcc lowers its selects and conversions lane by lane: many times slower on AVX2.
#ifdef __AVX512F__
constexpr int BYTES = 64;
#else
constexpr int BYTES = 32;
#endif
template <typename S> struct Vec {
  typedef S V __attribute__((vector_size(BYTES)));
  typedef std::conditional_t<sizeof(S) == 4, int32_t, int64_t> I __attribute__((vector_size(BYTES)));
  static constexpr int L = BYTES / sizeof(S);  // lanes: channels at a time
};
typedef uint16_t H16 __attribute__((vector_size(BYTES / 2)));  // L bf16s, for L floats
typedef uint32_t U16 __attribute__((vector_size(BYTES)));

template <typename V, typename T> inline V load(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> inline V load_as(const float* p) { return load<V>(p); }
template <typename V> inline V load_as(const double* p) { return load<V>(p); }
template <typename V> inline V load_as(const bf16* p) {  // L bf16s widened to float: exact
  const H16 h = load<H16>(p);
  const U16 u = __builtin_convertvector(h, U16) << 16;
  return load<V>(&u);
}

template <typename V> inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V> inline void store(double* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V> inline void store(bf16* p, V v) {  // round to nearest even, NaN kept
  U16 u = load<U16>(&v);
  U16 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = ((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r;
  H16 h = __builtin_convertvector(r, H16);
  std::memcpy(p, &h, sizeof(H16));
}

// A max-pool's step: candidate o (of four, row-major) replaces the best so far where it is
// larger or NaN, so the first of equals stays, as in PyTorch.
template <typename V, typename I> inline void pool_step(V& best, I& which, V v, int o) {
  const I take = (v > best) | (v != v);
  best = take ? v : best;
  which = take ? I{} + o : which;
}

// Stores ReLU(best) (NaN passes) and each lane's code: the window that won, or NONE.
template <typename T, typename V, typename I>
inline void store_pooled(T* out, uint8_t* won, V best, I which) {
  typedef uint8_t B __attribute__((vector_size(sizeof(V) / sizeof(best[0]))));
  const V zero = {};
  store(out, best <= zero ? zero : best);
  const B code = __builtin_convertvector(best <= zero ? I{} + NONE : which, B);
  std::memcpy(won, &code, sizeof(B));
}

// The codes of L lanes, widened to I's lanes.
template <typename I> inline I codes(const uint8_t* won) {
  typedef uint8_t B __attribute__((vector_size(sizeof(I) / sizeof(I{}[0]))));
  B bytes;  // (gcc drops the vector type of B through a template call: no load<B>)
  std::memcpy(&bytes, won, sizeof(B));
  return __builtin_convertvector(bytes, I);
}

// One image: x is IN x IN, w is KK x C (tap-major), out and won are OUT x OUT x C.
template <typename S, typename O>
void forward_image(const S* __restrict x, const S* __restrict w, const S* __restrict b,
                   O* __restrict out, uint8_t* __restrict won) {
  typedef typename Vec<S>::V V;
  typedef typename Vec<S>::I I;
  constexpr int L = Vec<S>::L;
  for (int c = 0; c < C; c += L) {  // L channels at a time, their taps held in registers
    V tap[KK];
    for (int k = 0; k < KK; ++k) tap[k] = load<V>(w + k * C + c);
    const V bias = load<V>(b + c);
    for (int py = 0; py < OUT; ++py)
      for (int px = 0; px < OUT; px += 2) {  // two outputs' four windows: eight independent sums
        const S* window = x + 2 * py * IN + 2 * px;
        V acc[2][4];
        for (int p = 0; p < 2; ++p)
          for (int o = 0; o < 4; ++o) acc[p][o] = bias;
#pragma GCC unroll 25
        for (int k = 0; k < KK; ++k) {
          const S* at = window + (k / K) * IN + k % K;
          for (int p = 0; p < 2; ++p)
            for (int o = 0; o < 4; ++o) acc[p][o] += at[2 * p + (o >> 1) * IN + (o & 1)] * tap[k];
        }
        for (int p = 0; p < 2; ++p) {
          V best = acc[p][0];
          I which = {};
          for (int o = 1; o < 4; ++o) pool_step(best, which, acc[p][o], o);
          const int at = (py * OUT + px + p) * C + c;
          store_pooled(out + at, won + at, best, which);
        }
      }
  }
}

// Whether any of the L bytes [p, p + L) equals v (L = 4, 8 or 16: lanes of a vector), a word
// of them at a time.
template <int L> inline bool any_equal(const uint8_t* p, uint8_t v) {
  typedef std::conditional_t<L % 8 == 0, uint64_t, uint32_t> W;
  constexpr W ones = W(0x0101010101010101ull), highs = W(0x8080808080808080ull);
  for (int i = 0; i < L; i += int(sizeof(W))) {
    W word;
    std::memcpy(&word, p + i, sizeof(W));
    word ^= ones * v;
    if ((word - ones) & ~word & highs) return true;
  }
  return false;
}

// Images [0, n): adds their weight (KK x C) and bias (C) gradients into gw and gb.
template <typename S, typename G>
void backward_images(const S* __restrict x, const G* __restrict grad, const uint8_t* __restrict won,
                     int n, S* __restrict gw, S* __restrict gb) {
  typedef typename Vec<S>::V V;
  typedef typename Vec<S>::I I;
  constexpr int L = Vec<S>::L;
  for (int c = 0; c < C; c += L) {  // L channels at a time, their tap gradients in registers
    V acc[KK] = {};
    V bias = {};
    for (int i = 0; i < n; ++i)
      for (int py = 0; py < OUT; ++py)
        for (int px = 0; px < OUT; ++px) {
          const int at = ((i * OUT + py) * OUT + px) * C + c;
          if (c == 0) {  // the first pass fetches whole rows ahead; the others find them in cache
            for (int line = 0; line < C * int(sizeof(G)); line += 64)
              __builtin_prefetch(reinterpret_cast<const char*>(grad + at + AHEAD * C) + line);
            __builtin_prefetch(won + at + AHEAD * C);
            __builtin_prefetch(won + at + AHEAD * C + 64);
          }
          const V g = load_as<V>(grad + at);
          const I code = codes<I>(won + at);
          bias += code != I{} + NONE ? g : V{};
          const S* window = x + i * IN * IN + 2 * py * IN + 2 * px;
          for (int o = 0; o < 4; ++o) {
            if (!any_equal<L>(won + at, o)) continue;  // a background window: the first of four ties won
            const V go = code == o ? g : V{};
            const S* from = window + (o >> 1) * IN + (o & 1);
#pragma GCC unroll 25
            for (int k = 0; k < KK; ++k) acc[k] += from[(k / K) * IN + k % K] * go;
          }
        }
    for (int k = 0; k < KK; ++k) store(gw + k * C + c, load<V>(gw + k * C + c) + acc[k]);
    store(gb + c, load<V>(gb + c) + bias);
  }
}

// pool_relu: x is n x h x w x c (h, w even; c a multiple of 16), out and won are
// n x h/2 x w/2 x c; the backward writes every value of gx (zero where no output came from).
// each_window calls f(offset of the window's first value in x, offset of its output), for
// every window and every L channels, images split among the threads.
template <int L, typename F>
void each_window(int n, int h, int w, int c, int threads, F f) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int i = 0; i < n; ++i)
    for (int y = 0; y < h / 2; ++y)
      for (int xx = 0; xx < w / 2; ++xx)
        for (int ch = 0; ch < c; ch += L)
          f(((size_t(i) * h + 2 * y) * w + 2 * xx) * c + ch,
            ((size_t(i) * (h / 2) + y) * (w / 2) + xx) * c + ch);
}

template <typename T>
void pool_forward(const T* x, T* out, uint8_t* won, int n, int h, int w, int c, int threads) {
  typedef Vec<typename Compute<T>::S> W;
  each_window<W::L>(n, h, w, c, threads, [=](size_t from, size_t to) {
    typename W::V best = load_as<typename W::V>(x + from);
    typename W::I which = {};
    for (int o = 1; o < 4; ++o)
      pool_step(best, which, load_as<typename W::V>(x + from + ((o >> 1) * w + (o & 1)) * c), o);
    store_pooled(out + to, won + to, best, which);
  });
}

template <typename T>
void pool_backward(const T* grad, const uint8_t* won, T* gx, int n, int h, int w, int c,
                   int threads) {
  typedef Vec<typename Compute<T>::S> W;
  each_window<W::L>(n, h, w, c, threads, [=](size_t to, size_t from) {
    const typename W::V g = load_as<typename W::V>(grad + from);
    const typename W::I code = codes<typename W::I>(won + from);
    for (int o = 0; o < 4; ++o)
      store(gx + to + ((o >> 1) * w + (o & 1)) * c, code == o ? g : typename W::V{});
  });
}

template <typename S, typename O>
void forward(const S* x, const S* w, const S* b, O* out, uint8_t* won, int n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int i = 0; i < n; ++i)
    forward_image(x + size_t(i) * IN * IN, w, b, out + size_t(i) * OUT * OUT * C,
                  won + size_t(i) * OUT * OUT * C);
}

template <typename S, typename G>
void backward(const S* x, const G* grad, const uint8_t* won, int n, S* gw, S* gb, int threads) {
  const int chunks = (n + CHUNK - 1) / CHUNK, size = KK * C + C;
  std::vector<S> part(size_t(chunks) * size, S(0));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int k = 0; k < chunks; ++k) {
    const size_t first = size_t(k) * CHUNK;
    S* p = part.data() + size_t(k) * size;
    backward_images(x + first * IN * IN, grad + first * OUT * OUT * C, won + first * OUT * OUT * C,
                    std::min<int>(CHUNK, n - int(first)), p, p + KK * C);
  }
  std::fill(gw, gw + KK * C, S(0));
  std::fill(gb, gb + C, S(0));
  for (int k = 0; k < chunks; ++k) {
    const S* p = part.data() + size_t(k) * size;
    for (int j = 0; j < KK * C; ++j) gw[j] += p[j];
    for (int j = 0; j < C; ++j) gb[j] += p[KK * C + j];
  }
}
}  // namespace

extern "C" {
// The sizes kernels.py checks against before calling.
void first_block_sizes(int* c, int* k, int* in, int* out) { *c = C; *k = K; *in = IN; *out = OUT; }
int vector_bytes() { return BYTES; }

void forward_float(const float* x, const float* w, const float* b, float* out, uint8_t* won, int n, int t) { forward(x, w, b, out, won, n, t); }
void forward_double(const double* x, const double* w, const double* b, double* out, uint8_t* won, int n, int t) { forward(x, w, b, out, won, n, t); }
void forward_bfloat16(const float* x, const float* w, const float* b, void* out, uint8_t* won, int n, int t) { forward(x, w, b, static_cast<bf16*>(out), won, n, t); }
void backward_float(const float* x, const float* g, const uint8_t* won, int n, float* gw, float* gb, int t) { backward(x, g, won, n, gw, gb, t); }
void backward_double(const double* x, const double* g, const uint8_t* won, int n, double* gw, double* gb, int t) { backward(x, g, won, n, gw, gb, t); }
void backward_bfloat16(const float* x, const void* g, const uint8_t* won, int n, float* gw, float* gb, int t) { backward(x, static_cast<const bf16*>(g), won, n, gw, gb, t); }

void pool_forward_float(const float* x, float* out, uint8_t* won, int n, int h, int w, int c, int t) { pool_forward(x, out, won, n, h, w, c, t); }
void pool_forward_double(const double* x, double* out, uint8_t* won, int n, int h, int w, int c, int t) { pool_forward(x, out, won, n, h, w, c, t); }
void pool_forward_bfloat16(const void* x, void* out, uint8_t* won, int n, int h, int w, int c, int t) { pool_forward(static_cast<const bf16*>(x), static_cast<bf16*>(out), won, n, h, w, c, t); }
void pool_backward_float(const float* g, const uint8_t* won, float* gx, int n, int h, int w, int c, int t) { pool_backward(g, won, gx, n, h, w, c, t); }
void pool_backward_double(const double* g, const uint8_t* won, double* gx, int n, int h, int w, int c, int t) { pool_backward(g, won, gx, n, h, w, c, t); }
void pool_backward_bfloat16(const void* g, const uint8_t* won, void* gx, int n, int h, int w, int c, int t) { pool_backward(static_cast<const bf16*>(g), won, static_cast<bf16*>(gx), n, h, w, c, t); }
}
