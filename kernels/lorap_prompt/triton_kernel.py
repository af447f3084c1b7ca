"""The fused LoRAP prompt in the Triton language (imports triton: GPU only).

Imported lazily by `triton.py`, never at package import, because triton is an
optional dependency (the `gpu` extra). UNTESTED ON A GPU so far: see
kernels/README.md.

Every array carries a leading batch dimension (vmap axes folded in by
`triton.fold_vmap_into_batch`); program (i, b) owns rows
[i * block_n, (i + 1) * block_n) of batch element b. All widths are padded to
powers of two >= 16 for tl.dot with masked loads (`other=0`, and -inf for the
padded bias so the padded softmax weights are exactly 0), so any d, k and r
work; stores are masked to the valid rows and columns.
"""

import triton
import triton.language as tl


@triton.jit
def lorap_prompt_kernel(
  s_ptr,  # [batch, n, d] float32 or integer codes
  w_ptr,  # [batch, d, k]
  b_ptr,  # [batch, k]
  pa_ptr,  # [batch, k, r]
  pb_ptr,  # [batch, r, d]
  in_scale_ptr,  # [batch, d] (int_input) or a 1-element dummy
  in_zero_ptr,  # [batch, d] (int_input) or a 1-element dummy
  scale_ptr,  # [batch, d] (quantize) or a 1-element dummy
  zero_ptr,
  qmin_ptr,
  qmax_ptr,
  o_ptr,  # [batch, n, d] float32 or integer codes
  n_rows: tl.constexpr,
  d: tl.constexpr,
  k: tl.constexpr,
  r: tl.constexpr,
  block_n: tl.constexpr,
  d_pad: tl.constexpr,
  k_pad: tl.constexpr,
  r_pad: tl.constexpr,
  int_input: tl.constexpr,
  quantize: tl.constexpr,
  codes_out: tl.constexpr,
  half_even: tl.constexpr,
):
  pid_n = tl.program_id(0)
  # int64: batch * n * d passes 2^31 for large graphs under vmap.
  pid_b = tl.program_id(1).to(tl.int64)
  rows = pid_n * block_n + tl.arange(0, block_n)
  cols = tl.arange(0, d_pad)
  ks = tl.arange(0, k_pad)
  rs = tl.arange(0, r_pad)
  row_ok = rows < n_rows
  col_ok = cols < d
  k_ok = ks < k
  r_ok = rs < r
  tile_ok = row_ok[:, None] & col_ok[None, :]
  offsets = pid_b * n_rows * d + rows.to(tl.int64)[:, None] * d + cols[None, :]

  s = tl.load(s_ptr + offsets, mask=tile_ok, other=0).to(tl.float32)
  if int_input:
    in_scale = tl.load(in_scale_ptr + pid_b * d + cols, mask=col_ok, other=0.0)
    in_zero = tl.load(in_zero_ptr + pid_b * d + cols, mask=col_ok, other=0.0)
    s = (s - in_zero[None, :]) * in_scale[None, :]

  w = tl.load(
    w_ptr + pid_b * d * k + cols[:, None] * k + ks[None, :],
    mask=col_ok[:, None] & k_ok[None, :],
    other=0.0,
  )
  b = tl.load(b_ptr + pid_b * k + ks, mask=k_ok, other=float("-inf"))
  logits = tl.dot(s, w, input_precision="ieee") + b[None, :]
  unnormalized = tl.exp(logits - tl.max(logits, axis=1)[:, None])
  alpha = unnormalized / tl.sum(unnormalized, axis=1)[:, None]

  pa = tl.load(
    pa_ptr + pid_b * k * r + ks[:, None] * r + rs[None, :],
    mask=k_ok[:, None] & r_ok[None, :],
    other=0.0,
  )
  pb = tl.load(
    pb_ptr + pid_b * r * d + rs[:, None] * d + cols[None, :],
    mask=r_ok[:, None] & col_ok[None, :],
    other=0.0,
  )
  mixed = tl.dot(alpha, pa, input_precision="ieee")
  out = s + tl.dot(mixed, pb, input_precision="ieee")

  if quantize:
    vector = pid_b * d + cols
    scale = tl.load(scale_ptr + vector, mask=col_ok, other=1.0)[None, :]
    zero = tl.load(zero_ptr + vector, mask=col_ok, other=0.0)[None, :]
    qmin = tl.load(qmin_ptr + vector, mask=col_ok, other=0.0)[None, :]
    qmax = tl.load(qmax_ptr + vector, mask=col_ok, other=0.0)[None, :]
    # The reference's ops in its order: x / scale + zero_point, IEEE division.
    x = tl.div_rn(out, scale) + zero
    if half_even:
      whole = tl.floor(x)
      fraction = x - whole
      odd = (whole - 2.0 * tl.floor(whole * 0.5)) == 1.0
      up = (fraction > 0.5) | ((fraction == 0.5) & odd)
      codes = whole + up.to(tl.float32)
    else:
      # sign(x) * floor(|x| + 0.5), as the reference's half-away rule.
      away = tl.floor(tl.abs(x) + 0.5)
      codes = tl.where(x < 0.0, -away, tl.where(x > 0.0, away, 0.0))
    codes = tl.minimum(tl.maximum(codes, qmin), qmax)
    out = codes if codes_out else (codes - zero) * scale

  tl.store(o_ptr + offsets, out.to(o_ptr.dtype.element_ty), mask=tile_ok)
