"""Bit-level tensor comparisons shared by the tests, each meaning named once.

* :func:`same_bytes`: dtype, shape and every byte equal (NaN payloads and the sign of zero included);
  for round trips (storage, streaming) that must reproduce a tensor exactly.
* :func:`same_bits_any_zero_sign`: bit for bit, except that -0.0 and +0.0 count as equal; for order
  statistics, where ``torch.kthvalue`` itself may return either zero.
* :func:`same_bits_any_nan_payload`: NaN at the same places, every other entry bit for bit; for
  elementwise kernels, whose NaN payloads may differ between code paths.
"""
import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous().reshape(-1), b.detach().cpu().contiguous().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def same_bits_any_zero_sign(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        return False
    nz = a != 0
    ints = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a.view(ints)[nz], b.view(ints)[nz])


def same_bits_any_nan_payload(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    keep = ~a.isnan()
    ints = _INT_OF_SIZE[a.element_size()]
    return torch.equal(a[keep].view(ints), b[keep].view(ints))
