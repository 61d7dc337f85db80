// Makes the operator library importable as `catalyst_fused._C`; importing it runs the TORCH_LIBRARY
// registrations. The operators are reached through torch.ops.catalyst_fused; the one Python binding here is
// cf.penalty_'s lean path for CPU tensors (penalty_inplace_lean below).
#include <Python.h>

#include "cpu/penalty_cpu.h"

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

// The tensors of a list or tuple, or false if it is anything else or holds anything but plain CPU tensors.
bool unpack(PyObject* seq, std::vector<at::Tensor>& out) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;  // other iterables: the Python path
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  if (n == 0) return false;
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!plain_cpu_tensor(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
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

// penalty_inplace_lean(weights, catalysts, scale: float, plan: Tensor | None, shape_key: Tensor | None)
//   -> (penalty, norms, ratios), or None where cf.penalty_ must take its Python path instead.
//
// cf.penalty_ on plain CPU tensors in one call: the leaf / requires-grad selection, the checks of
// penalty_accumulate_selected_ (plan and shapes cached by the kernels, validated on every call), the missing
// .grad tensors created as zeros only once every check passed, and the operator's CPU kernel, without the
// dispatcher's per-tensor argument handling. Anything unusual (an argument the Python path would reject or
// treat differently, a subclass, a mode, autocast, inference mode) returns None before anything is changed,
// so that the Python path runs with its own errors and semantics.
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
  prefetch_metadata(args[0]);
  prefetch_metadata(args[1]);
  std::vector<at::Tensor> weights, catalysts;
  if (!unpack(args[0], weights) || !unpack(args[1], catalysts)) Py_RETURN_NONE;
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
  std::tuple<at::Tensor, at::Tensor, at::Tensor> stats;
  {
    pybind11::gil_scoped_release no_gil;  // as the operator call does
    c10::AutoGradMode no_grad(false);  // c10's guard: at::NoGradGuard is not declared by these headers in torch 2.11
    try {
      stats = catalyst_fused::cpu::accumulate_creating_grads(weights, catalysts, weight_grads, weight_index,
                                                             catalyst_grads, catalyst_index, scale, plan,
                                                             create_missing);
    } catch (const std::exception&) {
      if (created) throw;
      // A check failed and nothing was changed: the Python path raises the error, with its own wording.
      stats = {};
    }
  }
  if (!std::get<0>(stats).defined()) Py_RETURN_NONE;
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
