"""The dtype rules of the head, defined once.

- Accumulation: sums, inverse norms, softmax statistics and the sampled centers' gradient are held in
  float32, or float64 for a float64 table.
- Compute: the dtype of the two large GEMMs is autocast's dtype when autocast is on for the device, else
  the promotion of the embeddings' and the table's dtypes.
"""
import torch


def accumulation_dtype(dtype):
    """float64 for float64 input, else float32 (float16 / bfloat16 / float32)."""
    return torch.promote_types(dtype, torch.float32)


def compute_dtype(embeddings, weight):
    """The GEMM dtype of a step on ``embeddings`` [B, D] against the table ``weight``."""
    device_type = embeddings.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(embeddings.dtype, weight.dtype)
