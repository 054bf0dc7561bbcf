"""Fusing: each touched weight = its saved base + the sum of the active adapters' weighted products, in place.

Nothing is ever subtracted: repeated fuse/unfuse cycles drift (diffusers#5604, #5170) and cannot take out one
adapter of several (#5032). Restoring copies the saved base back, so it is exact by construction. Weights change with
copy_/addmm_ only, so compiled graphs and CUDA graphs keep valid pointers.
"""

import torch

HALF = (torch.bfloat16, torch.float16)


def compute_dtype(dtype):
    """The GEMM dtype for a weight: its own when half precision (the GEMM accumulates in fp32), else fp32."""
    return dtype if dtype in HALF else torch.float32


def prepare(down, up, weight):
    """(down, up) as 2-d matrices in the weight's compute dtype on its device: (rank, in*kh*kw), (out, rank)."""
    dt = compute_dtype(weight.dtype)
    return (down.reshape(down.shape[0], -1).to(weight.device, dt),
            up.reshape(up.shape[0], -1).to(weight.device, dt))


class BaseStore:
    """Copies of the base weights of the tensors that hold adapters now, and spare buffers for the next copies.

    Spare buffers are what makes switching adapters cheap: a fresh multi-GB allocation costs a page fault per page,
    a reused one costs only the copy. release() frees them.
    """

    def __init__(self):
        self.saved = {}  # (component, path) -> base copy
        self.spare = {}  # (shape, dtype, device) -> [buffers]

    def save(self, key, weight):
        where = _base_device(weight)
        pool = self.spare.get(_slot(weight, where))
        if pool:
            buf = pool.pop()
        else:  # same shape, dtype and strides (channels_last stays channels_last): copies are plain memcpy
            pin = where.type == "cpu" and weight.device.type == "cuda"
            buf = torch.empty_like(weight, device=where, pin_memory=pin)
        buf.copy_(weight)
        self.saved[key] = buf
        return buf

    def aligned(self, key, weight):
        """The saved base of key in the weight's current memory layout. The engine sets its layout before any
        adapter is fused, so this only re-lays out a copy when someone changed a module's layout by hand since."""
        buf = self.saved[key]
        if buf.stride() != weight.stride():
            fresh = torch.empty_like(weight, device=buf.device, pin_memory=buf.is_pinned())
            fresh.copy_(buf)
            self.saved[key] = buf = fresh
        return buf

    def restore(self, key, weight):
        """Copy the base back and keep its buffer for reuse."""
        buf = self.saved.pop(key)
        weight.copy_(buf)
        self.spare.setdefault(_slot(buf, buf.device), []).append(buf)

    def release(self):
        """Free the spare buffers (the saved copies of tensors that hold adapters stay)."""
        self.spare.clear()


def _slot(t, device):
    return tuple(t.shape), t.stride(), t.dtype, str(device)


def _base_device(weight):
    """Where a base copy lives: host memory, except on a GPU with room to spare (a device copy is ~100x faster)."""
    if weight.device.type != "cuda":
        return torch.device("cpu")
    free, total = torch.cuda.mem_get_info(weight.device)
    return weight.device if free - weight.nbytes > total // 4 else torch.device("cpu")


def _matrix(weight):
    """(a 2-d view sharing the weight's memory, whether it is channels_last); (None, False) when there is none."""
    if weight.is_contiguous():
        return weight.view(weight.shape[0], -1), False
    if weight.ndim == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        return weight.permute(0, 2, 3, 1).view(weight.shape[0], -1), True
    return None, False


def fuse(base, active, targets, modules):
    """Set each target weight to its saved base + the active adapters' weighted products (base alone if none).

    base: the BaseStore; active: the adapters with a non-zero weight; modules: {component: torch module}.
    Targets are done one at a time, so the extra memory is one product.
    """
    with torch.no_grad():
        for key in sorted(targets):
            weight = modules[key[0]].get_submodule(key[1]).weight
            parts = [(s.weight * s.factors[key].scale, s.factors[key]) for s in active if key in s.factors]
            if not parts:
                if key in base.saved:
                    base.restore(key, weight)
                continue
            if key in base.saved:
                _fused(weight, parts, base.aligned(key, weight))
            else:
                base.save(key, weight)
                _fused(weight, parts, None)


def _fused(weight, parts, base):
    """weight <- (base, or weight itself when None) + sum of s * up @ down: one GEMM for all adapters on the tensor.

    In bf16/fp16 the factors are rounded to the weight's dtype, an error below the fused weight's own rounding (the
    products are small next to the weight); fp32 weights get fp32 products.
    """
    if len(parts) == 1:
        (s, f), = parts
        up, down = f.up, f.down
    else:  # [s1*up1, s2*up2] @ [down1; down2] = the weighted sum, one rounding
        up = torch.cat([(f.up.float() * s).to(f.up.dtype) for s, f in parts], 1)
        down = torch.cat([f.down for _, f in parts], 0)
        s = 1.0
    w2d, nhwc = _matrix(weight) if up.dtype == weight.dtype else (None, False)
    if w2d is not None:
        if nhwc:  # the matrix's columns run (kh, kw, in): reorder the down factor to match
            _, cin, kh, kw = weight.shape
            down = down.view(-1, cin, kh, kw).permute(0, 2, 3, 1).reshape(down.shape[0], -1)
        if base is not None and base.device == weight.device:
            torch.addmm(_matrix(base)[0], up, down, alpha=s, out=w2d)  # the base copy has the weight's layout
            return
        if base is not None:
            weight.copy_(base)
        w2d.addmm_(up, down, alpha=s)
        return
    # a weight in a dtype the GEMM is not run in, or a layout with no matrix view
    delta = torch.mm(up, down).mul_(s).view(weight.shape)
    if base is not None:
        weight.copy_(base)
    if delta.dtype == weight.dtype:
        weight.add_(delta)
    else:
        weight.copy_(weight.to(delta.dtype) + delta)
