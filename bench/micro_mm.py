"""Host-side cost of one bf16 matmul launch: same shape every call vs a new row count each call.

    python bench/micro_mm.py

The fast engine's profile shows ~80 us of host time per aten::mm. This separates launch cost
from shape-dependent work (heuristics) by timing the enqueue loop alone (GPU work is kept
small: 64 x 4096 x 4096), for torch's default BLAS backend and for cuBLASLt.
"""

from __future__ import annotations

import json
import time

import torch


def enqueue_us(rows: list[int], weight: torch.Tensor, inputs: dict[int, torch.Tensor]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for m in rows:
        torch.mm(inputs[m], weight)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / len(rows) * 1e6


def main() -> None:
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    sizes = list(range(40, 104))  # 64 distinct row counts
    inputs = {m: torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) for m in [*sizes, 64]}
    results = {}
    for backend in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(backend)
        for m in sizes:  # warm every shape once
            torch.mm(inputs[m], weight)
        same = [enqueue_us([64] * 300, weight, inputs) for _ in range(3)]
        varying = [enqueue_us(sizes * 4, weight, inputs) for _ in range(3)]
        results[backend] = {"same_shape_us": min(same), "new_shape_each_call_us": min(varying)}
    torch.backends.cuda.preferred_blas_library("cublas")
    print(json.dumps({"micro_mm": results, "gpu": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
