// The Python module of the fused kernels: the interface of lstm.h, every tensor by name.
#include <torch/extension.h>

#include "common.h"
#include "lstm.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace rbn;
  py::class_<TermSpec>(m, "TermSpec")
      .def(py::init([](int64_t kind, double eps, Tensor gamma, Tensor beta, Tensor scale, Tensor mean) {
             return TermSpec{kind, eps, gamma, beta, scale, mean};
           }),
           py::arg("kind"), py::arg("eps"), py::arg("gamma"), py::arg("beta"), py::arg("scale"), py::arg("mean"))
      .def_readonly("kind", &TermSpec::kind)
      .def_readonly("eps", &TermSpec::eps);
  py::class_<TermStats>(m, "TermStats")
      .def_readonly("mean", &TermStats::mean)
      .def_readonly("var", &TermStats::var)
      .def_readonly("row_mean", &TermStats::row_mean)
      .def_readonly("row_rstd", &TermStats::row_rstd);
  py::class_<Saved>(m, "Saved")
      .def_readonly("P", &Saved::P)
      .def_readonly("hs", &Saved::hs)
      .def_readonly("cs", &Saved::cs)
      .def_readonly("A", &Saved::A)
      .def_readonly("RH", &Saved::RH)
      .def_readonly("CH", &Saved::CH)
      .def_readonly("TC", &Saved::TC)
      .def_readonly("input", &Saved::input)
      .def_readonly("recurrent", &Saved::recurrent)
      .def_readonly("cell", &Saved::cell);
  py::class_<ForwardResult>(m, "ForwardResult")
      .def_readonly("output", &ForwardResult::output)
      .def_readonly("h", &ForwardResult::h)
      .def_readonly("c", &ForwardResult::c)
      // A copy (tensor handles only), not a view that keeps this result alive: the result holds the layer's output,
      // whose autograd node holds `saved` in its context, and that cycle through C++ would never be collected.
      .def_property_readonly("saved", [](const ForwardResult& result) { return result.saved; });
  py::class_<TermGrads>(m, "TermGrads")
      .def_readonly("gamma", &TermGrads::gamma)
      .def_readonly("beta", &TermGrads::beta)
      .def_readonly("scale", &TermGrads::scale)
      .def_readonly("mean", &TermGrads::mean);
  py::class_<BackwardResult>(m, "BackwardResult")
      .def_readonly("x", &BackwardResult::x)
      .def_readonly("weight_ih", &BackwardResult::weight_ih)
      .def_readonly("h0", &BackwardResult::h0)
      .def_readonly("c0", &BackwardResult::c0)
      .def_readonly("weight_hh", &BackwardResult::weight_hh)
      .def_readonly("bias", &BackwardResult::bias)
      .def_readonly("input", &BackwardResult::input)
      .def_readonly("recurrent", &BackwardResult::recurrent)
      .def_readonly("cell", &BackwardResult::cell);
  m.def("lstm_forward", &lstm_forward, py::arg("x"), py::arg("weight_ih"), py::arg("h0"), py::arg("c0"),
        py::arg("weight_hh"), py::arg("bias"), py::arg("input"), py::arg("recurrent"), py::arg("cell"),
        py::arg("mask"), py::arg("save"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("lstm_backward", &lstm_backward, py::arg("d_output"), py::arg("d_h"), py::arg("d_c"), py::arg("x"),
        py::arg("weight_ih"), py::arg("weight_hh"), py::arg("bias"), py::arg("input"), py::arg("recurrent"),
        py::arg("cell"), py::arg("mask"), py::arg("saved"), py::arg("threads"), py::arg("need_dx"),
        py::call_guard<py::gil_scoped_release>());
  // The normalization kinds by name, so that Python can check that recurrent_bn.norm.Kind numbers them alike.
  m.attr("KINDS") = py::dict(py::arg("NONE") = int64_t{kNone}, py::arg("LAYER") = int64_t{kLayer},
                             py::arg("BATCH") = int64_t{kBatch}, py::arg("SHARED") = int64_t{kShared},
                             py::arg("AFFINE") = int64_t{kAffine});
  m.def("kernel_variant", &kernel_variant);
  m.def("set_onednn", &set_onednn);
  m.def("set_packed_gemm", &set_packed_gemm);
  m.def("set_barrier_spin", &set_barrier_spin);
  m.def("set_team_fallback", &set_team_fallback);
  m.def("run_solo", &run_solo);
  m.def("set_omp_threads", &set_omp_threads);
  m.def("onednn_available", &onednn_available);
  m.def("last_profile", &last_profile);
}
