"""Causal attention forward + backward through PyTorch SDPA, per kernel, at the training benchmark's shape.

    PYTHONPATH=. python benchmarks/attention.py            # CUDA: batch 4, 32 heads / 4 KV groups, seq 4096, d 64

Inputs are laid out as megatron-core hands them to the sdpa spec ([s, b, h, d] permuted to [b, h, s, d] views).
Each row: one kernel (`sdpa_kernel([backend])`) with grouped K/V passed as they are (`enable_gqa`) or repeated to
the query heads first (the repeat is timed too). Printed: median ms of fwd+bwd over --iters after --warmup (CUDA
events), TFLOP/s (causal: 2 x 2 x b x h x s^2 x d / 2 forward, 2.5x that for fwd+bwd), and the relative error of the
output against float64 math attention; "n/a" where torch refuses the kernel for these inputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    b, h, g, s, d = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)

    def layout(heads):  # megatron's [s, b, h, d] -> [b, h, s, d] view
        t = torch.randn(s, b, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        return t.permute(1, 2, 0, 3).requires_grad_()

    q, k, v = layout(h), layout(g), layout(g)
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():  # float64 reference on a slice of the batch (memory)
        rk, rv = (t[:1].double().repeat_interleave(h // g, dim=1) for t in (k, v))
        ref = F.scaled_dot_product_attention(q[:1].double(), rk, rv, is_causal=True)
    flops = 2 * 2 * b * h * s * s * d / 2 * 3.5  # causal fwd, + 2.5x for bwd
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}; "
          f"batch {b}, heads {h}/{g} KV, seq {s}, head dim {d}, bf16, causal")
    print("| kernel | K/V | ms fwd+bwd | TFLOP/s | rel. error vs fp64 |")
    print("|---|---|---:|---:|---:|")
    for name, backend in BACKENDS.items():
        for gqa in (True, False):
            def step(backend=backend, gqa=gqa):
                kk, vv = (k, v) if gqa else (t.repeat_interleave(h // g, dim=1) for t in (k, v))
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                out.backward(grad)
                return out

            try:
                out = step()
            except RuntimeError as e:
                print(f"| {name} | {'grouped' if gqa else 'repeated'} | n/a | n/a | {str(e).splitlines()[0][:60]} |")
                continue
            err = float((out[:1].double() - ref).norm() / ref.norm())
            times = []
            for i in range(args.warmup + args.iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(start.elapsed_time(end))
                q.grad = k.grad = v.grad = None
            ms = statistics.median(times)
            print(f"| {name} | {'grouped' if gqa else 'repeated'} | {ms:.2f} | {flops / ms / 1e9:.0f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
