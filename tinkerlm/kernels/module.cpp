// The Python module: every kernel source compiled as one translation unit (one compiler run, as fast to build as a
// single file, and the decode step inlines the helpers it shares with the other ops), then the bindings.
// tinkerlm/kernels/__init__.py builds this file; the build cache's key covers every .cpp and .h beside it.

#include "common.h"
#include "quantized.cpp"
#include "attention.cpp"
#include "elementwise.cpp"
#include "decode.cpp"
#include "quantize.cpp"
#include "alloc.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    // The kernels run without the GIL (their arguments are converted before, their results after): a server's event
    // loop and other Python threads go on while a product or a decode step runs.
    const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
    mod.def("rms_norm_fwd", &rms_norm_fwd, "RMSNorm forward: {y, 1/rms}", nogil);
    mod.def("rms_norm_bwd", &rms_norm_bwd, "RMSNorm input gradient", nogil);
    mod.def("rope_apply", &rope_apply, "rotate-half RoPE on (B, T, H, hd), or its inverse", nogil);
    mod.def("swiglu_fwd", &swiglu_fwd, "silu(gate) * up", nogil);
    mod.def("swiglu_bwd", &swiglu_bwd, "SwiGLU gradients {d gate, d up}", nogil);
    mod.def("pack", &pack, "GGUF blocks -> the packed layout the products read", nogil);
    mod.def("unpack", &unpack, "packed layout -> GGUF blocks, bit for bit", nogil);
    mod.def("qmatmul", &qmatmul, "y = x @ W.T, W packed, x rounded to int16 blocks", nogil);
    mod.def("qmatmul_multi", &qmatmul_multi, "[x @ W_i.T], x rounded once", nogil);
    mod.def("qmatmul_swiglu", &qmatmul_swiglu, "silu(x @ Wg.T) * (x @ Wu.T)", nogil);
    mod.def("round_acts", &round_acts, "x rounded to int16 blocks, as qmatmul sees it", nogil);
    mod.def("dequantize", &dequantize, "GGUF blocks -> float32 (rows, K)", nogil);
    mod.def("dequantize_packed", &dequantize_packed, "packed weight -> float32 (rows, K)", nogil);
    mod.def("embed", &embed, "embedding rows from a packed table", nogil);
    mod.def("quantize_rows", &quantize_rows, "float32 (rows, K) -> ggml blocks, as ggml_quantize_chunk",
            pybind11::arg("x"), pybind11::arg("ggml_type"), pybind11::arg("imatrix") = pybind11::none(), nogil);
    mod.def("attention_causal", &attention_causal, "causal grouped-query attention for prefill -> (B, T, H, hd)",
            nogil);
    // The decode step's weights, built once per model (tinkerlm/quant/decode.py). module_local: builds for two
    // instruction sets can be loaded in one process (the tests do) without their types colliding.
    namespace py = pybind11;
    py::class_<PackedMatrix>(mod, "PackedMatrix", py::module_local())
        .def(py::init([](at::Tensor data, int64_t fmt, int64_t rows) {
                 as_pw(data, fmt, rows);  // checked here, once
                 return PackedMatrix{data, fmt, rows};
             }),
             py::arg("data"), py::arg("fmt"), py::arg("rows"));
    py::class_<DecodeLayer>(mod, "DecodeLayer", py::module_local())
        .def(py::init([](at::Tensor input_norm, PackedMatrix wq, PackedMatrix wk, PackedMatrix wv, at::Tensor bq,
                         at::Tensor bk, at::Tensor bv, at::Tensor q_norm, at::Tensor k_norm, PackedMatrix wo,
                         at::Tensor attn_out_norm, at::Tensor post_norm, PackedMatrix w_gate, PackedMatrix w_up,
                         PackedMatrix w_down, at::Tensor mlp_out_norm, at::Tensor inv_freq, int64_t window) {
                 return DecodeLayer{input_norm, wq, wk, wv, bq, bk, bv, q_norm, k_norm,
                                    wo, attn_out_norm, post_norm, w_gate, w_up, w_down, mlp_out_norm, inv_freq, window};
             }),
             py::kw_only(), py::arg("input_norm"), py::arg("wq"), py::arg("wk"), py::arg("wv"), py::arg("bq"),
             py::arg("bk"), py::arg("bv"), py::arg("q_norm"), py::arg("k_norm"), py::arg("wo"),
             py::arg("attn_out_norm"), py::arg("post_norm"), py::arg("w_gate"), py::arg("w_up"), py::arg("w_down"),
             py::arg("mlp_out_norm"), py::arg("inv_freq"), py::arg("window"));
    py::class_<DecodeHead>(mod, "DecodeHead", py::module_local())
        .def(py::init([](at::Tensor final_norm, PackedMatrix lm_head, PackedMatrix embedding) {
                 return DecodeHead{final_norm, lm_head, embedding};
             }),
             py::kw_only(), py::arg("final_norm"), py::arg("lm_head"), py::arg("embedding"));
    mod.def("llama_decode", &llama_decode, "one fused decode step of a Llama-family or Gemma 3 model", nogil);
    mod.def("decode_profile", &decode_profile, "seconds per llama_decode phase since the last call; on: keep timing");
    // The caching CPU allocator (alloc.cpp); tinkerlm/kernels/__init__.py wraps these.
    mod.def("alloc_install", &alloc_install, "install (or uninstall) the caching CPU allocator; cap < 0 keeps it",
            pybind11::arg("enable"), pybind11::arg("cap_bytes"));
    mod.def("alloc_installed", &alloc_installed, "whether the caching allocator is PyTorch's CPU allocator now");
    mod.def("alloc_release", &alloc_release, "unmap every cached block; returns the bytes", nogil);
    mod.def("alloc_stats", &alloc_stats, "live/cached/peak bytes, hits, misses, unmaps, cap, live blocks");
    mod.def("alloc_cached_classes", &alloc_cached_classes, "size class -> cached blocks");
    mod.def("alloc_reset_peak", &alloc_reset_peak, "peaks back to the current live (and live + cached) bytes");
    mod.attr("isa") = ISA;  // from the instruction set's header
}
