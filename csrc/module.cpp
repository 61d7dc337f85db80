// Makes the operator library importable as `catalyst_fused._C`; importing it runs the TORCH_LIBRARY
// registrations. The operators are reached through torch.ops.catalyst_fused; the one Python binding here is
// cf.penalty_'s lean path for CPU tensors (penalty_inplace_lean below).
#include <Python.h>

#include "cpu/penalty_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace {

// Whether torch.ops.catalyst_fused.penalty_accumulate_selected_ would hand these tensors straight to its
// CPU kernel: exactly torch.Tensor or nn.Parameter (no subclass: DTensor, FakeTensor, __torch_function__),
// the dispatch keys of a plain dense CPU tensor (no Python key, no functorch wrapper, no neg/conj view).
bool plain_cpu_impl(const c10::TensorImpl* t) {
  static const c10::DispatchKeySet plain = at::empty({0}).key_set();
  return t->key_set() == plain && t->device_type() == c10::kCPU && t->layout() == at::kStrided;
}

bool plain_cpu_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) && plain_cpu_impl(THPVariable_Unpack(obj).unsafeGetTensorImpl());
}

// Brings the metadata of a list's tensors and of their .grad tensors into the cache before the checks walk
// it. A training step reaches the penalty with that metadata evicted (forward and backward stream the
// activations through the cache), and the checks follow each tensor's chain of pointers (Python object ->
// TensorImpl -> autograd meta -> .grad's TensorImpl -> storage) one link at a time: a memory latency per
// link per tensor, serialised. Walking the chains level by level over all tensors lets the misses of a
// level overlap. Only reads and prefetch hints: nothing is decided here.
void prefetch_metadata(PyObject* seq) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  // A prefetch never faults, so null or stale addresses are harmless: no checks in these loops.
  auto lines = [](const void* p, int count) {
    for (int k = 0; k < count; ++k) __builtin_prefetch(static_cast<const char*>(p) + 64 * k);
  };
  constexpr int kImplLines = static_cast<int>((sizeof(c10::TensorImpl) + 63) / 64);
  for (Py_ssize_t i = 0; i < n; ++i) lines(items[i], 1);
  std::vector<c10::TensorImpl*> impls;  // the weights' or catalysts' impls, then their .grad impls
  impls.reserve(2 * n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(items[i])) continue;
    c10::TensorImpl* impl = THPVariable_Unpack(items[i]).unsafeGetTensorImpl();
    lines(impl, kImplLines);
    impls.push_back(impl);
  }
  const size_t tensors = impls.size();
  for (size_t i = 0; i < tensors; ++i) {
    lines(impls[i]->unsafe_storage().unsafeGetStorageImpl(), 1);
    lines(impls[i]->autograd_meta(), 2);
  }
  for (size_t i = 0; i < tensors; ++i) {
    const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impls[i]->autograd_meta());
    if (meta == nullptr || !meta->grad_.defined()) continue;
    c10::TensorImpl* grad = meta->grad_.unsafeGetTensorImpl();
    lines(grad, kImplLines);
    impls.push_back(grad);
  }
  for (size_t i = tensors; i < impls.size(); ++i) lines(impls[i]->unsafe_storage().unsafeGetStorageImpl(), 1);
  // The first lines of every tensor's data (and .grad's): the hardware prefetcher only follows a stream once
  // it has started, and many of these tensors are short (BatchNorm vectors of 16-64 channels: 1-4 lines).
  try {
    for (c10::TensorImpl* impl : impls) {
      const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
      if (storage == nullptr || !plain_cpu_impl(impl)) continue;
      lines(static_cast<const char*>(storage->data()) + impl->storage_offset() * impl->itemsize(), 2);
    }
  } catch (const std::exception&) {
    // storage->data() refuses some storages; the checks after this reject such tensors with their own error.
  }
}

// The tensors of a list or tuple (and their Python objects), or false if it is anything else or holds anything
// but plain CPU tensors.
bool unpack(PyObject* seq, std::vector<at::Tensor>& out, std::vector<PyObject*>& objs) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;  // other iterables: the Python path
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  if (n == 0) return false;
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!plain_cpu_tensor(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
  objs.assign(items, items + n);
  return true;
}

// cf.penalty_'s selection: tensors that require grad get a gradient, and must be leaves. Returns false for a
// non-leaf that requires grad (the Python path raises its error) or an existing .grad that is not a plain CPU
// tensor (the operator path would dispatch on it).
bool select(const std::vector<at::Tensor>& tensors, std::vector<at::Tensor>& grads, std::vector<int64_t>& index) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (!t.requires_grad()) continue;
    if (!t.is_leaf()) return false;
    const at::Tensor& g = t.grad();
    if (g.defined()) {
      PyObject* obj = THPVariable_Wrap(g);  // the existing Python object of the .grad (new reference)
      if (obj == nullptr) throw python_error();
      const bool plain = plain_cpu_tensor(obj);
      Py_DECREF(obj);
      if (!plain) return false;
    }
    grads.push_back(g);
    index.push_back(static_cast<int64_t>(i));
  }
  return true;
}

// Whether the tensors have the shapes a GroupLayout was built for: `key` is its int64 shape key
// ([T, S, then ndim and sizes of every weight, then the size of every segment]).
bool layout_matches(const at::Tensor& key, const std::vector<at::Tensor>& weights,
                    const std::vector<at::Tensor>& catalysts) {
  if (!key.device().is_cpu() || key.scalar_type() != at::kLong || key.dim() != 1 || !key.is_contiguous()) {
    return false;
  }
  const int64_t* k = key.const_data_ptr<int64_t>();
  const int64_t* end = k + key.numel();
  if (end - k < 2 || k[0] != static_cast<int64_t>(weights.size()) || k[1] != static_cast<int64_t>(catalysts.size())) {
    return false;
  }
  k += 2;
  for (const at::Tensor& w : weights) {
    if (k >= end || *k++ != w.dim() || end - k < w.dim()) return false;
    for (int64_t size : w.sizes()) {
      if (*k++ != size) return false;
    }
  }
  for (const at::Tensor& d : catalysts) {
    if (k >= end || d.dim() != 1 || *k++ != d.size(0)) return false;
  }
  return k == end;
}

// ---- The facts of the last calls that passed -------------------------------------------------------------
//
// A training step calls cf.penalty_ with the same tensors every time. The checks above and those of the
// operator cost about 1.5 us a tensor (hundreds of calls through libtorch, a reference count that goes
// 1 -> 2 -> 1 on every tensor, which in torch 2.13 increfs and decrefs its Python object through the
// interpreter, and the plan's key rebuilt and compared): more than the kernels of a small network. So the
// facts every one of those checks depends on are recorded after a call passes them, and the next call
// compares its arguments with them field by field; if all hold, every check would pass again with the
// same plan, and the kernels run at once. Anything different takes the full path, which records anew.

// One weight or catalyst: what select(), unpack(), layout_matches() and the operator's checks read.
struct TensorFacts {
  PyObject* obj;  // identity only; the facts below are re-read, never trusted
  c10::TensorImpl* impl;
  const c10::StorageImpl* storage;
  const void* data;
  int64_t offset;
  size_t nbytes;
  const torch::autograd::AutogradMeta* meta;
  bool requires_grad;
  // The .grad of a tensor that requires grad (all null otherwise).
  c10::TensorImpl* grad;
  const c10::StorageImpl* grad_storage;
  const void* grad_data;
  int64_t grad_offset;
  size_t grad_nbytes;
};

struct CallFacts {
  std::vector<TensorFacts> weights, catalysts;
  std::vector<int64_t> sizes;  // dim and sizes of every weight, then of every catalyst
  caffe2::TypeMeta dtype;
  int threads = 0;
  // The layout: its member table and shape key (Python objects and contents); None for per-row.
  PyObject* plan_obj = nullptr;
  PyObject* key_obj = nullptr;
  std::vector<int64_t> plan_content, key_content;
  std::vector<int64_t> weight_index, catalyst_index;  // selected tensors; both empty when all are
  std::shared_ptr<const void> prepared;                // plan and schedule of the operator's kernels
};

// The calls that passed last, most recent first: a step may make more than one call (and a benchmark
// alternates between sets).
constexpr size_t kRecordedCalls = 8;
std::mutex recorded_mutex;
std::vector<std::shared_ptr<const CallFacts>> recorded;

// Whether `call` is about these argument objects (same lists' first objects and lengths, same layout).
bool same_call(const CallFacts& call, PyObject* const* args) {
  PyObject* ws = args[0];
  PyObject* ds = args[1];
  return static_cast<size_t>(PySequence_Fast_GET_SIZE(ws)) == call.weights.size() &&
         static_cast<size_t>(PySequence_Fast_GET_SIZE(ds)) == call.catalysts.size() && !call.weights.empty() &&
         !call.catalysts.empty() && PySequence_Fast_ITEMS(ws)[0] == call.weights[0].obj &&
         PySequence_Fast_ITEMS(ds)[0] == call.catalysts[0].obj && args[3] == call.plan_obj && args[4] == call.key_obj;
}

std::shared_ptr<const CallFacts> find_recorded(PyObject* const* args) {
  std::lock_guard<std::mutex> lock(recorded_mutex);
  for (const auto& call : recorded) {
    if (same_call(*call, args)) return call;
  }
  return nullptr;
}

void keep_recorded(std::shared_ptr<const CallFacts> call, PyObject* const* args) {
  std::lock_guard<std::mutex> lock(recorded_mutex);
  for (size_t i = 0; i < recorded.size(); ++i) {
    if (same_call(*recorded[i], args)) {
      recorded.erase(recorded.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  }
  if (call == nullptr) return;
  recorded.insert(recorded.begin(), std::move(call));
  if (recorded.size() > kRecordedCalls) recorded.pop_back();
}

// A tensor's storage, data and autograd facts, or false where the fast path must not rely on them (a
// view's autograd metadata derives its state; a non-leaf needs the full path's error).
bool read_facts(c10::TensorImpl* impl, TensorFacts& f) {
  f.impl = impl;
  f.storage = impl->unsafe_storage().unsafeGetStorageImpl();
  if (f.storage == nullptr) return false;
  f.data = f.storage->data_ptr().get();
  f.offset = impl->storage_offset();
  f.nbytes = f.storage->nbytes();
  f.meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
  f.requires_grad = false;
  f.grad = nullptr;
  f.grad_storage = nullptr;
  f.grad_data = nullptr;
  f.grad_offset = 0;
  f.grad_nbytes = 0;
  if (f.meta == nullptr) return true;
  if (f.meta->is_view_ || f.meta->grad_fn_) return false;
  f.requires_grad = f.meta->requires_grad_;
  if (!f.requires_grad) return true;
  if (!f.meta->grad_.defined()) return false;
  f.grad = f.meta->grad_.unsafeGetTensorImpl();
  f.grad_storage = f.grad->unsafe_storage().unsafeGetStorageImpl();
  if (f.grad_storage == nullptr) return false;
  f.grad_data = f.grad_storage->data_ptr().get();
  f.grad_offset = f.grad->storage_offset();
  f.grad_nbytes = f.grad_storage->nbytes();
  return true;
}

bool same_sizes(const c10::TensorImpl* impl, const int64_t*& sizes) {
  const auto actual = impl->sizes();
  if (*sizes++ != static_cast<int64_t>(actual.size())) return false;
  for (int64_t s : actual) {
    if (*sizes++ != s) return false;
  }
  return true;
}

// Whether objs[i] are the tensors facts[i] describe, with every fact unchanged. Level by level over all
// tensors: each level follows only pointers that the level before read from the live objects and found
// equal to the recorded ones (a recorded object may be gone), and its loop body is short, so that the
// cache misses of different tensors overlap. A cold call (a training step evicts all this metadata)
// otherwise pays several memory latencies per tensor, one after the other.
bool all_hold(const std::vector<PyObject*>& objs, const std::vector<const TensorFacts*>& facts,
              const CallFacts& call) {
  const size_t n = objs.size();
  std::vector<const int64_t*> sizes_at(n);
  // 1: the Python objects and their impls
  for (size_t i = 0; i < n; ++i) {
    PyObject* obj = objs[i];
    if (obj != facts[i]->obj || !THPVariable_CheckExact(obj) ||
        THPVariable_Unpack(obj).unsafeGetTensorImpl() != facts[i]->impl) {
      return false;
    }
  }
  // 2: the impls (facts[i]->impl is now known to be the live one)
  const int64_t* sizes = call.sizes.data();
  for (size_t i = 0; i < n; ++i) {
    const TensorFacts& f = *facts[i];
    const c10::TensorImpl* impl = f.impl;
    sizes_at[i] = sizes;
    if (!plain_cpu_impl(impl) || impl->dtype() != call.dtype || !same_sizes(impl, sizes) || !impl->is_contiguous() ||
        impl->unsafe_storage().unsafeGetStorageImpl() != f.storage || impl->storage_offset() != f.offset ||
        impl->autograd_meta() != f.meta) {
      return false;
    }
  }
  // 3: storages and autograd metadata
  for (size_t i = 0; i < n; ++i) {
    const TensorFacts& f = *facts[i];
    if (f.storage->data_ptr().get() != f.data || f.storage->nbytes() != f.nbytes) return false;
    if (f.meta == nullptr) continue;  // recorded without: requires no grad
    if (f.meta->is_view_ || f.meta->grad_fn_ || f.meta->requires_grad_ != f.requires_grad) return false;
    if (f.requires_grad && f.meta->grad_.unsafeGetTensorImpl() != f.grad) return false;  // (undefined: not f.grad)
  }
  // 4: the .grad impls
  for (size_t i = 0; i < n; ++i) {
    const TensorFacts& f = *facts[i];
    if (f.grad == nullptr) continue;
    const int64_t* grad_sizes = sizes_at[i];
    const c10::TensorImpl* grad = f.grad;
    if (!plain_cpu_impl(grad) || grad->dtype() != call.dtype || !same_sizes(grad, grad_sizes) ||
        !grad->is_contiguous() || grad->unsafe_storage().unsafeGetStorageImpl() != f.grad_storage ||
        grad->storage_offset() != f.grad_offset) {
      return false;
    }
  }
  // 5: their storages and Python objects (select()'s check of the .grad's type)
  for (size_t i = 0; i < n; ++i) {
    const TensorFacts& f = *facts[i];
    if (f.grad == nullptr) continue;
    if (f.grad_storage->data_ptr().get() != f.grad_data || f.grad_storage->nbytes() != f.grad_nbytes) return false;
    PyObject* grad_obj = f.grad->pyobj_slot()->load_pyobj();
    if (grad_obj != nullptr && !THPVariable_CheckExact(grad_obj)) return false;
  }
  // The first lines of every tensor's data for the kernels: the hardware prefetcher follows a stream once it
  // has started, and many of these tensors are a few lines long.
  for (size_t i = 0; i < n; ++i) {
    const TensorFacts& f = *facts[i];
    const size_t item = f.impl->itemsize();
    for (int k = 0; k < 2; ++k) {
      __builtin_prefetch(static_cast<const char*>(f.data) + f.offset * item + 64 * k);
      if (f.grad != nullptr) __builtin_prefetch(static_cast<const char*>(f.grad_data) + f.grad_offset * item + 64 * k);
    }
  }
  return true;
}

bool same_content(PyObject* obj, const std::vector<int64_t>& content) {
  if (!THPVariable_CheckExact(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.device().is_cpu() || t.scalar_type() != at::kLong || !t.is_contiguous() ||
      t.numel() != static_cast<int64_t>(content.size())) {
    return false;
  }
  return content.empty() || std::memcmp(t.const_data_ptr<int64_t>(), content.data(), content.size() * 8) == 0;
}

std::vector<int64_t> content_of(PyObject* obj) {
  const at::Tensor& t = THPVariable_Unpack(obj);
  const int64_t* p = t.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + t.numel());
}

// The facts of a call that just passed (its missing gradients created), or null where they cannot be
// relied on.
std::shared_ptr<const CallFacts> record(PyObject* const* args, const std::vector<PyObject*>& weight_objs,
                                        const std::vector<at::Tensor>& weights, const std::vector<PyObject*>& catalyst_objs,
                                        const std::vector<at::Tensor>& catalysts, std::vector<int64_t> weight_index,
                                        std::vector<int64_t> catalyst_index, std::shared_ptr<const void> prepared) {
  auto call = std::make_shared<CallFacts>();
  call->dtype = weights[0].dtype();
  call->threads = at::get_num_threads();
  auto add = [&](const std::vector<PyObject*>& objs, const std::vector<at::Tensor>& tensors,
                 std::vector<TensorFacts>& out) {
    out.resize(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      out[i].obj = objs[i];
      if (!read_facts(tensors[i].unsafeGetTensorImpl(), out[i])) return false;
      call->sizes.push_back(tensors[i].dim());
      call->sizes.insert(call->sizes.end(), tensors[i].sizes().begin(), tensors[i].sizes().end());
    }
    return true;
  };
  if (!add(weight_objs, weights, call->weights) || !add(catalyst_objs, catalysts, call->catalysts)) return nullptr;
  call->plan_obj = args[3];
  call->key_obj = args[4];
  if (args[3] != Py_None) {
    call->plan_content = content_of(args[3]);
    call->key_content = content_of(args[4]);
  }
  if (weight_index.size() != weights.size() || catalyst_index.size() != catalysts.size()) {
    call->weight_index = std::move(weight_index);
    call->catalyst_index = std::move(catalyst_index);
  }
  call->prepared = std::move(prepared);
  return call;
}

// at::Tensor handles that do not own their TensorImpl (no reference counting), for tensors kept alive
// otherwise: here by a reference to their Python objects for as long as the handles live.
class Borrowed {
 public:
  explicit Borrowed(size_t n) { tensors_.reserve(n); }
  Borrowed(const Borrowed&) = delete;
  Borrowed& operator=(const Borrowed&) = delete;
  ~Borrowed() {
    for (at::Tensor& t : tensors_) t.unsafeReleaseTensorImpl();
  }
  void add(c10::TensorImpl* impl) {
    tensors_.emplace_back(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(impl));
  }
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// cf.penalty_ on the tensors of the last passing call, if every fact holds; false if not (nothing done).
bool run_recorded(PyObject* const* args, std::tuple<at::Tensor, at::Tensor, at::Tensor>& stats) {
  PyObject* ws = args[0];
  PyObject* ds = args[1];
  if (!PyList_Check(ws) && !PyTuple_Check(ws)) return false;
  if (!PyList_Check(ds) && !PyTuple_Check(ds)) return false;
  const std::shared_ptr<const CallFacts> call = find_recorded(args);
  if (call == nullptr || call->threads != at::get_num_threads()) return false;
  const size_t W = call->weights.size();
  const size_t D = call->catalysts.size();
  PyObject** w_items = PySequence_Fast_ITEMS(ws);
  PyObject** d_items = PySequence_Fast_ITEMS(ds);
  std::vector<PyObject*> held(w_items, w_items + W);
  held.insert(held.end(), d_items, d_items + D);
  std::vector<const TensorFacts*> facts;
  facts.reserve(W + D);
  for (const TensorFacts& f : call->weights) facts.push_back(&f);
  for (const TensorFacts& f : call->catalysts) facts.push_back(&f);
  try {
    if (!all_hold(held, facts, *call)) return false;
    if (call->plan_obj != Py_None &&
        (!same_content(call->plan_obj, call->plan_content) || !same_content(call->key_obj, call->key_content))) {
      return false;
    }
  } catch (const std::exception&) {
    return false;  // a storage that refuses its data pointer or has a symbolic size: the full path decides
  }
  // Every check would pass as it did. The Python objects are held (another thread may change the lists
  // while the GIL is released), so the borrowed handles stay valid; the gradients are owned.
  for (PyObject* obj : held) Py_INCREF(obj);
  struct Release {
    std::vector<PyObject*>& objs;
    ~Release() {
      for (PyObject* obj : objs) Py_DECREF(obj);
    }
  } release{held};
  Borrowed weights(W), catalysts(D);
  std::vector<at::Tensor> weight_grads, catalyst_grads;
  for (const TensorFacts& f : call->weights) {
    weights.add(f.impl);
    if (f.grad != nullptr) weight_grads.push_back(f.meta->grad_);
  }
  for (const TensorFacts& f : call->catalysts) {
    catalysts.add(f.impl);
    if (f.grad != nullptr) catalyst_grads.push_back(f.meta->grad_);
  }
  const double scale = PyFloat_AS_DOUBLE(args[2]);
  {
    pybind11::gil_scoped_release no_gil;
    c10::AutoGradMode no_grad(false);
    stats = catalyst_fused::cpu::accumulate_prepared(call->prepared, weights.list(), catalysts.list(), weight_grads,
                                                     call->weight_index, catalyst_grads, call->catalyst_index, scale);
  }
  return true;
}

// penalty_inplace_lean(weights, catalysts, scale: float, plan: Tensor | None, shape_key: Tensor | None)
//   -> (penalty, norms, ratios), or None where cf.penalty_ must take its Python path instead.
//
// cf.penalty_ on plain CPU tensors in one call: the leaf / requires-grad selection, the checks of
// penalty_accumulate_selected_ (plan and shapes cached by the kernels, validated on every call), the missing
// .grad tensors created as zeros only once every check passed, and the operator's CPU kernel, without the
// dispatcher's per-tensor argument handling. Anything unusual (an argument the Python path would reject or
// treat differently, a subclass, a mode, autocast, inference mode) returns None before anything is changed,
// so that the Python path runs with its own errors and semantics. A repeated call whose recorded facts all
// still hold (run_recorded) skips straight to the kernels.
PyObject* penalty_inplace_lean(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "penalty_inplace_lean takes 5 arguments");
    return nullptr;
  }
  PyObject* plan_obj = args[3];
  PyObject* key_obj = args[4];
  if (!PyFloat_CheckExact(args[2]) || (plan_obj != Py_None && !THPVariable_CheckExact(plan_obj)) ||
      (key_obj != Py_None && !THPVariable_CheckExact(key_obj)) || ((plan_obj == Py_None) != (key_obj == Py_None))) {
    Py_RETURN_NONE;
  }
  const auto tls = c10::impl::tls_local_dispatch_key_set();
  if (!(tls.included_ == c10::default_included_set) || !(tls.excluded_ == c10::default_excluded_set) ||
      c10::InferenceMode::is_enabled() || at::impl::torch_function_mode_enabled() ||
      c10::impl::TorchDispatchModeTLS::any_modes_set()) {
    Py_RETURN_NONE;
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> stats;
  if (run_recorded(args, stats)) {
    return Py_BuildValue("(NNN)", THPVariable_Wrap(std::get<0>(stats)), THPVariable_Wrap(std::get<1>(stats)),
                         THPVariable_Wrap(std::get<2>(stats)));
  }
  prefetch_metadata(args[0]);
  prefetch_metadata(args[1]);
  std::vector<at::Tensor> weights, catalysts;
  std::vector<PyObject*> weight_objs, catalyst_objs;  // as unpacked: another thread may change the lists
  if (!unpack(args[0], weights, weight_objs) || !unpack(args[1], catalysts, catalyst_objs)) Py_RETURN_NONE;
  c10::optional<at::Tensor> plan;
  if (plan_obj != Py_None) {
    if (!layout_matches(THPVariable_Unpack(key_obj), weights, catalysts)) Py_RETURN_NONE;
    plan = THPVariable_Unpack(plan_obj);
  }
  std::vector<at::Tensor> weight_grads, catalyst_grads;
  std::vector<int64_t> weight_index, catalyst_index;
  if (!select(weights, weight_grads, weight_index) || !select(catalysts, catalyst_grads, catalyst_index)) {
    Py_RETURN_NONE;
  }
  const double scale = PyFloat_AS_DOUBLE(args[2]);
  bool created = false;
  auto create_missing = [&] {
    created = true;
    auto fill = [](const std::vector<at::Tensor>& like, std::vector<at::Tensor>& grads,
                   const std::vector<int64_t>& index) {
      for (size_t k = 0; k < grads.size(); ++k) {
        if (grads[k].defined()) continue;
        const at::Tensor& p = like[index[k]];
        grads[k] = at::zeros_like(p, {}, at::MemoryFormat::Contiguous);
        p.mutable_grad() = grads[k];  // what `p.grad = ...` does once its checks pass
      }
    };
    fill(weights, weight_grads, weight_index);
    fill(catalysts, catalyst_grads, catalyst_index);
  };
  std::shared_ptr<const void> prepared;
  {
    pybind11::gil_scoped_release no_gil;  // as the operator call does
    c10::AutoGradMode no_grad(false);  // c10's guard: at::NoGradGuard is not declared by these headers in torch 2.11
    try {
      stats = catalyst_fused::cpu::accumulate_creating_grads(weights, catalysts, weight_grads, weight_index,
                                                             catalyst_grads, catalyst_index, scale, plan,
                                                             create_missing, &prepared);
    } catch (const std::exception&) {
      if (created) throw;
      // A check failed and nothing was changed: the Python path raises the error, with its own wording.
      stats = {};
    }
  }
  if (!std::get<0>(stats).defined()) Py_RETURN_NONE;
  // Recorded only if no .grad had to be created: a loop that sets them to None every step
  // (optimizer.zero_grad(set_to_none=True)) hands new ones to every call, which would never repeat a
  // recorded call and pay for recording and comparing. Such a call also drops its stale record.
  std::shared_ptr<const CallFacts> call;
  if (!created) {
    try {
      call = record(args, weight_objs, weights, catalyst_objs, catalysts, std::move(weight_index),
                    std::move(catalyst_index), std::move(prepared));
    } catch (const std::exception&) {
      // Facts that cannot be read (see run_recorded): nothing recorded, the next call takes this path again.
    }
  }
  keep_recorded(std::move(call), args);
  return Py_BuildValue("(NNN)", THPVariable_Wrap(std::get<0>(stats)), THPVariable_Wrap(std::get<1>(stats)),
                       THPVariable_Wrap(std::get<2>(stats)));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"penalty_inplace_lean", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&penalty_inplace_lean)),
     METH_FASTCALL, "cf.penalty_ for plain CPU tensors without the dispatcher (None: use the Python path)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "catalyst_fused operator library (registers torch.ops.catalyst_fused.*)",
      -1,    // no per-module state
      methods,
  };
  return PyModule_Create(&module_def);
}
}
