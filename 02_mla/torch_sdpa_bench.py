#!/usr/bin/env python3
"""Stage 02: PyTorch's fused attention at the shapes of `02_mla --attention-bench`, the yardstick of our kernels.

    python3 02_mla/torch_sdpa_bench.py [--seq 128,256,512,1024,2048] [--reps 20] [--csv FILE]

Times torch.nn.functional.scaled_dot_product_attention (causal, bf16, q/k head dim S = 96, v head dim Dv = 64,
8 heads, B*T = 16384: the "small" preset's attention), forward and forward + backward, under each backend that
accepts the shape (cuDNN, flash, memory-efficient; the math backend materialises T x T and is left out), median of
--reps CUDA-event-timed calls after 3 warm-up calls. Useful work is counted as `02_mla --attention-bench` counts it:
forward 2 B H T(T+1)/2 (S + Dv) FLOPs, backward 2.5 times that. The operands are contiguous (B, H, T, dim) bf16
tensors made beforehand, so, unlike ours, no packing pass is timed. Needs a GPU and PyTorch 2.x; never part of the
build or the CPU tests. --csv writes the rows (T, backend, fwd_ms, bwd_ms, tflops) for 02_mla/plots.gp, which draws
the cuDNN row beside ours when the file sits next to attention_time.csv. Exit status 0, or 2 without a GPU.
"""
import argparse
import sys
import warnings


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", default="128,256,512,1024,2048", help="sequence lengths, comma separated")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")  # each refused backend warns why; the table says it once
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        print("torch_sdpa_bench: no GPU", file=sys.stderr)
        return 2
    H, S, Dv, tokens = 8, 96, 64, 16384
    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]

    def median_ms(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(a.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[len(times) // 2]

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; causal SDPA, bf16, H={H}, S={S}, Dv={Dv}, "
          f"B*T={tokens}")
    print(f"{'backend':10s} {'T':>5s} {'B':>4s} {'fwd ms':>8s} {'bwd ms':>8s} {'TFLOP/s':>8s}")
    rows = []
    for T in [int(t) for t in a.seq.split(",")]:
        B = tokens // T
        g = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(B, H, T, S, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(B, H, T, S, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        dy = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.bfloat16, generator=g)
        flops = 3.5 * 2.0 * B * H * (T * (T + 1) / 2) * (S + Dv)
        for name, be in backends:
            try:
                with sdpa_kernel([be]):
                    with torch.no_grad():
                        fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

                    def fwd_bwd():
                        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        torch.autograd.grad(y, (q, k, v), dy)

                    both = median_ms(fwd_bwd)
            except RuntimeError as e:  # the backend refuses the shape (e.g. unequal head dims)
                print(f"{name:10s} {T:5d} {B:4d}   not available: {str(e).splitlines()[0][:70]}")
                continue
            tflops = flops / (both * 1e-3) * 1e-12
            rows.append(f"{T},{name},{fwd:.6f},{both - fwd:.6f},{tflops:.3f}")
            print(f"{name:10s} {T:5d} {B:4d} {fwd:8.4f} {both - fwd:8.4f} {tflops:8.0f}")
    if a.csv:
        with open(a.csv, "w") as f:
            f.write("T,backend,fwd_ms,bwd_ms,tflops\n" + "".join(r + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
