"""What the int8 and int4 kernel tests share: one call over several weights (q, k and v) against each
weight's own call, bit for bit. Run in the test's process and in the children that force a lower path."""

from collections.abc import Callable

import torch


def shared_call_failures(label: str, weights: list[tuple], one: Callable, many: Callable, k: int, seed: int) -> list[str]:
    """weights: (q, scale) per weight, K inputs each; one(x, q, scale) and many(x, qs, scales) the
    operators. Rows 1 and 5, bf16 and fp32 x, one and two threads; the cases that differ."""
    failures, threads = [], torch.get_num_threads()
    generator = torch.Generator().manual_seed(seed)
    for rows in (1, 5):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(rows, k, generator=generator).to(dtype)
            alone = torch.cat([one(x, q, s) for q, s in weights], dim=1)
            for count in (1, 2):
                torch.set_num_threads(count)
                try:
                    together = many(x, [q for q, _ in weights], [s for _, s in weights])
                finally:
                    torch.set_num_threads(threads)
                if not torch.equal(together, alone):
                    failures.append(f"many: {label} rows={rows} {dtype} threads={count}")
    return failures
