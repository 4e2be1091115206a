"""Storage dtypes of the class-center table (``center_dtype``) and what follows from them: the dtypes of the
optimizer states, the initialization of a low-precision table, and the stochastic-rounding seed of a run.

- The table is float32 (the default), bfloat16 or float16; the step computes in float32 whatever it stores
  (``partialfc.ops.dtypes``), and the update ops write a low-precision table and its states with stochastic
  rounding (docs/kernels.md), so updates smaller than half an ulp still move the weights on average.
- SGD's momentum and AdamW's ``exp_avg`` are stored like the table. AdamW's ``exp_avg_sq`` is too, except on a
  float16 table: float16 cannot hold the squares of typical center gradients (``|g| < 2.4e-4`` gives ``g^2``
  below its smallest subnormal), so there it is float32. AdamW's ``row_step`` is int64 on every table.
- The rounding keys hash ``(seed, step, global row, column)``: the seed is the same on every rank and every
  world size, so a shard rounds its rows exactly as the whole table would (docs/memory.md).
"""
import torch

CENTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
_MASK64 = (1 << 64) - 1


def resolve_center_dtype(center_dtype):
    """The torch dtype of ``center_dtype`` (a name of ``CENTER_DTYPES`` or one of its dtypes)."""
    if isinstance(center_dtype, torch.dtype) and center_dtype in CENTER_DTYPES.values():
        return center_dtype
    if isinstance(center_dtype, str) and center_dtype in CENTER_DTYPES:
        return CENTER_DTYPES[center_dtype]
    raise ValueError(f"center_dtype must be one of {', '.join(repr(n) for n in CENTER_DTYPES)}, got {center_dtype!r}")


def dtype_name(dtype):
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def is_low_precision(dtype):
    return dtype in LOW_PRECISION


def exp_avg_sq_dtype(table_dtype):
    """AdamW's second-moment dtype on a table of ``table_dtype``: float32 on float16, else the table's."""
    return torch.float32 if table_dtype == torch.float16 else table_dtype


def rounding_seed_of(seed):
    """The stochastic-rounding seed of a run whose seed is ``seed`` (63 bits, the splitmix64 finalizer of
    ``seed``): fixed for the run, the same on every rank and world size, and unrelated to the seeds of the
    head's other streams (initialization ``seed + rank``, sampling ``seed * 7919 + rank``)."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def fill_normal_(table, std, generator, chunk_bytes=64 << 20):
    """``table ~ normal(0, std)`` from ``generator``, drawn in float32.

    A float32 table is drawn in one call. A low-precision table is drawn in float32 chunks of about
    ``chunk_bytes`` converted (to nearest) one after another, so no float32 copy of the whole table ever exists:
    at 8M identities x 512 that copy alone would be 16 GB. torch draws normals in blocks of 16 values, so chunks
    of a multiple of 16 values continue one stream: the table is the float32 table of the same generator,
    rounded to nearest."""
    if table.dtype not in LOW_PRECISION:
        return table.normal_(0, std, generator=generator)
    rows = table.shape[0]
    row_numel = max(1, table[0].numel()) if rows else 1
    # Rows per chunk so that a chunk holds a multiple of 16 values (16 rows always do).
    chunk_rows = max(16, (chunk_bytes // (4 * row_numel)) // 16 * 16)
    start = 0
    while start < rows:
        stop = min(rows, start + chunk_rows)
        if 0 < (rows - stop) * row_numel < 16:
            stop = rows  # a last chunk under 16 values would be drawn by torch's scalar path: take it in this one
        chunk = torch.empty((stop - start, *table.shape[1:]), dtype=torch.float32, device=table.device)
        table[start:stop].copy_(chunk.normal_(0, std, generator=generator))
        start = stop
    return table
