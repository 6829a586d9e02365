#!/usr/bin/env python3
"""dev/bench_kernels.py — the PyTorch side of the per-kernel table (issue 9; bench/kernels.sh runs both sides).

Times, with CUDA events (3 warm-ups, median of 11), on the shapes the playgrounds time ours on:
  attention  F.scaled_dot_product_attention, flash and cuDNN backends, bf16, causal, (B, T, H, hd) tensors seen as
             (B, H, T, hd) as a model holds them; GQA through enable_gqa where the backend takes it, else the
             k, v heads expanded once outside the timed region (then SDPA does less work than a GQA kernel: no sum
             of dk, dv over the group). B·T = 16384, H = 16, Hkv = 4, hd = 64 (the 100m/350m head dim).
  ssd        mamba_ssm's Triton mamba_chunk_scan_combined (from the mamba-ssm sdist, .whl/py), bf16 x, dt, B, C and
             fp32 A, on the 350m Mamba layer (H = 24, P = 128, N = 128, G = 1, Q = 256), B·T = 8192, and on the
             100m one as training runs it (H = 16, Q = 64: the presets' chunk), B = 8, T = 2048.
fwd+bwd is one forward and one backward of a random output gradient. FLOPs as the playgrounds count them
(attention: 4·B·H·T²·hd/2 forward, 2.5× that backward; SSD: the paper's 3·B·T·(9·d_ssm·N + 2·d_ssm), a third of it
forward), so the TFLOP/s columns compare directly.

    python3 dev/bench_kernels.py                      # prints `csv,` lines in the playgrounds' columns
    python3 dev/bench_kernels.py --join FILE...       # the table: every `csv,` line of FILEs, with ours / PyTorch
"""
import argparse  # the command line
import statistics  # median
import sys  # exit status

ATTN_COLS = "csv,kernel,impl,B,T,H,Hkv,hd,fwd_ms,fwd_bwd_ms,fwd_tflops,fwd_bwd_tflops"
SSD_COLS = "csv,kernel,impl,B,T,H,P,N,G,Q,fwd_ms,fwd_bwd_ms,fwd_tflops,fwd_bwd_tflops"


def median_ms(fn, warm=3, reps=11):
    import torch
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_attention():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, Hkv, hd = 16, 4, 64
    # flash: FlashAttention-2 inside PyTorch; cudnn: cuDNN's fused attention, which SDPA picks by itself on an H100/H200
    # for the models' bf16 calls (dev/bench_torch.py: kv expanded, no backend forced), compiled or not
    backends = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION))
    print(ATTN_COLS)
    for T in (1024, 2048, 4096, 8192):
        B = 16384 // T
        g = torch.Generator(device="cuda").manual_seed(T)

        def randn(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        q = randn(B, T, H, hd).transpose(1, 2).requires_grad_()
        k = randn(B, T, Hkv, hd).transpose(1, 2).requires_grad_()
        v = randn(B, T, Hkv, hd).transpose(1, 2).requires_grad_()
        dout = randn(B, H, T, hd)
        ke = k.detach().repeat_interleave(H // Hkv, dim=1).requires_grad_()
        ve = v.detach().repeat_interleave(H // Hkv, dim=1).requires_grad_()
        for name, backend in backends:
            how = "gqa"
            with sdpa_kernel(backend):
                try:
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)
                    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                except (RuntimeError, TypeError):
                    how = "kv expanded"  # outside the timed region; SDPA then does no sum of dk, dv over the group
                    try:
                        F.scaled_dot_product_attention(q, ke, ve, is_causal=True).backward(dout)
                    except RuntimeError as e:
                        print(f"attention: SDPA's {name} backend does not run here ({e})", file=sys.stderr)
                        continue
                    fwd = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)  # noqa: E731
                t_f = median_ms(fwd)
                t_fb = median_ms(lambda: fwd().backward(dout))
            f = 4.0 * B * H * T * T * hd / 2
            fb = 3.5 * f
            print(f"csv,attention,torch sdpa {name} bf16 ({how}),{B},{T},{H},{Hkv},{hd},{t_f:.4f},{t_fb:.4f},"
                  f"{f / t_f * 1e-9:.2f},{fb / t_fb * 1e-9:.2f}", flush=True)


def bench_ssd():
    import torch
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    P, N, G = 128, 128, 1
    print(SSD_COLS)
    shapes = [(8192 // T, T, 24, 256) for T in (2048, 4096, 8192)] + [(8, 2048, 16, 64)]  # (B, T, H, Q)
    for B, T, H, Q in shapes:
        g = torch.Generator(device="cuda").manual_seed(T)
        x = torch.randn(B, T, H, P, device="cuda", generator=g).bfloat16().requires_grad_()
        dt = (torch.rand(B, T, H, device="cuda", generator=g) * 0.1 + 0.001).bfloat16().requires_grad_()
        A = (-torch.rand(H, device="cuda", generator=g) * 2 - 0.01).requires_grad_()
        Bm = torch.randn(B, T, G, N, device="cuda", generator=g).bfloat16().requires_grad_()
        Cm = torch.randn(B, T, G, N, device="cuda", generator=g).bfloat16().requires_grad_()
        dy = torch.randn(B, T, H, P, device="cuda", generator=g).bfloat16()

        def fwd():
            return mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size=Q)
        t_f = median_ms(fwd)
        t_fb = median_ms(lambda: fwd().backward(dy))
        d_ssm = H * P
        fb = B * 3.0 * T * (9.0 * d_ssm * N + 2.0 * d_ssm)
        f = fb / 3
        print(f"csv,ssd,mamba_ssm triton bf16,{B},{T},{H},{P},{N},{G},{Q},{t_f:.4f},{t_fb:.4f},"
              f"{f / t_f * 1e-9:.2f},{fb / t_fb * 1e-9:.2f}", flush=True)


def join(files):
    """One table per kernel: each T's rows, and PyTorch's fwd+bwd time over each hybridlm row's (> 1: ours faster)."""
    rows = {}
    for path in files:
        for line in open(path):
            if line.startswith("csv,") and not line.startswith("csv,kernel"):
                f = line.strip().split(",")[1:]
                rows.setdefault(f[0], []).append(f)
    for kernel, all_rows in rows.items():
        cols = (ATTN_COLS if kernel == "attention" else SSD_COLS).split(",")[1:]
        ti, fi, fbi = cols.index("T"), cols.index("fwd_ms"), cols.index("fwd_bwd_ms")
        for shape_key in sorted({tuple(r[4:fi]) for r in all_rows}):  # one table per shape (all but B and T)
            rs = [r for r in all_rows if tuple(r[4:fi]) == shape_key]
            shape = ", ".join(f"{c}={v}" for c, v in zip(cols[4:fi], shape_key))
            print(f"\n{kernel} ({shape})")
            print(f"  {'impl':44s} {'B':>2s} {'T':>5s} {'fwd ms':>9s} {'f+b ms':>9s} {'fwd TF/s':>9s} {'f+b TF/s':>9s}"
                  f"  {'torch f+b / ours'}")
            join_rows(rs, ti, fi, fbi)


def join_rows(rs, ti, fi, fbi):
    """The rows of one shape, by T, each hybridlm row with PyTorch's fwd+bwd time over its own."""
    for T in sorted({int(r[ti]) for r in rs}):
        at_t = [r for r in rs if int(r[ti]) == T]
        base = [r for r in at_t if not r[1].startswith("hybridlm")]
        for r in at_t:
            ratio = ""
            if r[1].startswith("hybridlm") and base:  # one ratio per baseline: torch sdpa <name> ... -> <name>
                label = (lambda b: f" {b[1].split()[2]}") if len(base) > 1 else (lambda b: "")
                ratio = "  ".join(f"{float(b[fbi]) / float(r[fbi]):.2f}x{label(b)}" for b in base)
            print(f"  {r[1]:44s} {r[2]:>2s} {r[ti]:>5s} {float(r[fi]):9.3f} {float(r[fbi]):9.3f} "
                  f"{float(r[-2]):9.1f} {float(r[-1]):9.1f}  {ratio}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--join", nargs="+", metavar="FILE", help="print the joined table of these logs' csv lines")
    ap.add_argument("--only", choices=["attention", "ssd"], help="time one kernel only")
    args = ap.parse_args()
    if args.join:
        join(args.join)
        return 0
    if args.only != "ssd":
        bench_attention()
    if args.only != "attention":
        try:
            bench_ssd()
        except ImportError as e:
            print(f"ssd: mamba_ssm's Triton kernel does not import ({e}); is .whl/py on PYTHONPATH?", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
