"""Rows of test values for the exact order statistics (mergelib.selection, mergelib.gpu_kernels), shared by
their tests: each kind names the case it stresses."""
import torch


def make_rows(kind: str, dtype=torch.float32, n: int = 70_000, rows: int = 2, seed: int = 0) -> torch.Tensor:
    """``rows x n`` values of ``dtype``, standard normal except:

    * ``"ties"``: rounded to a few distinct values, many duplicates;
    * ``"zeros"``: a third +0.0 and a third -0.0;
    * ``"subnormal"``: float32 subnormals, every fifth entry the smallest normal;
    * ``"constant"``: every entry 0.25;
    * ``"heavy tie"``: 42 % of each row one value (0.125) at random places, the tie a counting pass must
      count rather than keep.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    if kind == "ties":
        x = (x * 3).round()
    elif kind == "zeros":
        x[:, ::3] = 0.0
        x[:, 1::3] = -0.0
    elif kind == "subnormal":
        x = x * 1e-39
        x[:, ::5] = torch.finfo(torch.float32).tiny
    elif kind == "constant":
        x = torch.full((rows, n), 0.25)
    elif kind == "heavy tie":
        x[:, : int(0.42 * n)] = 0.125
        x = x[:, torch.randperm(n, generator=g)]
    elif kind != "normal":
        raise ValueError(f"unknown kind {kind!r}")
    return x.to(dtype)
