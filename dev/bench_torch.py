#!/usr/bin/env python3
"""dev/bench_torch.py — the PyTorch baseline of the speed comparison (issue 9): training steps of the same model in
plain PyTorch, in its fastest honest form, timed the way `make bench` times hybridlm.

The model is dev/reference.py's HybridLM (the same four families, SWA and MoE, built from a hybridlm checkpoint's
metadata, so the two sides train the same config), with two layers swapped for what a user would pick:
  --attn sdpa      F.scaled_dot_product_attention (flash backend on the GPU) instead of the explicit softmax
  --ssd triton     mamba_ssm's Triton `mamba_chunk_scan_combined` (from the mamba-ssm sdist, carried to the device)
                   instead of the einsum chunked scan
and optionally --compile (torch.compile) and --dtype bf16 (autocast, fp32 master weights, as train.cu's bf16).

    python3 dev/bench_torch.py --config CKPT --batch 8 --seq-len 2048 --steps 20 [--attn sdpa] [--ssd triton]
                               [--compile [--compile-mode M]] [--dtype bf16] [--flops-per-token F] [--csv out.csv]
    python3 dev/bench_torch.py --selfcheck      # the swapped layers equal the reference ones (SDPA: float64;
                                                # Triton SSD: fp32, on a GPU only)

(reference.py's MoE gathers each token's expert weights: it checks gradients, it is not a speed baseline for MoE.)
CKPT: any hybridlm checkpoint (train_cpu/train_gpu/dump_grads write one); only its config is used and the
weights are initialised here. Prints tokens/s, ms/step, peak memory and, given the model's training FLOPs per
token (DESIGN.md's formula, printed by the trainers), the MFU against --peak-tflops (H100/H200 bf16 dense: 989);
then each timed step's GPU time and the host's time to issue it (where a launch-bound step's time goes).
"""
import argparse  # the command line
import math  # sqrt
import os  # the path of reference.py
import sys  # sys.path, exit status
import time  # wall clock

import torch  # tensors, autograd, the optimizer
import torch.nn.functional as F  # scaled_dot_product_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402  HybridLM, Config, read_safetensors, config_from_metadata, loss_fn


def sdpa_attention(q, k, v, window=0, sink=0):
    """reference.causal_attention through F.scaled_dot_product_attention. q (B, T, H, d_qk), k, v (B, T, Hkv, ·)."""
    B, T, H, _ = q.shape
    group = H // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
    if group > 1:  # GQA: every query head reads its kv head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if window > 0:
        t = torch.arange(T, device=q.device)
        visible = (t[None, :] <= t[:, None]) & ((t[:, None] - t[None, :] < window) | (t[None, :] < sink))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(B, T, -1)


def triton_ssd(x, dt, A, Bm, Cm, Q):
    """reference.ssd_chunked through mamba_ssm's Triton kernel (same arguments, no D skip, zero initial state)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # the sdist's pure-Python/Triton files
    return mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size=Q)


def use_fast_layers(attn, ssd):
    if attn == "sdpa":
        reference.causal_attention = sdpa_attention
    if ssd == "triton":
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401  fails here if missing, not inside a compiled step
        # under --compile the Triton kernels run as they are between compiled graphs: dynamo tracing into mamba_ssm's
        # autograd.Function and its autotuned kernels is not something to depend on (they are fused kernels anyway)
        reference.ssd_chunked = torch.compiler.disable(triton_ssd)


def build(cfg, device, seed=0):
    """HybridLM of cfg, initialised like the C++ init in spirit (normal 0.02, norms 1, Mamba's dt/A ranges)."""
    torch.manual_seed(seed)
    model = reference.HybridLM(cfg).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("norm") or leaf in ("D", "scale_a", "scale_s"):
                p.fill_(1.0)
            elif leaf == "A_log":
                p.copy_(torch.empty_like(p).uniform_(0.01, 2.0).log())
            elif leaf in ("dt_bias", "conv_b"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model


def bench(args):
    tensors, meta = reference.read_safetensors(args.config)
    cfg = reference.config_from_metadata(meta)
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_fast_layers(args.attn, args.ssd)
    model = build(cfg, device)
    # mode "reduce-overhead" replays each compiled graph as a CUDA graph (fewer host launches; the Triton SSD, kept
    # out of the graphs, still runs eagerly between them)
    step_model = torch.compile(model, mode=args.compile_mode) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=device == "cuda")
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with amp:
            loss = reference.loss_fn(step_model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # Per step: the GPU's time between events recorded at each step's start, and the host's time to issue the step.
    # A step bound by its launches shows the two close; one bound by the GPU, the host ahead (issue << GPU time).
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)] if device == "cuda" else []
    issue = []
    t0 = time.perf_counter()
    for i in range(args.steps):
        if marks:
            marks[i].record()
        h0 = time.perf_counter()
        loss = step()
        issue.append(time.perf_counter() - h0)
    if marks:
        marks[-1].record()
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = args.batch * args.seq_len / dt
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    mfu = args.flops_per_token * tok_s / (args.peak_tflops * 1e12) if args.flops_per_token > 0 else float("nan")
    compiled = "" if not args.compile else "compile " if args.compile_mode == "default" else \
        f"compile={args.compile_mode} "
    label = f"torch attn={args.attn} ssd={args.ssd} {compiled}{args.dtype}"
    print(f"{label}: {cfg.arch} {cfg.pattern} B={args.batch} T={args.seq_len}: {dt * 1e3:.2f} ms/step, "
          f"{tok_s:,.0f} tok/s, peak {peak:.2f} GiB, MFU {mfu * 100:.1f}%, loss {loss.item():.4f}")
    if marks:
        gpu_ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(args.steps)]
        print("  per step, GPU ms: " + " ".join(f"{t:.2f}" for t in gpu_ms))
    print("  per step, host ms to issue: " + " ".join(f"{t * 1e3:.2f}" for t in issue))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a") as f:
            if new:
                f.write("impl,arch,pattern,batch,seq_len,ms_per_step,tokens_per_s,peak_gib,mfu\n")
            f.write(f"{label},{cfg.arch},{cfg.pattern},{args.batch},{args.seq_len},{dt * 1e3:.3f},{tok_s:.0f},"
                    f"{peak:.3f},{mfu:.4f}\n")


def selfcheck():
    """The swapped attention equals the reference's (full causal, GQA, and with a window and sink), in float64."""
    torch.manual_seed(0)
    worst = 0.0
    for (H, Hkv, window, sink) in [(4, 2, 0, 0), (4, 4, 0, 0), (6, 2, 5, 2), (4, 1, 3, 0)]:
        q = torch.randn(2, 17, H, 8, dtype=torch.float64)
        k = torch.randn(2, 17, Hkv, 8, dtype=torch.float64)
        v = torch.randn(2, 17, Hkv, 6, dtype=torch.float64)
        ref = reference.causal_attention(q, k, v, window, sink)
        got = sdpa_attention(q, k, v, window, sink)
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        print(f"sdpa vs reference attention H={H} Hkv={Hkv} window={window} sink={sink}: rel err {err:.2e}")
        worst = max(worst, err)
    ok = worst < 1e-12
    if torch.cuda.is_available():  # the Triton SSD (GPU only) against the einsum one, forward and gradients, fp32
        worst_ssd = 0.0
        for (T, H, P, G, N, Q) in [(200, 4, 32, 1, 32, 64), (256, 6, 64, 2, 64, 64)]:
            g = torch.Generator(device="cuda").manual_seed(T)
            x = torch.randn(2, T, H, P, device="cuda", generator=g)
            dt = F.softplus(torch.randn(2, T, H, device="cuda", generator=g) - 2)
            A = -torch.rand(H, device="cuda", generator=g) - 0.1
            Bm = torch.randn(2, T, G, N, device="cuda", generator=g)
            Cm = torch.randn(2, T, G, N, device="cuda", generator=g)
            w = torch.randn(2, T, H, P, device="cuda", generator=g)
            outs = []
            for fn in (reference.ssd_chunked, triton_ssd):
                ins = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm)]
                y = fn(*ins, Q)
                (y * w).sum().backward()
                outs.append([y.detach()] + [t.grad for t in ins])
            errs = [(b - a).abs().max().item() / a.abs().max().item() for a, b in zip(*outs)]
            print(f"triton vs reference SSD T={T} H={H} P={P} G={G} N={N} Q={Q}: rel err y {errs[0]:.1e}, "
                  f"grads x dt A B C {' '.join(f'{e:.1e}' for e in errs[1:])}")
            worst_ssd = max(worst_ssd, *errs)
        ok = ok and worst_ssd < 1e-2  # the Triton kernels' dots run in TF32
    else:
        print("(no GPU: the Triton SSD check is skipped)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="a hybridlm checkpoint: its config is benchmarked")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attn", choices=["reference", "sdpa"], default="sdpa")
    ap.add_argument("--ssd", choices=["reference", "triton"], default="triton")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                    help="torch.compile's mode (with --compile)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--flops-per-token", type=float, default=0.0, help="training FLOPs per token (the trainers print it)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    ap.add_argument("--csv", help="append one row to this CSV")
    ap.add_argument("--selfcheck", action="store_true")
    args = ap.parse_args(argv)
    if args.selfcheck:
        return selfcheck()
    if not args.config:
        ap.error("--config CKPT is needed (or --selfcheck)")
    if args.batch <= 0 or args.seq_len <= 0 or args.steps <= 0 or args.warmup < 0:
        ap.error("--batch, --seq-len and --steps must be positive, --warmup non-negative")
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
