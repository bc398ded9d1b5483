"""Tensors as `(dtype, shape, bytes)`: what crosses `collective_rpc` (its arguments and results lose tensor
types between the front end and the engine process)."""

from __future__ import annotations

import math

import torch

from vllm_livevlm.portable.format import torch_dtype

Wire = tuple[str, list[int], bytes]


def to_wire(tensor: torch.Tensor) -> Wire:
    """A copy of `tensor`'s bytes with its dtype name and shape."""
    tensor = tensor.detach().cpu().contiguous()
    # flattened first: a contiguous tensor may keep a stride of 0 on a size-1 last dim, which `view` refuses
    data = tensor.flatten().view(torch.uint8).numpy().tobytes()
    return str(tensor.dtype).removeprefix("torch."), list(tensor.shape), data


def from_wire(wire: Wire, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor of `to_wire` (a copy, on `device`); ValueError when the bytes do not hold the shape."""
    dtype_name, shape, data = wire
    dtype = torch_dtype(dtype_name)
    shape = [int(d) for d in shape]
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes do not hold a {dtype_name} tensor of shape {shape}")
    if not data:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).to(device)
