// partialfc._C.decoded_image_to_tensor: the data loaders' per-sample call of the image conversion, straight from
// Python to the kernel of partialfc::image_to_tensor (csrc/ops/cpu/image_to_tensor_kernel.cpp).
//
// Why a second entry point: the per-sample work around a training image's decode has to stay within a tenth of
// the decode itself. Going through torch.ops (torch.from_numpy of the decoded array, the Python op's argument
// parsing, the dispatcher's boxing) costs about as much as the conversion once the JPEG decoder has evicted
// those code paths from the caches (figures in docs/data.md and docs/benchmarks.md). This
// function reads the numpy array through the buffer protocol (no tensor is made of it), allocates the output
// with the CPU allocator directly and runs the same kernel, so the values are the op's, bit for bit (tested).
// The op stays the public, dispatchable form; this is only the loaders' fast path.
#include <Python.h>

#include <ATen/EmptyTensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <exception>

#include "ops/cpu/image_to_tensor_kernel.h"

namespace partialfc {
namespace {

// RAII for a Py_buffer obtained with PyObject_GetBuffer.
struct BufferView {
  Py_buffer view{};
  bool held = false;
  ~BufferView() {
    if (held) PyBuffer_Release(&view);
  }
};

bool is_uint8_format(const char* format) {
  // PEP 3118: NULL means unsigned bytes; numpy writes "B" (optionally with a byte-order prefix, meaningless here)
  if (format == nullptr) return true;
  if (*format == '@' || *format == '=' || *format == '<' || *format == '>' || *format == '!') ++format;
  return std::strcmp(format, "B") == 0;
}

PyObject* decoded_image_to_tensor(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "decoded_image_to_tensor(image, flip) takes 2 arguments, got %zd", nargs);
    return nullptr;
  }
  const int flip = PyObject_IsTrue(args[1]);
  if (flip < 0) return nullptr;
  BufferView buf;
  if (PyObject_GetBuffer(args[0], &buf.view, PyBUF_RECORDS_RO) != 0) return nullptr;  // TypeError: no buffer
  buf.held = true;
  const Py_buffer& v = buf.view;
  if (v.itemsize != 1 || !is_uint8_format(v.format)) {
    PyErr_Format(PyExc_TypeError, "decoded_image_to_tensor: image must be uint8 (a decoded 8-bit image), got format "
                 "'%s'", v.format ? v.format : "B");
    return nullptr;
  }
  if (v.ndim != 3 || v.shape[2] != 3) {
    PyErr_Format(PyExc_ValueError, "decoded_image_to_tensor: image must be [H, W, 3] (BGR, as cv2.imdecode "
                 "returns), got %d dimensions", v.ndim);
    return nullptr;
  }
  if (!PyBuffer_IsContiguous(&v, 'C')) {
    PyErr_SetString(PyExc_ValueError, "decoded_image_to_tensor: image must be C-contiguous");
    return nullptr;
  }
  const int64_t h = v.shape[0], w = v.shape[1];
  try {
    at::TensorBase out = at::detail::empty_cpu({3, h, w}, at::kFloat);
    if (h > 0 && w > 0)
      convert_image(static_cast<const uint8_t*>(v.buf), out.mutable_data_ptr<float>(), h, w, flip != 0);
    return THPVariable_Wrap(std::move(out));
  } catch (const std::exception& e) {  // allocation failure: a Python MemoryError / RuntimeError, not a crash
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

}  // namespace

PyMethodDef image_fastpath_methods[] = {
    {"decoded_image_to_tensor", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(&decoded_image_to_tensor)),
     METH_FASTCALL,
     "decoded_image_to_tensor(image, flip) -> Tensor\n\nThe values of torch.ops.partialfc.image_to_tensor(image, "
     "flip) for a uint8 [H, W, 3] C-contiguous array (any buffer-protocol object), without making a tensor of the "
     "input or going through the dispatcher: the data loaders' per-sample path."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace partialfc
