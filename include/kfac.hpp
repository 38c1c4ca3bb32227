// kfac.hpp: a header-only C++17 RAII wrapper over kfac.h.
//
// Handles are move-only and freed by their destructors; every failing call
// throws kfac::Error carrying the status and the library's message. An
// object serves one call at a time: a call while another thread uses it
// throws kfac::Error with KFAC_ERR_BUSY (share objects across threads only
// with your own locking). Matrix
// arguments are span-like views (pointer, rows, cols, leading dimension),
// row-major, read or written only during the call. Every function of
// kfac.h is reachable from here (a test checks it).
#ifndef KFAC_HPP
#define KFAC_HPP

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kfac.h"

namespace kfac {

/// A failed call: the status and kfac_last_error()'s message.
class Error : public std::runtime_error {
 public:
  Error(KfacStatus status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  KfacStatus status() const noexcept { return status_; }
  /// The status's static description (kfac_status_string).
  const char* status_string() const noexcept { return kfac_status_string(status_); }

 private:
  KfacStatus status_;
};

/// Throws kfac::Error unless `s` is KFAC_OK.
inline void check(KfacStatus s) {
  if (s != KFAC_OK) throw Error(s, kfac_last_error());
}

/// The library version ("0.1.0") and its number (major*10000+minor*100+patch).
inline std::string version_string() { return kfac_version_string(); }
inline std::uint32_t version() noexcept { return kfac_version(); }
/// The ABI version of the library; equals KFAC_ABI_VERSION of a matching header.
inline std::uint32_t abi_version() noexcept { return kfac_abi_version(); }
/// Whether the library was built with MPI (Comm::mpi works).
inline bool has_mpi() noexcept { return kfac_has_mpi() != 0; }
/// Throws kfac::Error with KFAC_ERR_PANIC (tests that no panic escapes).
inline void test_panic() { check(kfac_test_panic()); }

/// kfac_config_default: the documented defaults, struct_size set.
inline KfacConfig default_config() {
  KfacConfig c;
  check(kfac_config_default(&c, sizeof c));
  return c;
}
/// kfac_config_kfac_pytorch: kfac-pytorch 0.4's defaults and conventions.
inline KfacConfig kfac_pytorch_config() {
  KfacConfig c;
  check(kfac_config_kfac_pytorch(&c, sizeof c));
  return c;
}
/// kfac_collectives_init: zeroed, struct_size set; fill in the callbacks.
inline KfacCollectives collectives() {
  KfacCollectives c;
  check(kfac_collectives_init(&c, sizeof c));
  return c;
}

/// A row-major matrix view: `rows x cols`, `ld` elements between rows.
template <class T>
struct MatrixView {
  T* data;
  std::size_t rows;
  std::size_t cols;
  std::size_t ld;
};

/// A communicator (single process, shared-memory group, MPI or callbacks).
class Comm {
 public:
  static Comm local() {
    KfacComm* h = nullptr;
    check(kfac_comm_local(&h));
    return Comm(h);
  }
  /// Joins the group of this process's environment (kfac-launch, RANK, ...).
  static Comm shm_from_env(std::uint64_t timeout_ms = 60000) {
    KfacComm* h = nullptr;
    check(kfac_comm_shm_from_env(timeout_ms, &h));
    return Comm(h);
  }
  /// Joins (rank 0: creates) the shared-memory group `group`.
  static Comm shm_join(const std::string& group, std::uint32_t rank, std::uint32_t world_size,
                       std::uint64_t timeout_ms = 60000) {
    KfacComm* h = nullptr;
    check(kfac_comm_shm_join(group.c_str(), rank, world_size, timeout_ms, &h));
    return Comm(h);
  }
  /// Over an MPI communicator, passed as MPI_Comm_c2f(comm) (see kfac.h).
  static Comm mpi(std::int32_t fortran_comm, bool hierarchical = false,
                  std::uint64_t timeout_ms = 60000) {
    KfacComm* h = nullptr;
    check(kfac_comm_mpi(fortran_comm, hierarchical ? 1u : 0u, timeout_ms, &h));
    return Comm(h);
  }
  /// Over caller collectives (start from kfac::collectives()).
  static Comm from_callbacks(const KfacCollectives& c) {
    KfacComm* h = nullptr;
    check(kfac_comm_from_callbacks(&c, &h));
    return Comm(h);
  }
  Comm(Comm&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  Comm& operator=(Comm&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;
  ~Comm() { reset(); }
  std::pair<std::uint32_t, std::uint32_t> rank_and_size() const {
    std::uint32_t r = 0, w = 0;
    check(kfac_comm_rank(h_, &r, &w));
    return {r, w};
  }
  KfacComm* get() const noexcept { return h_; }

 private:
  explicit Comm(KfacComm* h) : h_(h) {}
  void reset() noexcept {
    if (h_) (void)kfac_comm_free(h_);
    h_ = nullptr;
  }
  KfacComm* h_ = nullptr;
};

/// A K-FAC preconditioner.
class Preconditioner {
 public:
  static KfacConfig default_config() { return kfac::default_config(); }
  static KfacConfig kfac_pytorch_config() { return kfac::kfac_pytorch_config(); }
  /// `comm` may be null (single process); its connection is taken over on
  /// success only (when this throws, `comm` is untouched and usable).
  explicit Preconditioner(const KfacConfig& cfg, Comm* comm = nullptr) {
    check(kfac_precond_create(&cfg, comm ? comm->get() : nullptr, &h_));
  }
  static Preconditioner load(const std::vector<unsigned char>& bytes, Comm* comm = nullptr) {
    KfacPrecond* h = nullptr;
    check(kfac_load(bytes.data(), bytes.size(), comm ? comm->get() : nullptr, &h));
    return Preconditioner(h);
  }
  Preconditioner(Preconditioner&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  Preconditioner& operator=(Preconditioner&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  Preconditioner(const Preconditioner&) = delete;
  Preconditioner& operator=(const Preconditioner&) = delete;
  ~Preconditioner() { reset(); }

  std::uint32_t add_linear(const std::string& name, std::size_t in, std::size_t out, bool bias) {
    std::uint32_t id = 0;
    check(kfac_register_linear(h_, name.c_str(), in, out, bias ? 1u : 0u, &id));
    return id;
  }
  /// A conv2d layer (groups = 1); `layout` is KFAC_LAYOUT_NCHW or
  /// KFAC_LAYOUT_NHWC.
  std::uint32_t add_conv2d(const std::string& name, std::size_t in_channels,
                           std::size_t out_channels, std::size_t kernel_h, std::size_t kernel_w,
                           std::size_t stride, std::size_t padding, bool bias,
                           KfacLayout layout = KFAC_LAYOUT_NCHW, std::size_t dilation = 1) {
    std::uint32_t id = 0;
    check(kfac_register_conv2d(h_, name.c_str(), in_channels, out_channels, kernel_h, kernel_w,
                               stride, stride, padding, padding, dilation, dilation,
                               bias ? 1u : 0u, static_cast<std::uint32_t>(layout), &id));
    return id;
  }
  /// An embedding (weight `num x dim`).
  std::uint32_t add_embedding(const std::string& name, std::size_t num, std::size_t dim) {
    std::uint32_t id = 0;
    check(kfac_register_embedding(h_, name.c_str(), num, dim, &id));
    return id;
  }
  /// Conv2d input `(n, C_in, h, w)` and output gradients, dense in the
  /// layer's layout; sizes are checked by the library.
  void observe_conv2d(std::uint32_t id, const float* input, const float* output_grads,
                      std::size_t n, std::size_t h, std::size_t w) {
    check(kfac_observe_conv2d(h_, id, input, output_grads, n, h, w));
  }
  /// Token ids and output gradients `tokens.size() x dim`.
  void observe_embedding(std::uint32_t id, const std::vector<std::uint64_t>& tokens,
                         MatrixView<const float> g) {
    if (tokens.size() != g.rows) throw Error(KFAC_ERR_SHAPE, "tokens and gradients differ in rows");
    check(kfac_observe_embedding(h_, id, tokens.data(), tokens.size(), g.data, g.ld));
  }
  /// Statistics and stage timings of the last step.
  KfacStepStats last_stats() const {
    KfacStepStats s{};
    s.struct_size = sizeof s;
    check(kfac_last_stats(h_, &s));
    return s;
  }
  /// kfac_set_grad_scale: the AMP loss scale; observed output gradients
  /// are divided by it.
  void set_grad_scale(double scale) { check(kfac_set_grad_scale(h_, scale)); }
  /// The id of the layer registered under `name`.
  std::uint32_t layer_id(const std::string& name) const {
    std::uint32_t id = 0;
    check(kfac_layer_id(h_, name.c_str(), &id));
    return id;
  }
  /// The name of layer `id`.
  std::string layer_name(std::uint32_t id) const {
    std::size_t n = 0;
    KfacStatus s = kfac_layer_name(h_, id, nullptr, 0, &n);
    if (s != KFAC_ERR_BUFFER_TOO_SMALL) check(s);
    std::string out(n + 1, '\0');
    check(kfac_layer_name(h_, id, out.data(), out.size(), &n));
    out.resize(n);
    return out;
  }
  /// A layer's kind (a KfacLayerKind value) and factor sizes.
  struct LayerInfo {
    std::uint32_t kind;
    std::size_t d_a;
    std::size_t d_g;
  };
  LayerInfo layer_info(std::uint32_t id) const {
    LayerInfo i{};
    check(kfac_layer_info(h_, id, &i.kind, &i.d_a, &i.d_g));
    return i;
  }
  /// Layer `id`'s factors A (`d_a x d_a`) and G (`d_g x d_g`), row-major.
  std::pair<std::vector<float>, std::vector<float>> factors(std::uint32_t id) const {
    LayerInfo i = layer_info(id);
    std::vector<float> a(i.d_a * i.d_a), g(i.d_g * i.d_g);
    check(kfac_get_factors(h_, id, a.data(), i.d_a, g.data(), i.d_g));
    return {std::move(a), std::move(g)};
  }
  /// A layer's decomposition: `kind` a KfacDecompositionKind; `a`, `g`
  /// row-major (eigenvectors or damped inverses); `la`, `lg` eigenvalues
  /// (empty for the inverse method).
  struct Decomposition {
    std::uint32_t kind;
    std::vector<float> a, la, g, lg;
  };
  Decomposition decomposition(std::uint32_t id) const {
    LayerInfo i = layer_info(id);
    Decomposition d{0, std::vector<float>(i.d_a * i.d_a), std::vector<float>(i.d_a),
                    std::vector<float>(i.d_g * i.d_g), std::vector<float>(i.d_g)};
    check(kfac_get_decomposition(h_, id, &d.kind, d.a.data(), i.d_a, d.la.data(), d.g.data(),
                                 i.d_g, d.lg.data()));
    if (d.kind == KFAC_DECOMPOSITION_INVERSE) {
      d.la.clear();
      d.lg.clear();
    }
    return d;
  }
  /// Number of completed steps.
  std::uint64_t steps() const {
    std::uint64_t n = 0;
    check(kfac_steps(h_, &n));
    return n;
  }
  /// Number of registered layers.
  std::size_t num_layers() const {
    std::size_t n = 0;
    check(kfac_num_layers(h_, &n));
    return n;
  }
  void observe_linear(std::uint32_t id, MatrixView<const float> a, MatrixView<const float> g) {
    if (a.rows != g.rows) throw Error(KFAC_ERR_SHAPE, "activations and gradients differ in rows");
    check(kfac_observe_linear(h_, id, a.data, a.rows, a.ld, g.data, g.ld));
  }
  KfacStepStats step(const std::vector<KfacGrad>& grads) {
    KfacStepStats s{};
    s.struct_size = sizeof s;
    check(kfac_step(h_, grads.data(), grads.size(), &s));
    return s;
  }
  void allreduce_gradients(const std::vector<KfacGrad>& grads) {
    check(kfac_allreduce_gradients(h_, grads.data(), grads.size()));
  }
  std::vector<unsigned char> save() const {
    std::size_t n = 0, written = 0;
    check(kfac_save_size(h_, &n));
    std::vector<unsigned char> b(n);
    check(kfac_save(h_, b.data(), b.size(), &written));
    b.resize(written);
    return b;
  }
  KfacPrecond* get() const noexcept { return h_; }

 private:
  explicit Preconditioner(KfacPrecond* h) : h_(h) {}
  void reset() noexcept {
    if (h_) (void)kfac_precond_free(h_);
    h_ = nullptr;
  }
  KfacPrecond* h_ = nullptr;
};

}  // namespace kfac

#endif  // KFAC_HPP
