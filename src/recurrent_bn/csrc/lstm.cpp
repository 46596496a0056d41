// Fused CPU kernels for one layer of a normalized LSTM (Cooijmans et al. 2016, eqs. 6-8), forward and backward
// through time. Loaded by recurrent_bn/fused.py with torch.utils.cpp_extension; the plain-PyTorch loops in
// recurrence.py define what these kernels compute, and tests/test_fused.py holds them to it.
//
// Why a compiled loop: at the paper's sizes one timestep is a small matrix product plus a few hundred thousand
// elementwise operations. In PyTorch each of those is a kernel launch (about 170 per timestep for a BN-LSTM with
// its backward); here a timestep is one matrix product and a few passes over the gates, per thread.
//
// Design:
//   - The input projection P = W_x x of every timestep is one large matrix product before the loop (oneDNN), as
//     are its gradients after the backward loop. Its normalization (batch norm with per-timestep or shared
//     statistics, layer norm, or the population affine map in evaluation) and the bias are applied inside the loop,
//     in the same pass as the gates.
//   - One OpenMP team runs the whole sequence, each thread owning a block of examples (rows): it multiplies its
//     rows of h_{t-1} by W_h and updates their gates and cells. Rows are independent except through batch
//     statistics: for those each thread computes the mean and squared deviations of its own rows and the team
//     combines them at one barrier per normalized group and timestep. Without batch statistics (plain, layer
//     norm, evaluation) the threads never wait for each other. Splitting rows rather than hidden units keeps
//     every thread on its own cache lines (a split by units was 2x slower from false sharing).
//   - The per-step matrix products run on the calling thread inside the team: oneDNN for float32, with W_h in
//     oneDNN's blocked layout (on this AMD CPU oneDNN runs these shapes about twice as fast as MKL), ATen's mm for
//     float64.
//   - The backward pass uses only what the forward stored (gate activations, the normalized recurrent term, the
//     normalized cell and its tanh, all states), walks back through time with the same split, and computes
//     dW_h = sum_t dR_t^T h_{t-1} as one large matrix product after the loop.
//   - float32 elementwise work uses polynomial exp / tanh that the compiler vectorizes; the kernels are compiled
//     for AVX-512, AVX2 and baseline x86-64 and chosen at run time, so the binary does not depend on the machine
//     that built it (no -march=native). float64 (the equivalence tests) uses the C library's functions.
//
// The files: common.h (kinds, clock), vector_math.h (exp / tanh, the AVX-512 product), problem.h (what the steps
// see), team.h (the thread team and its barrier), norm.h (the normalizations forward and backward, written once),
// step.h (one timestep forward and backward), this file (the instruction-set variants, the matrix products, the
// drivers over the sequence), lstm.h and bindings.cpp (the interface to Python, by name).

#include "lstm.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "norm.h"
#include "problem.h"
#include "step.h"
#include "team.h"
#include "vector_math.h"
#include "workspace.h"

namespace rbn {

// ---------------------------------------------------------------------------------------------------------------
// Instruction-set variants. The bodies above are always inlined, so each wrapper compiles them for its target.

template <typename T>
struct Kernels {
  void (*forward)(const Problem<T>&, const Team<T>&, int64_t, int64_t, int64_t, int64_t, const T*, int64_t,
                  Scratch<T>&);
  void (*backward)(const Problem<T>&, const Team<T>&, int64_t, int64_t, int64_t, int64_t, Scratch<T>&,
                   Accumulators<T>*);
  void (*shared)(const Problem<T>&, int64_t, int64_t, const T*, const T*, const T*, const T*, const T*);
  void (*moments)(const T*, int64_t, int64_t, int64_t, const bool*, T, T*, T*);
  // C = A B^T with B packed (float32 on AVX-512 only; null elsewhere: the products go to oneDNN or ATen).
  void (*gemm)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);
  const char* name;
};

#define RBN_VARIANT(SUFFIX, ATTRIBUTE, TYPE)                                                                    \
  ATTRIBUTE void forward_##SUFFIX(const Problem<TYPE>& p, const Team<TYPE>& team, int64_t id, int64_t t,       \
                                  int64_t b0, int64_t b1, const TYPE* R, int64_t ldr, Scratch<TYPE>& s) {      \
    forward_step<TYPE>(p, team, id, t, b0, b1, R, ldr, s);                                                     \
  }                                                                                                            \
  ATTRIBUTE void backward_##SUFFIX(const Problem<TYPE>& p, const Team<TYPE>& team, int64_t id, int64_t t,      \
                                   int64_t b0, int64_t b1, Scratch<TYPE>& s, Accumulators<TYPE>* accs) {       \
    backward_step<TYPE>(p, team, id, t, b0, b1, s, accs);                                                      \
  }                                                                                                            \
  ATTRIBUTE void shared_##SUFFIX(const Problem<TYPE>& p, int64_t r0, int64_t r1, const TYPE* mean,             \
                                 const TYPE* rstd, const TYPE* coef, const TYPE* m1, const TYPE* m2) {         \
    shared_input_backward<TYPE>(p, r0, r1, mean, rstd, coef, m1, m2);                                          \
  }                                                                                                            \
  ATTRIBUTE void moments_##SUFFIX(const TYPE* x, int64_t ld, int64_t rows, int64_t n, const bool* mask,        \
                                  TYPE count, TYPE* mean, TYPE* m2) {                                          \
    local_moments<TYPE>(x, ld, rows, n, mask, count, mean, m2);                                                \
  }

RBN_VARIANT(f32_base, , float)
RBN_VARIANT(f64_base, , double)
#if defined(__x86_64__) && defined(__GNUC__)
RBN_VARIANT(f32_avx2, __attribute__((target("avx2,fma"))), float)
RBN_VARIANT(f32_avx512,
            __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512"))), float)
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,prefer-vector-width=512"))) void gemm_f32_avx512(
    const float* A, int64_t lda, int64_t M, const float* packed, int64_t K, int64_t panels, float* C, int64_t ldc) {
  gemm_panels(A, lda, M, packed, K, panels, C, ldc);
}
#endif

const Kernels<float>& float_kernels() {
  static const Kernels<float> kernels = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
      return Kernels<float>{forward_f32_avx512, backward_f32_avx512, shared_f32_avx512, moments_f32_avx512,
                            gemm_f32_avx512, "avx512"};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels<float>{forward_f32_avx2, backward_f32_avx2, shared_f32_avx2, moments_f32_avx2, nullptr, "avx2"};
#endif
    return Kernels<float>{forward_f32_base, backward_f32_base, shared_f32_base, moments_f32_base, nullptr,
                          "baseline"};
  }();
  return kernels;
}

template <typename T>
const Kernels<T>& kernels();
template <>
const Kernels<float>& kernels<float>() { return float_kernels(); }
template <>
const Kernels<double>& kernels<double>() {
  static const Kernels<double> k{forward_f64_base, backward_f64_base, shared_f64_base, moments_f64_base, nullptr,
                                 "baseline"};
  return k;
}

// ---------------------------------------------------------------------------------------------------------------
// Matrix products: x (M, K) times w (N, K) transposed. float32 goes to oneDNN when this build of PyTorch has it
// (inside the team the call runs on the calling thread: oneDNN does not start threads inside a parallel region).

using LinearOp = c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                 c10::string_view, c10::List<std::optional<c10::Scalar>>,
                                                 std::optional<c10::string_view>)>;

const std::optional<LinearOp>& onednn_linear() {
  static const std::optional<LinearOp> op = []() -> std::optional<LinearOp> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                                c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>)>();
  }();
  return op;
}

bool use_onednn = true;

bool onednn_for(const Tensor& x) { return use_onednn && onednn_linear().has_value() && x.scalar_type() == at::kFloat; }

// w, prepared once per call for the products of every timestep: oneDNN's own blocked layout when available
// (about 10-20 % faster per product at these sizes than handing it the plain matrix each time).
Tensor prepare_weight(const Tensor& w, int64_t rows) {
  if (!onednn_for(w)) return w;
  using ReorderOp = c10::TypedOperatorHandle<Tensor(const Tensor&, std::optional<int64_t>)>;
  static const auto reorder = []() -> std::optional<ReorderOp> {
    auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<Tensor(const Tensor&, std::optional<int64_t>)>();
  }();
  if (!reorder.has_value()) return w;
  return reorder->call(w, rows);
}

Tensor matmul_nt(const Tensor& x, const Tensor& w) {
  if (onednn_for(x))
    return onednn_linear()->call(x, w, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  return at::mm(x, w.t());
}

// The dW_h product over the whole sequence: rows [r0, r1) of the result in `blocks` fixed blocks (the threads asked
// for), each computed by one call on one thread, the blocks shared among the `running` threads. So its numbers
// depend on the blocks, never on how many threads run them: a team that has fallen back to one thread (another
// process holds a core) runs it alone, with the same bits, instead of waiting for the busy core.
template <typename Body>
void in_row_blocks(int64_t rows, int64_t blocks, int64_t running, const Body& body) {
  const auto parts = split_rows(blocks, rows);
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(running, static_cast<int64_t>(parts.size())));
#pragma omp parallel num_threads(n)
  {
    omp_set_num_threads(1);  // the call inside stays on this thread (see forward_impl)
    c10::AutoGradMode no_grad(false);
    for (int64_t c = omp_get_thread_num(); c < static_cast<int64_t>(parts.size()); c += omp_get_num_threads())
      body(parts[c].first, parts[c].second);
  }
}

bool use_packed = true;

template <typename T>
bool uses_packed_gemm(const Kernels<T>& k) {
  return std::is_same_v<T, float> && use_packed && k.gemm != nullptr;
}

// C (rows, ldc) = A (rows, K; row stride lda) times the packed B, on the calling thread (float32 only).
template <typename T>
void step_product(const Kernels<T>& k, const T* A, int64_t lda, int64_t rows, const Tensor& packed, T* C,
                  int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    k.gemm(A, lda, rows, packed.data_ptr<float>(), packed.size(1), packed.size(0), C, ldc);
  }
}

// A thread's rows of A (row stride lda; rows of `source`, a (B, K) tensor, from row b0) times the prepared weight,
// C with row stride ldc: the packed product into `buffer`, or matmul_nt of the rows as a tensor, kept alive in
// `product`. One product per block of the team, so that a row's result never depends on how many rows a thread
// has (with several blocks the unpacked products are copied into `buffer`).
template <typename T>
const T* rows_product(const Kernels<T>& k, bool packed, const Team<T>& team, int64_t id, const T* A, int64_t lda,
                      const Tensor& source, int64_t b0, const Tensor& weight, std::vector<T>& buffer, int64_t ldc,
                      Tensor& product) {
  const bool one_block = team.first_block[id + 1] - team.first_block[id] == 1;
  if (!packed && one_block) {
    product = matmul_nt(source.narrow(0, b0, team.starts[team.first_block[id] + 1] - b0), weight);
    return product.data_ptr<T>();
  }
  team.for_each_block(id, [&](int64_t, int64_t r0, int64_t r1) {
    if (packed) {
      step_product(k, A + r0 * lda, lda, r1 - r0, weight, buffer.data() + r0 * ldc, ldc);
    } else {
      const Tensor part = matmul_nt(source.narrow(0, b0 + r0, r1 - r0), weight);
      std::copy(part.data_ptr<T>(), part.data_ptr<T>() + part.numel(), buffer.data() + r0 * ldc);
    }
  });
  return buffer.data();
}

// Where the time of the last call went, per thread: [matrix products, elementwise, waiting at barriers] in
// seconds, for the forward and the backward (scripts/bench.py reports it).
std::array<std::array<double, 3>, kMaxTeam> forward_profile{}, backward_profile{};
double backward_weight_gradient_seconds = 0;

// ---------------------------------------------------------------------------------------------------------------
// Drivers.

using Terms = std::array<const TermSpec*, 3>;  // input, recurrent, cell

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? const_cast<T*>(t.data_ptr<T>()) : nullptr;
}

template <typename T>
void fill_terms(Problem<T>& p, const Terms& terms) {
  Term<T>* targets[3] = {&p.in, &p.hh, &p.cell};
  for (int i = 0; i < 3; ++i) {
    Term<T>& term = *targets[i];
    const TermSpec& spec = *terms[i];
    term.kind = spec.kind;
    term.features = i == 2 ? p.hidden : 4 * p.hidden;
    term.eps = static_cast<T>(spec.eps);
    term.gamma = ptr_or_null<T>(spec.gamma);
    term.beta = ptr_or_null<T>(spec.beta);
    term.scale = ptr_or_null<T>(spec.scale);
    term.center = ptr_or_null<T>(spec.mean);
    TORCH_CHECK(spec.kind != kAffine || (term.scale && term.center), "an affine term needs its scale and mean");
  }
}

// Fills the sizes and inputs of p. Returns the tensors p points into that the caller must keep alive: the
// per-timestep counts of active examples and the mask (all true when there is none, so that every loop has the
// same shape: a null mask made GCC leave some of them unvectorized).
template <typename T>
std::pair<Tensor, Tensor> setup(Problem<T>& p, const Tensor& P, const Tensor& bias, const Terms& terms,
                                const Tensor& mask) {
  p.steps = P.size(0);
  p.batch = P.size(1);
  p.hidden = P.size(2) / 4;
  p.P = P.data_ptr<T>();
  p.bias = ptr_or_null<T>(bias);
  const bool given = mask.defined() && mask.numel() > 0;
  const OmpThreads one(1);  // (steps, batch): not worth a team
  Tensor active = given ? mask.contiguous() : at::ones({p.steps, p.batch}, P.options().dtype(at::kBool));
  p.mask = active.data_ptr<bool>();
  Tensor count = given ? mask.to(P.scalar_type()).sum(1).contiguous()
                       : at::full({p.steps}, double(p.batch), P.options());
  p.count = count.data_ptr<T>();
  fill_terms(p, terms);
  return {count, active};
}
// With shared statistics the normalization of the projection is the same map at every position.
template <typename T>
void load_shared_stats(const Problem<T>& p, Scratch<T>& s) {
  if (p.in.kind != kShared) return;
  for (int64_t k = 0; k < 4 * p.hidden; ++k) {
    s.mx[k] = p.in.mean[k];
    s.rx[k] = Math<T>::rsqrt(p.in.var[k] + p.in.eps);
  }
  input_coefficients(p.in, p.bias, s.rx.data(), s.ax.data(), s.cx.data(), 4 * p.hidden);
}

// Mean and biased variance over the active rows of x (N, F) (mask (N) or empty): the statistics of an input term
// normalized with statistics shared over time and batch, as recurrent_bn.norm.batch_statistics computes them.
template <typename T>
std::vector<Tensor> column_moments_impl(const Tensor& x, const Tensor& mask, int64_t threads, int64_t running) {
  const int64_t N = x.size(0), F = x.size(1);
  const Tensor active = mask.defined() && mask.numel() > 0 ? mask.contiguous()
                                                           : at::ones({N}, x.options().dtype(at::kBool));
  const bool* m = active.data_ptr<bool>();
  const int64_t team = std::max<int64_t>(1, std::min<int64_t>(threads, N));
  std::vector<T> means(team * F), m2s(team * F), counts(team);
  const T* data = x.data_ptr<T>();
  const Kernels<T>& k = kernels<T>();
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min(running, team)))
  {
    omp_set_num_threads(1);  // see forward_impl
    // The chunks go round the threads the runtime gave, which may be fewer than asked (see run_team).
    for (int64_t j = omp_get_thread_num(); j < team; j += omp_get_num_threads()) {
      const int64_t r0 = N * j / team, r1 = N * (j + 1) / team;
      int64_t c = 0;
      for (int64_t r = r0; r < r1; ++r) c += is_active(m, r);
      counts[j] = T(c);
      k.moments(data + r0 * F, F, r1 - r0, F, m + r0, T(c), means.data() + j * F, m2s.data() + j * F);
    }
  }
  T total = 0;
  for (T c : counts) total += c;
  const T denominator = total > T(0) ? total : T(1);
  Tensor mean = at::zeros({F}, x.options()), var = at::zeros({F}, x.options());
  T* mu = mean.data_ptr<T>();
  T* v = var.data_ptr<T>();
  for (int64_t j = 0; j < team; ++j)
    for (int64_t f = 0; f < F; ++f) mu[f] += counts[j] * means[j * F + f];
  for (int64_t f = 0; f < F; ++f) mu[f] /= denominator;
  for (int64_t j = 0; j < team; ++j)
    for (int64_t f = 0; f < F; ++f) {
      const T d = means[j * F + f] - mu[f];
      v[f] += m2s[j * F + f] + counts[j] * d * d;
    }
  for (int64_t f = 0; f < F; ++f) v[f] /= denominator;
  return {mean, var};
}

// Forward of one layer over the whole sequence.
// (statistics in ForwardResult.saved, what the backward needs there too when save; P is added by lstm_forward).
template <typename T>
ForwardResult forward_impl(const Tensor& P, const Tensor& h0, const Tensor& c0, const Tensor& W, const Tensor& bias,
                           const Terms& terms, const Tensor& mask, bool save, int64_t threads) {
  Problem<T> p;
  const auto prepared = setup(p, P, bias, terms, mask);
  const Tensor p_mask = prepared.second.view({-1});
  const int64_t S = p.steps, B = p.batch, H = p.hidden, G = 4 * H;
  const auto opts = P.options();
  p.save = save;
  ForwardResult result;
  Saved& saved = result.saved;
  // The intermediates come from the workspace (kept between calls); what the caller keeps uses the allocator.
  const int64_t states = save ? S + 1 : 2;
  Tensor hs = workspace_empty({states, B, H}, opts), cs = workspace_empty({states, B, H}, opts);
  hs.select(0, 0).copy_(h0);
  cs.select(0, 0).copy_(c0);
  Tensor out = at::empty({S, B, H}, opts);
  Tensor none = at::empty({0}, opts);
  saved.P = saved.hs = saved.cs = saved.A = saved.RH = saved.CH = saved.TC = none;
  if (save) {
    saved.hs = hs;
    saved.cs = cs;
    saved.A = workspace_empty({S, B, G}, opts);
    saved.TC = workspace_empty({S, B, H}, opts);
    if (terms[1]->kind != kNone) saved.RH = workspace_empty({S, B, G}, opts);
    if (terms[2]->kind == kBatch || terms[2]->kind == kLayer) saved.CH = workspace_empty({S, B, H}, opts);
  }
  p.hs = hs.data_ptr<T>();
  p.cs = cs.data_ptr<T>();
  p.out = out.data_ptr<T>();
  p.A = ptr_or_null<T>(saved.A);
  p.RH = ptr_or_null<T>(saved.RH);
  p.CH = ptr_or_null<T>(saved.CH);
  p.TC = ptr_or_null<T>(saved.TC);
  Term<T>* targets[3] = {&p.in, &p.hh, &p.cell};
  TermStats* stats[3] = {&saved.input, &saved.recurrent, &saved.cell};
  for (int i = 0; i < 3; ++i) {
    const int64_t F = i == 2 ? H : G;
    TermStats& st = *stats[i];
    st.mean = st.var = st.row_mean = st.row_rstd = none;
    if (terms[i]->kind == kBatch) {
      st.mean = at::empty({S, F}, opts);
      st.var = at::empty({S, F}, opts);
    } else if (terms[i]->kind == kShared) {
      // Statistics pooled over every active position of the sequence, before the loop.
      auto moments = column_moments_impl<T>(P.view({S * B, G}), p_mask, threads, team_running(threads));
      st.mean = moments[0];
      st.var = moments[1];
    } else if (terms[i]->kind == kLayer) {
      st.row_mean = at::empty({S, B}, opts);
      st.row_rstd = at::empty({S, B}, opts);
    }
    targets[i]->mean = ptr_or_null<T>(st.mean);
    targets[i]->var = ptr_or_null<T>(st.var);
    targets[i]->row_mean = ptr_or_null<T>(st.row_mean);
    targets[i]->row_rstd = ptr_or_null<T>(st.row_rstd);
  }

  const Kernels<T>& k = kernels<T>();
  const bool packed = uses_packed_gemm(k);
  const Tensor Wp = packed ? pack_panels(W) : prepare_weight(W, split_rows(threads, B)[0].second);
  const int64_t ldr = packed ? Wp.size(0) * kPanel : G;  // matmul_nt's products are (rows, G)
  for (auto& entry : forward_profile) entry = {0, 0, 0};

  run_team<T>(threads, B, G, [&](const TeamOverRows<T>& rows, int64_t id) {
    // Whatever runs inside (oneDNN's products, ATen) stays on this thread: with a team of one the region is
    // inactive, and oneDNN would otherwise fork a team of its own for every small product.
    omp_set_num_threads(1);
    c10::AutoGradMode no_grad(false);
    const Team<T>& team = rows.team;
    const auto [b0, b1] = rows.parts[id];
    Scratch<T> s;
    s.init(b1 - b0, H);
    load_shared_stats(p, s);
    double matmul = 0, elementwise = 0;
    const double start = seconds();
    barrier_wait[id] = 0;
    std::vector<T> buffer((b1 - b0) * ldr);
    for (int64_t t = 0; t < S; ++t) {
      const double t0 = seconds();
      const int64_t cur = save ? t : (t & 1);
      Tensor product;
      const T* R = rows_product(k, packed, team, id, p.hs + (cur * B + b0) * H, H, hs.select(0, cur), b0, Wp, buffer,
                                ldr, product);
      const double t1 = seconds();
      k.forward(p, team, id, t, b0, b1, R, ldr, s);
      matmul += t1 - t0;
      elementwise += seconds() - t1;
    }
    const double total = seconds() - start;
    forward_profile[id] = {matmul, elementwise - barrier_wait[id], total - matmul - elementwise + barrier_wait[id]};
  });

  const int64_t last = save ? S : (S & 1);
  result.output = out;
  result.h = hs.select(0, last).clone();
  result.c = cs.select(0, last).clone();
  return result;
}

// Backward of forward_impl (save = true): the gradients of everything but x and W_x, and dP, the gradient of the
// projection, from which lstm_backward computes those two.
template <typename T>
BackwardResult backward_impl(const Tensor& dout, const Tensor& dhT, const Tensor& dcT, const Tensor& W,
                             const Tensor& bias, const Terms& terms, const Tensor& mask, const Saved& saved,
                             int64_t threads, Tensor& dP) {
  Problem<T> p;
  const Tensor& P = saved.P;
  const auto prepared = setup(p, P, bias, terms, mask);
  const Tensor& count = prepared.first;
  const int64_t S = p.steps, B = p.batch, H = p.hidden, G = 4 * H;
  const auto opts = P.options();
  p.save = true;
  const Tensor& hs = saved.hs;
  p.hs = hs.data_ptr<T>();
  p.cs = saved.cs.data_ptr<T>();
  p.A = saved.A.data_ptr<T>();
  p.RH = ptr_or_null<T>(saved.RH);
  p.CH = ptr_or_null<T>(saved.CH);
  p.TC = saved.TC.data_ptr<T>();
  Term<T>* targets[3] = {&p.in, &p.hh, &p.cell};
  const TermStats* stats[3] = {&saved.input, &saved.recurrent, &saved.cell};
  for (int i = 0; i < 3; ++i) {
    targets[i]->mean = ptr_or_null<T>(stats[i]->mean);
    targets[i]->var = ptr_or_null<T>(stats[i]->var);
    targets[i]->row_mean = ptr_or_null<T>(stats[i]->row_mean);
    targets[i]->row_rstd = ptr_or_null<T>(stats[i]->row_rstd);
  }
  // The copies around the loop run on one thread while the team does (see OmpThreads).
  const int64_t glue = team_running(threads);
  Tensor dout_c = [&] {
    const OmpThreads scope(glue);
    return dout.contiguous();
  }();
  p.dout = dout_c.data_ptr<T>();
  Tensor dh = dhT.contiguous().clone(), dc = dcT.contiguous().clone();
  p.dh = dh.data_ptr<T>();
  p.dc = dc.data_ptr<T>();
  Tensor DR = workspace_empty({S, B, G}, opts);
  dP = workspace_empty({S, B, G}, opts);
  p.DR = DR.data_ptr<T>();
  p.dP = dP.data_ptr<T>();

  // One set of sums per block of the team (the blocks are fixed by `threads`, whoever runs them).
  std::vector<Accumulators<T>> accs(split_rows(threads, B).size());
  for (auto& acc : accs) acc.init(p);
  const Kernels<T>& k = kernels<T>();
  const bool packed = uses_packed_gemm(k);
  // dh_{t-1} = DR_t W_h, the product with W_h^T transposed.
  const Tensor WT = packed ? pack_panels(W.t()) : prepare_weight(W.t().contiguous(), split_rows(threads, B)[0].second);
  const int64_t ldh = packed ? WT.size(0) * kPanel : H;
  for (auto& entry : backward_profile) entry = {0, 0, 0};

  run_team<T>(threads, B, G, [&](const TeamOverRows<T>& rows, int64_t id) {
    omp_set_num_threads(1);  // see forward_impl
    c10::AutoGradMode no_grad(false);
    const Team<T>& team = rows.team;
    const auto [b0, b1] = rows.parts[id];
    Scratch<T> s;
    s.init(b1 - b0, H);
    load_shared_stats(p, s);
    double matmul = 0, elementwise = 0;
    const double start = seconds();
    barrier_wait[id] = 0;
    std::vector<T> buffer((b1 - b0) * ldh);
    for (int64_t t = S - 1; t >= 0; --t) {
      const double t0 = seconds();
      k.backward(p, team, id, t, b0, b1, s, accs.data());
      const double t1 = seconds();
      Tensor product;
      const T* g = rows_product(k, packed, team, id, p.DR + (t * B + b0) * G, G, DR.select(0, t), b0, WT, buffer,
                                ldh, product);
      const double t2 = seconds();
      const bool* mask_t = p.mask + t * B;
      for (int64_t b = b0; b < b1; ++b) {
        // Padded steps pass the gradient of the carried state through unchanged (their DR rows are zero).
        T* d = p.dh + b * H;
        const T* x = g + (b - b0) * ldh;
        if (is_active(mask_t, b)) {
          std::copy(x, x + H, d);
        } else {
          for (int64_t u = 0; u < H; ++u) d[u] += x[u];
        }
      }
      matmul += t2 - t1;
      elementwise += (t1 - t0) + (seconds() - t2);
    }
    const double total = seconds() - start;
    backward_profile[id] = {matmul, elementwise - barrier_wait[id], total - matmul - elementwise + barrier_wait[id]};
  });

  BackwardResult result;
  result.h0 = dh;
  result.c0 = dc;
  // Parameter gradients: the per-thread sums, and dW_h = sum_t DR_t^T h_{t-1} as one product.
  const double weight_start = seconds();
  // dW_h^T = H_prev^T DR as oneDNN's x w^T, DR as a transposed view (oneDNN reads it in place; MKL's mm of the
  // same product runs at half the rate on AMD CPUs).
  const Tensor DR2 = DR.view({S * B, G}), H2 = hs.narrow(0, 0, S).reshape({S * B, H});
  if (onednn_for(DR2)) {
    // oneDNN's x must be contiguous: H_prev^T is copied first (as oneDNN would), with the copies' thread count. The
    // blocks are rows of H_prev^T: oneDNN takes a block of rows of the transposed DR (a strided view) only with its
    // reference kernel, minutes at the pMNIST shape.
    Tensor H2t;
    {
      const OmpThreads scope(glue);
      H2t = H2.t().contiguous();
    }
    Tensor dWt = at::empty({H, G}, opts);
    in_row_blocks(H, threads, glue, [&](int64_t u0, int64_t u1) {
      dWt.narrow(0, u0, u1 - u0).copy_(matmul_nt(H2t.narrow(0, u0, u1 - u0), DR2.t()));
    });
    const OmpThreads scope(glue);
    result.weight_hh = dWt.t().contiguous();
  } else {
    result.weight_hh = at::mm(DR2.t(), H2);  // float64, or no oneDNN: MKL on the caller's threads (see projection)
  }
  backward_weight_gradient_seconds = seconds() - weight_start;
  // The sum over the blocks, in block order, of one of their vectors (given by `of`).
  auto reduce = [&](auto of, int64_t size) {
    Tensor total = at::zeros({size}, opts);
    T* d = total.data_ptr<T>();
    for (size_t j = 0; j < accs.size(); ++j) {
      const std::vector<T>& v = of(accs[j]);
      for (int64_t i = 0; i < size; ++i) d[i] += v[i];
    }
    return total;
  };
  Tensor none = at::empty({0}, opts);
  result.bias = p.bias ? reduce([](const Accumulators<T>& a) -> const std::vector<T>& { return a.dbias; }, G) : none;
  TermSums<T> Accumulators<T>::*sums_of[3] = {&Accumulators<T>::in, &Accumulators<T>::hh, &Accumulators<T>::cell};
  TermGrads* grads[3] = {&result.input, &result.recurrent, &result.cell};
  for (int i = 0; i < 3; ++i) {
    const int64_t F = i == 2 ? H : G;
    TermGrads& g = *grads[i];
    g.gamma = g.beta = g.scale = g.mean = none;
    const auto member = sums_of[i];
    const int64_t kind = terms[i]->kind;
    if (kind == kBatch || kind == kShared || kind == kLayer) {
      g.gamma = reduce([&](const Accumulators<T>& a) -> const std::vector<T>& { return (a.*member).dgamma; }, F);
      if (terms[i]->beta.numel() > 0)
        g.beta = reduce([&](const Accumulators<T>& a) -> const std::vector<T>& { return (a.*member).dbeta; }, F);
    } else if (kind == kAffine) {
      g.scale =
          reduce([&](const Accumulators<T>& a) -> const std::vector<T>& { return (a.*member).dscale; }, S * F)
              .view({S, F});
      if (terms[i]->beta.numel() > 0)
        g.beta = reduce([&](const Accumulators<T>& a) -> const std::vector<T>& { return (a.*member).dbeta; }, F);
    }
  }
  if (p.in.kind == kShared) {
    // Statistics shared over time couple every position: finish dP now that the sums over the sequence are known.
    const T N = std::max<T>(count.sum().item<T>(), T(1));
    auto in_sums = [](const Accumulators<T>& a) -> const TermSums<T>& { return a.in; };
    Tensor m1 = (reduce([&](const Accumulators<T>& a) -> const std::vector<T>& { return in_sums(a).dbeta; }, G) / N)
                    .contiguous();
    Tensor m2 = (reduce([&](const Accumulators<T>& a) -> const std::vector<T>& { return in_sums(a).dgamma; }, G) / N)
                    .contiguous();
    Tensor rstd = (saved.input.var.reshape({G}) + terms[0]->eps).rsqrt().contiguous();
    Tensor coef = (terms[0]->gamma * rstd).contiguous();
    const T* mean_ptr = p.in.mean;
    const T* rstd_ptr = rstd.data_ptr<T>();
    const T* coef_ptr = coef.data_ptr<T>();
    const T* m1_ptr = m1.data_ptr<T>();
    const T* m2_ptr = m2.data_ptr<T>();
    at::parallel_for(0, S * B, 64, [&](int64_t r0, int64_t r1) {
      k.shared(p, r0, r1, mean_ptr, rstd_ptr, coef_ptr, m1_ptr, m2_ptr);
    });
  }
  return result;
}

// x (T, B, I) times W_x (4H, I) transposed: the input projection of every timestep, (T, B, 4H), in the workspace.
// One product on the caller's threads, also when the team has fallen back. Not in blocks as dW_h: MKL behind at::mm
// keeps the thread count torch.set_num_threads gave it, so a block run alone would not be one thread's sum, and with
// oneDNN each block's result had to be copied into P (with dW_x in blocks too, the quiet pMNIST step was slower).
Tensor projection(const Tensor& x, const Tensor& weight_ih) {
  const int64_t S = x.size(0), B = x.size(1);
  Tensor P = workspace_empty({S * B, weight_ih.size(0)}, x.options());
  at::mm_out(P, x.reshape({S * B, x.size(2)}), weight_ih.t());
  return P.view({S, B, -1});
}

ForwardResult lstm_forward(const Tensor& x, const Tensor& weight_ih, const Tensor& h0, const Tensor& c0,
                           const Tensor& weight_hh, const Tensor& bias, const TermSpec& input,
                           const TermSpec& recurrent, const TermSpec& cell, const Tensor& mask, bool save,
                           int64_t threads) {
  TORCH_CHECK(x.dim() == 3 && weight_ih.dim() == 2 && weight_ih.size(0) % 4 == 0, "expected x (T, B, I), W_x (4H, I)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the fused LSTM supports float32 and float64");
  const Terms terms = {&input, &recurrent, &cell};
  c10::AutoGradMode no_grad(false);
  const Tensor P = projection(x, weight_ih);
  const Tensor Wc = weight_hh.contiguous();
  ForwardResult result = x.scalar_type() == at::kFloat
                             ? forward_impl<float>(P, h0, c0, Wc, bias, terms, mask, save, threads)
                             : forward_impl<double>(P, h0, c0, Wc, bias, terms, mask, save, threads);
  if (save) result.saved.P = P;
  return result;
}

BackwardResult lstm_backward(const Tensor& d_output, const Tensor& d_h, const Tensor& d_c, const Tensor& x,
                             const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& bias,
                             const TermSpec& input, const TermSpec& recurrent, const TermSpec& cell,
                             const Tensor& mask, const Saved& saved, int64_t threads, bool need_dx) {
  TORCH_CHECK(saved.P.defined() && saved.P.numel() > 0 && saved.A.numel() > 0,
              "lstm_backward needs what lstm_forward saved with save=true");
  const Terms terms = {&input, &recurrent, &cell};
  c10::AutoGradMode no_grad(false);
  const Tensor Wc = weight_hh.contiguous();
  Tensor dP;
  BackwardResult result =
      x.scalar_type() == at::kFloat
          ? backward_impl<float>(d_output, d_h, d_c, Wc, bias, terms, mask, saved, threads, dP)
          : backward_impl<double>(d_output, d_h, d_c, Wc, bias, terms, mask, saved, threads, dP);
  // Through the projection: dx = dP W_x, dW_x = dP^T x (as oneDNN's x w^T with transposed views).
  const int64_t S = x.size(0), B = x.size(1), I = x.size(2);
  const Tensor dP2 = dP.view({S * B, -1});
  const Tensor x2 = x.reshape({S * B, I}).contiguous();
  // One product each on the caller's threads, as the projection (see there): in blocks of dW_x's rows, a one-column x
  // (pMNIST) made one block, on one thread.
  result.x = need_dx ? matmul_nt(dP2, weight_ih.t().contiguous()).view({S, B, I}) : at::empty({0}, x.options());
  result.weight_ih = onednn_for(dP2) ? matmul_nt(x2.t(), dP2.t()).t().contiguous() : at::mm(dP2.t(), x2);
  return result;
}

std::string kernel_variant() { return float_kernels().name; }

void set_onednn(bool enabled) { use_onednn = enabled; }

void set_packed_gemm(bool enabled) { use_packed = enabled; }

void set_barrier_spin(double seconds) { spin_seconds.store(seconds); }

void set_team_fallback(bool enabled) { team_fallback.store(enabled); }

void run_solo(int64_t calls) { solo_calls_left.store(calls); }

int64_t set_omp_threads(int64_t threads) {
  const int64_t before = omp_get_max_threads();
  omp_set_num_threads(static_cast<int>(std::max<int64_t>(threads, 1)));
  return before;
}

bool onednn_available() { return onednn_linear().has_value(); }

std::vector<std::vector<double>> last_profile() {
  std::vector<std::vector<double>> rows;
  for (const auto& table : {forward_profile, backward_profile}) {
    std::vector<double> row;
    for (const auto& entry : table) row.insert(row.end(), entry.begin(), entry.end());
    rows.push_back(row);
  }
  rows.push_back({backward_weight_gradient_seconds});
  return rows;
}

}  // namespace rbn
