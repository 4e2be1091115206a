"""The Partial FC ops.

- ``reference``: the semantics of every op in plain PyTorch (``*_ref``), and ``remap_labels``.
- ``extension``: loads the compiled kernels ``partialfc._C`` and registers their fake kernels and autograd.
- ``tables``: ``op_table(device, use_ext)``, the ops of one head step on the kernels or the references.
- ``cpu``: the CPU-only speed mechanisms of the compiled CPU table.
- ``dtypes``: the accumulation and compute dtype rules.

Shapes: B = global batch, S = sampled classes on this rank, D = embedding size.
"""
from .dtypes import accumulation_dtype, compute_dtype
from .reference import (gather_normalize_backward_out_ref, gather_normalize_backward_ref, gather_normalize_out_ref,
                        gather_normalize_ref, margin_softmax_backward_adaptive_ref, margin_softmax_backward_ref,
                        margin_softmax_forward_adaptive_ref, margin_softmax_forward_ref,
                        normalize_backward_adamw_update_ref, normalize_backward_sgd_update_ref, remap_labels,
                        sample_classes_ref, sparse_adamw_update_ref, sparse_sgd_update_ref,
                        subcenter_max_backward_ref, subcenter_max_ref)
from .tables import CompiledOps, OpTable, ReferenceOps, op_table

__all__ = ["CompiledOps", "OpTable", "ReferenceOps", "accumulation_dtype", "compute_dtype",
           "gather_normalize_backward_out_ref", "gather_normalize_backward_ref", "gather_normalize_out_ref",
           "gather_normalize_ref", "margin_softmax_backward_adaptive_ref", "margin_softmax_backward_ref",
           "margin_softmax_forward_adaptive_ref", "margin_softmax_forward_ref",
           "normalize_backward_adamw_update_ref", "normalize_backward_sgd_update_ref", "op_table", "remap_labels",
           "sample_classes_ref", "sparse_adamw_update_ref", "sparse_sgd_update_ref", "subcenter_max_backward_ref",
           "subcenter_max_ref"]
