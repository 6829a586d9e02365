#!/usr/bin/env python3
"""dev/reference.py — the hybridlm models in plain PyTorch, as an independent check of the C++ CPU model.

The same four architectures as model/model.h (transformer, mamba2, inter- and intra-layer hybrids, every
fusion axis, tied or untied head), written from DESIGN.md with torch autograd doing every backward. It
builds the model from a checkpoint's metadata and loads the tensors by name, so it reads what train_cpu
writes (no conversion step):

    python3 dev/reference.py check DIR...    # folders written by build/dump_grads (see dev/README.md)

`check` loads DIR/model.safetensors, runs the forward on the batch saved in DIR/grads.safetensors,
compares logits and loss, runs the backward and compares every parameter's gradient, printing the
relative error max|a − b| / max|b| of each tensor and PASS/FAIL against the tolerances (double dumps:
1e-9 for everything; float dumps: 1e-4 forward, 1e-3 gradients). Exit status 1 on any FAIL.

As a library: `cfg, params = load_checkpoint(path)`, `model = HybridLM(cfg)`, `load_params(model, params)`,
`logits = model(tokens)`. Only torch is needed; the `safetensors` package is used when installed, else
the file is parsed here (8-byte header length, JSON header, raw little-endian tensors).

Notation as in DESIGN.md: B batch, T sequence, D d_model, H heads, P head dim, G groups, N d_state.
"""
import argparse  # the command line
import json  # safetensors headers (the pure-Python reader)
import math  # sqrt, ceil
import struct  # the 8-byte header length
import sys  # exit status, byte order
from dataclasses import dataclass, field  # Config, Fusion

import torch  # tensors and autograd
import torch.nn as nn  # Module, Parameter: parameter names match the checkpoint's
import torch.nn.functional as F  # silu, softplus, conv1d, pad, cross_entropy

# ---------------------------------------------------------------------------------------------------------
# Config: every ModelConfig field, read from a checkpoint's metadata (model/config.h config_to_metadata)
# ---------------------------------------------------------------------------------------------------------

MAMBA2_NORM_EPS = 1e-5  # the Mamba mixer's gated RMSNorm (model/mamba2.h)
INTRA_NORM_EPS = 1e-5  # the intra-layer block's per-head branch norms (model/intra.h)


@dataclass
class Fusion:
    """The intra-layer block's five fusion axes (model/fusion.h); the defaults are the `final` recipe."""
    norm: str = "group"  # group | none
    scale: str = "none"  # none | vector | scalar
    op: str = "diff"  # add | diff | concat
    value: str = "sep"  # sep | shared
    out: str = "sep"  # sep | joint


RECIPES = {
    "final": {},
    "concat": {"op": "concat", "out": "joint"},
    "hymba": {"scale": "vector", "op": "add", "out": "joint"},
    "falcon": {"norm": "none", "op": "concat", "out": "joint"},
}
AXES = {"norm": ("group", "none"), "scale": ("none", "vector", "scalar"), "op": ("add", "diff", "concat"),
        "value": ("sep", "shared"), "out": ("sep", "joint")}


def parse_fusion(s):
    """A recipe name or 'norm=group,scale=none,op=diff,value=sep,out=sep' (axes not named keep `final`'s)."""
    if s in RECIPES:
        return Fusion(**RECIPES[s])
    f = Fusion()
    for item in s.split(","):
        k, _, v = item.partition("=")
        if k not in AXES or v not in AXES[k]:
            raise ValueError(f"fusion: bad axis '{item}' in '{s}'")
        setattr(f, k, v)
    if f.op == "concat" and f.out == "sep":
        raise ValueError("fusion: op=concat needs out=joint")
    return f


@dataclass
class Config:
    arch: str = "transformer"
    vocab_size: int = 256
    d_model: int = 0
    n_layers: int = 0
    d_ff: int = 0
    n_heads: int = 0  # A blocks
    n_kv_heads: int = 0
    head_dim: int = 64
    rope_theta: float = 500000.0
    d_ssm: int = 0  # M blocks
    ssm_headdim: int = 128
    d_state: int = 128
    ngroups: int = 1
    d_conv: int = 4
    chunk: int = 64
    intra_heads: int = 0  # H blocks
    intra_kv_heads: int = 0
    intra_d_qk: int = 0
    intra_d_v: int = 0
    intra_d_ssm: int = 0
    intra_ssm_headdim: int = 0
    fusion: Fusion = field(default_factory=Fusion)
    window: int = 512  # S blocks: the last `window` keys and the first `sink` ones
    sink: int = 64
    swa_rope_theta: float = 10000.0
    moe: bool = False  # the FFN: 1 shared + top-1 of n_experts routed SwiGLU experts, each d_ff / 2 wide
    n_experts: int = 8
    moe_bias_rate: float = 1e-3
    pattern: str = ""
    tied: bool = True
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    init_std: float = 0.02


def config_from_metadata(meta):
    """A Config from the string → string metadata of a hybridlm checkpoint."""
    cfg = Config()
    for name, default in vars(Config()).items():
        if name not in meta:
            raise KeyError(f"checkpoint metadata has no '{name}' (not a hybridlm checkpoint?)")
        s = meta[name]
        if name == "fusion":
            value = parse_fusion(s)
        elif name in ("tied", "moe"):
            value = {"true": True, "false": False}[s]
        elif isinstance(default, str):
            value = s
        elif isinstance(default, int):
            value = int(s)
        else:
            value = float(s)
        setattr(cfg, name, value)
    if len(cfg.pattern) != cfg.n_layers or set(cfg.pattern) - set("AMHS"):
        raise ValueError(f"config: pattern '{cfg.pattern}' does not match n_layers = {cfg.n_layers}")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}


def read_safetensors_pure(path):
    """(tensors, metadata) of a safetensors file, parsed here: no package beyond torch."""
    assert sys.byteorder == "little", "the raw tensors are little-endian"
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    start = 8 + n
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        raw = bytearray(data[start + begin:start + end])  # a writable copy: frombuffer warns on bytes
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors, meta


def read_safetensors(path):
    """(tensors, metadata), through the `safetensors` package when it is installed."""
    try:
        from safetensors import safe_open
    except ImportError:
        return read_safetensors_pure(path)
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_checkpoint(path):
    """(Config, {name: tensor}) of a checkpoint written by train_cpu (or dump_grads)."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != "hybridlm-run-1":
        raise ValueError(f"{path}: metadata 'format' is {meta.get('format')!r}, not a hybridlm checkpoint")
    return config_from_metadata(meta), tensors


def load_params(model, tensors):
    """Copies every parameter of the model from tensors[name]; names and shapes must all match. Extra
    tensors are allowed only under optim. (the AdamW moments of a run checkpoint)."""
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if n.endswith("expert_bias")}  # the MoE balancing biases
    for name, b in buffers.items():
        with torch.no_grad():
            b.copy_(tensors[name])
    missing = [n for n in params if n not in tensors]
    extra = [n for n in tensors if n not in params and n not in buffers and not n.startswith("optim.")]
    if missing or extra:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"tensor {name}: checkpoint shape {tuple(tensors[name].shape)}, "
                                 f"model {tuple(p.shape)}")
            p.copy_(tensors[name])


# ---------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------

def rmsnorm(x, weight, eps, group=None):
    """x (..., C) / rms over each group of `group` channels (all C when None), times weight (C) if given."""
    shape = x.shape
    if group is not None:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x = x.reshape(shape)
    return x if weight is None else x * weight


def rope(x, theta):
    """Rotate-half RoPE on x (B, T, H, hd): channel i pairs with i + hd/2, rotated by t · θ^(−2i/hd)."""
    T, hd = x.shape[1], x.shape[3]
    half = hd // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)  # angles in double, as the C++
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # (T, hd/2)
    cos = angle.cos().to(device=x.device, dtype=x.dtype)[None, :, None, :]
    sin = angle.sin().to(device=x.device, dtype=x.dtype)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_attention(q, k, v, window=0, sink=0):
    """softmax(q kᵀ / √d_qk, causal) v. q (B, T, H, d_qk), k (B, T, Hkv, d_qk), v (B, T, Hkv, d_v)
    → (B, T, H·d_v). Query head h reads kv head h / (H / Hkv). With a window, query t sees key s only when
    t − s < window or s < sink."""
    B, T, H, d_qk = q.shape
    group = H // k.shape[2]
    k = k.repeat_interleave(group, dim=2)  # (B, T, H, d_qk)
    v = v.repeat_interleave(group, dim=2)  # (B, T, H, d_v)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d_qk)  # (B, H, T, T)
    t = torch.arange(T, device=q.device)
    hidden = t[None, :] > t[:, None]  # (T, T) [query, key]: the future
    if window > 0:
        hidden |= (t[:, None] - t[None, :] >= window) & (t[None, :] >= sink)
    att = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, -1)


def causal_conv1d(x, w, b):
    """Depthwise causal conv: out[t, c] = b[c] + Σ_k w[c, k] · x[t − (K−1) + k, c]. x (B, T, C), w (C, K)."""
    K = w.shape[1]
    xp = F.pad(x.transpose(1, 2), (K - 1, 0))  # (B, C, K−1 + T): zeros before the sequence starts
    return F.conv1d(xp, w.unsqueeze(1), b, groups=x.shape[-1]).transpose(1, 2)


def ssd_chunked(x, dt, A, Bm, Cm, Q):
    """The SSD scan S_t = exp(dt_t·A)·S_{t−1} + dt_t·x_t ⊗ B_t, y_t = S_t·C_t (no D skip), from S = 0,
    in DESIGN.md's chunked form. x (B, T, H, P), dt (B, T, H), A (H), Bm, Cm (B, T, G, N) → y (B, T, H, P)."""
    b, T, H, P = x.shape
    G = Bm.shape[2]
    Bh = Bm.repeat_interleave(H // G, dim=2)  # (B, T, H, N): heads of one group share its B and C
    Ch = Cm.repeat_interleave(H // G, dim=2)
    nc = math.ceil(T / Q)
    pad = nc * Q - T

    def chunks(t):  # (B, T, ...) → (B, nc, Q, ...); padded steps have dt = 0 and x = 0: they change nothing
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, nc, Q, *t.shape[2:])

    x, dt, Bh, Ch = chunks(x), chunks(dt), chunks(Bh), chunks(Ch)
    cum = (dt * A).cumsum(dim=2)  # (B, nc, Q, H) cumulative log-decay within each chunk, ≤ 0

    # (1) inside a chunk: y_i = Σ_{j ≤ i} exp(cum_i − cum_j) · (C_i · B_j) · dt_j · x_j
    seg = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (B, nc, i, j, H)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()[None, None, :, :, None]
    L = torch.exp(seg.masked_fill(~causal, float("-inf")))  # exp of non-positive numbers only
    CB = torch.einsum("bcihn,bcjhn->bcijh", Ch, Bh)
    y_diag = torch.einsum("bcijh,bcjh,bcjhp->bcihp", L * CB, dt, x)

    # (2) each chunk's own end state: Σ_j exp(cum_last − cum_j) · dt_j · x_j ⊗ B_j
    decay_to_end = torch.exp(cum[:, :, -1:, :] - cum)  # (B, nc, Q, H)
    chunk_states = torch.einsum("bcjh,bcjhp,bcjhn->bchpn", decay_to_end * dt, x, Bh)

    # (3) the state entering each chunk: the previous one decayed over a whole chunk, plus that chunk's own
    chunk_decay = torch.exp(cum[:, :, -1, :])  # (B, nc, H)
    state = torch.zeros(b, H, P, Bm.shape[3], dtype=x.dtype, device=x.device)
    states_in = []
    for c in range(nc):
        states_in.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    states_in = torch.stack(states_in, dim=1)  # (B, nc, H, P, N)

    # (4) what the entering state gives each step: exp(cum_i) · C_i · state_in
    y_off = torch.einsum("bcihn,bchpn,bcih->bcihp", Ch, states_in, torch.exp(cum))
    return (y_diag + y_off).reshape(b, nc * Q, H, P)[:, :T]


class SwiGLU(nn.Module):
    """out = W2 · (SiLU(W1·m) ⊙ W3·m)"""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, d_ff))

    def forward(self, m):
        return (F.silu(m @ self.w1.T) * (m @ self.w3.T)) @ self.w2.T


class MoE(nn.Module):
    """1 shared + top-1 of E routed SwiGLU experts: out = shared(m) + g · expert_e(m), e = argmax(σ(R·m) + bias)
    (first index on ties), g = σ(R·m)_e. The bias (a checkpoint buffer, not a parameter) only selects."""

    def __init__(self, d_model, d_ff, n_experts):
        super().__init__()
        self.shared = SwiGLU(d_model, d_ff)
        self.router = nn.Parameter(torch.empty(n_experts, d_model))
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.experts.w3 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.experts.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=False)

    def forward(self, m):
        score = torch.sigmoid(m @ self.router.T)  # (B, T, E)
        e = (score.detach() + self.expert_bias).argmax(dim=-1)  # (B, T)
        g = score.gather(-1, e.unsqueeze(-1))  # (B, T, 1): the router learns through it
        w1, w3, w2 = self.experts.w1[e], self.experts.w3[e], self.experts.w2[e]  # per token
        h = F.silu(torch.einsum("btfd,btd->btf", w1, m)) * torch.einsum("btfd,btd->btf", w3, m)
        return self.shared(m) + g * torch.einsum("btdf,btf->btd", w2, h)


class Attention(nn.Module):
    """Causal GQA attention with RoPE; with_wo=False is the intra-layer block's branch (no output projection)."""

    def __init__(self, d_model, n_heads, n_kv_heads, d_qk, d_v, theta, with_wo=True, window=0, sink=0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_qk, self.d_v, self.theta = n_heads, n_kv_heads, d_qk, d_v, theta
        self.window, self.sink = window, sink
        self.wq = nn.Parameter(torch.empty(n_heads * d_qk, d_model))
        self.wk = nn.Parameter(torch.empty(n_kv_heads * d_qk, d_model))
        self.wv = nn.Parameter(torch.empty(n_kv_heads * d_v, d_model))
        self.wo = nn.Parameter(torch.empty(d_model, n_heads * d_v)) if with_wo else None

    def branch(self, n):
        """(y (B, T, H·d_v), v (B, T, Hkv, d_v)) for the normed input n (B, T, D)."""
        B, T, _ = n.shape
        q = rope((n @ self.wq.T).reshape(B, T, self.n_heads, self.d_qk), self.theta)
        k = rope((n @ self.wk.T).reshape(B, T, self.n_kv_heads, self.d_qk), self.theta)
        v = (n @ self.wv.T).reshape(B, T, self.n_kv_heads, self.d_v)
        return causal_attention(q, k, v, self.window, self.sink), v

    def forward(self, n):
        return self.branch(n)[0] @ self.wo.T


class Mamba2(nn.Module):
    """The Mamba-2 mixer (with_norm_out=True) or the intra-layer block's branch, which stops at
    g = y ⊙ SiLU(z). shared_x: x comes from outside (value sharing), in_proj has no x rows."""

    def __init__(self, d_model, d_inner, headdim, d_state, ngroups, d_conv, chunk, shared_x=False,
                 with_norm_out=True):
        super().__init__()
        self.d_inner, self.P, self.N, self.G = d_inner, headdim, d_state, ngroups
        self.chunk, self.shared_x = chunk, shared_x
        self.H = d_inner // headdim
        conv_dim = d_inner + 2 * ngroups * d_state  # the conv runs over [x, B, C]
        d_in_proj = d_inner + (0 if shared_x else d_inner) + 2 * ngroups * d_state + self.H  # [z, x, B, C, dt]
        self.in_proj = nn.Parameter(torch.empty(d_in_proj, d_model))
        self.conv_w = nn.Parameter(torch.empty(conv_dim, d_conv))
        self.conv_b = nn.Parameter(torch.empty(conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.H))
        self.A_log = nn.Parameter(torch.empty(self.H))
        self.D = nn.Parameter(torch.empty(self.H))
        self.norm_w = nn.Parameter(torch.empty(d_inner)) if with_norm_out else None
        self.out_proj = nn.Parameter(torch.empty(d_model, d_inner)) if with_norm_out else None

    def branch(self, u, x_shared=None):
        """g = y ⊙ SiLU(z) (B, T, d_inner) for u (B, T, D); x_shared (B, T, d_inner) when shared_x."""
        B, T, _ = u.shape
        DI, H, P, GN = self.d_inner, self.H, self.P, self.G * self.N
        zxbcdt = u @ self.in_proj.T
        z, dt_raw = zxbcdt[..., :DI], zxbcdt[..., -H:]
        if self.shared_x:
            conv_in = torch.cat([x_shared, zxbcdt[..., DI:DI + 2 * GN]], dim=-1)
        else:
            conv_in = zxbcdt[..., DI:DI + DI + 2 * GN]
        xBC = F.silu(causal_conv1d(conv_in, self.conv_w, self.conv_b))
        x, Bm, Cm = xBC.split([DI, GN, GN], dim=-1)
        x = x.reshape(B, T, H, P)
        Bm = Bm.reshape(B, T, self.G, self.N)
        Cm = Cm.reshape(B, T, self.G, self.N)
        dt = F.softplus(dt_raw + self.dt_bias)  # (B, T, H); threshold 20 as hl::softplus
        A = -torch.exp(self.A_log)  # (H): every head decays
        y = ssd_chunked(x, dt, A, Bm, Cm, self.chunk) + self.D[:, None] * x
        return y.reshape(B, T, DI) * F.silu(z)

    def forward(self, u):
        g = self.branch(u)
        gn = rmsnorm(g, self.norm_w, MAMBA2_NORM_EPS, group=self.d_inner // self.G)  # per group of B/C
        return gn @ self.out_proj.T


class IntraMixer(nn.Module):
    """Attention heads and Mamba-2 heads side by side on the same input, fused along the five axes."""

    def __init__(self, cfg):
        super().__init__()
        f = self.fusion = cfg.fusion
        D, Ha, dv = cfg.d_model, cfg.intra_heads, cfg.intra_d_v
        Wa, Ws = Ha * dv, cfg.intra_d_ssm
        self.dv, self.P = dv, cfg.intra_ssm_headdim
        self.attn = Attention(D, Ha, cfg.intra_kv_heads, cfg.intra_d_qk, dv, cfg.rope_theta, with_wo=False)
        self.ssm = Mamba2(D, Ws, cfg.intra_ssm_headdim, cfg.d_state, cfg.ngroups, cfg.d_conv, cfg.chunk,
                          shared_x=f.value == "shared", with_norm_out=False)
        if f.norm == "group":
            self.norm_a = nn.Parameter(torch.empty(Wa))
            self.norm_s = nn.Parameter(torch.empty(Ws))
        if f.scale == "vector":
            self.scale_a = nn.Parameter(torch.empty(Wa))
            self.scale_s = nn.Parameter(torch.empty(Ws))
        elif f.scale == "scalar":
            self.scale_a = nn.Parameter(torch.empty(1))  # one number, on the attention branch
        if f.out == "sep":
            self.out_s = nn.Parameter(torch.empty(D, Ws))
            self.out_a = nn.Parameter(torch.empty(D, Wa))
        else:
            self.out_proj = nn.Parameter(torch.empty(D, Ws + Wa if f.op == "concat" else Ws))

    def forward(self, n):
        f = self.fusion
        a, v = self.attn.branch(n)  # (B, T, Wa)
        x_shared = None
        if f.value == "shared":  # each query head's slot of the Mamba x holds its kv head's V
            group = self.attn.n_heads // self.attn.n_kv_heads
            x_shared = v.repeat_interleave(group, dim=2).reshape(a.shape)
        s = self.ssm.branch(n, x_shared)  # (B, T, Ws)
        if f.norm == "group":  # per head: the branches' output scales differ by > 10×
            a = rmsnorm(a, self.norm_a, INTRA_NORM_EPS, group=self.dv)
            s = rmsnorm(s, self.norm_s, INTRA_NORM_EPS, group=self.P)
        if f.scale == "vector":
            a, s = self.scale_a * a, self.scale_s * s
        elif f.scale == "scalar":
            a = self.scale_a * a
        if f.op == "diff":
            a = -a
        if f.out == "sep":
            return s @ self.out_s.T + a @ self.out_a.T
        fused = torch.cat([s, a], dim=-1) if f.op == "concat" else s + a
        return fused @ self.out_proj.T


class Block(nn.Module):
    """Pre-norm block: h = x + mixer(RMSNorm(x)), y = h + SwiGLU(RMSNorm(h)); mixer by letter A | M | H."""

    def __init__(self, cfg, kind):
        super().__init__()
        D, self.eps = cfg.d_model, cfg.norm_eps
        self.norm1 = nn.Parameter(torch.empty(D))
        if kind == "A":
            self.mixer = Attention(D, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, cfg.rope_theta)
        elif kind == "S":  # A's weights; the window and sink, and their own RoPE base
            self.mixer = Attention(D, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, cfg.swa_rope_theta,
                                   window=cfg.window, sink=cfg.sink)
        elif kind == "M":
            self.mixer = Mamba2(D, cfg.d_ssm, cfg.ssm_headdim, cfg.d_state, cfg.ngroups, cfg.d_conv, cfg.chunk)
        else:
            self.mixer = IntraMixer(cfg)
        self.norm2 = nn.Parameter(torch.empty(D))
        self.ffn = MoE(D, cfg.d_ff // 2, cfg.n_experts) if cfg.moe else SwiGLU(D, cfg.d_ff)

    def forward(self, x):
        h = x + self.mixer(rmsnorm(x, self.norm1, self.eps))
        return h + self.ffn(rmsnorm(h, self.norm2, self.eps))


class HybridLM(nn.Module):
    """tokens (B, T) → embedding → blocks by pattern → RMSNorm → LM head (tied unless cfg.tied is False).
    Parameter names equal the checkpoint's (embed, layers.3.mixer.in_proj, norm_f, lm_head, ...)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.pattern)
        self.norm_f = nn.Parameter(torch.empty(cfg.d_model))
        self.lm_head = None if cfg.tied else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))

    def forward(self, tokens):
        """logits (B, T, V)"""
        x = self.embed[tokens]
        for block in self.layers:
            x = block(x)
        x = rmsnorm(x, self.norm_f, self.cfg.norm_eps)
        return x @ (self.embed if self.lm_head is None else self.lm_head).T


def loss_fn(logits, targets):
    """Mean cross-entropy over all B·T positions."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ---------------------------------------------------------------------------------------------------------
# check: the C++ model's forward and gradients (dumped by dump_grads) against this one
# ---------------------------------------------------------------------------------------------------------

TOLERANCES = {"float64": (1e-9, 1e-9), "float32": (1e-4, 1e-3)}  # (forward, gradients)


def rel_err(a, b):
    """max|a − b| / max|b| (max|a − b| when b is all zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def check(folder, tol_fwd=None, tol_grad=None, verbose=True):
    """Compares this model with the dump in folder; returns (ok, worst forward error, worst gradient error)."""
    cfg, params = load_checkpoint(f"{folder}/model.safetensors")
    ref, meta = read_safetensors(f"{folder}/grads.safetensors")
    dtype_name = meta.get("dtype", "float32")
    dtype = {"float64": torch.float64, "float32": torch.float32}[dtype_name]
    tol_fwd = TOLERANCES[dtype_name][0] if tol_fwd is None else tol_fwd
    tol_grad = TOLERANCES[dtype_name][1] if tol_grad is None else tol_grad

    model = HybridLM(cfg).to(dtype)
    load_params(model, params)
    tokens, targets = ref["tokens"].long(), ref["targets"].long()
    logits = model(tokens)
    loss = loss_fn(logits, targets)
    loss.backward()

    rows = [("logits", logits.detach(), ref["logits"], tol_fwd),
            ("loss", loss.detach().reshape(1), ref["loss"], tol_fwd)]
    names = dict(model.named_parameters())
    for name, p in names.items():
        rows.append((name, p.grad, ref.get(name), tol_grad))
    stray = [n for n in ref if n not in names and n not in ("tokens", "targets", "logits", "loss")]

    ok, worst_fwd, worst_grad, worst_name = True, 0.0, 0.0, ""
    lines = []  # one per tensor; printed all (verbose) or only the failures, under the header
    for name, ours, theirs, tol in rows:
        if theirs is None or ours is None or tuple(ours.shape) != tuple(theirs.shape):
            why = "missing in the dump" if theirs is None else "no gradient here" if ours is None else "shape differs"
            lines.append(f"  {name:34s} FAIL: {why}")
            ok = False
            continue
        err = rel_err(ours, theirs)
        passed = err <= tol  # NaN fails too
        ok &= passed
        if name in ("logits", "loss"):
            worst_fwd = max(worst_fwd, err)
        elif err >= worst_grad:
            worst_grad, worst_name = err, name
        if verbose or not passed:
            shape = "×".join(str(d) for d in theirs.shape)
            lines.append(f"  {name:34s} {shape:>14s} {theirs.abs().max().item():10.3e} {err:10.3e}  {tol:.0e} "
                         f"{'PASS' if passed else 'FAIL'}")
    for name in stray:
        lines.append(f"  {name:34s} FAIL: in the dump but not a parameter of this model")
        ok = False
    if lines:
        print(f"{folder}: {cfg.arch} pattern {cfg.pattern}, fusion {fusion_str(cfg.fusion)}, "
              f"{'tied' if cfg.tied else 'untied'}, {dtype_name}, B×T = {tokens.shape[0]}×{tokens.shape[1]}")
        print(f"  {'tensor':34s} {'shape':>14s} {'max|ref|':>10s} {'rel err':>10s}  tol")
        print("\n".join(lines))
    print(f"RESULT {folder} {'PASS' if ok else 'FAIL'} {dtype_name} fwd {worst_fwd:.2e} grad {worst_grad:.2e} "
          f"worst {worst_name}")
    return ok, worst_fwd, worst_grad


def fusion_str(f):
    return f"norm={f.norm},scale={f.scale},op={f.op},value={f.value},out={f.out}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare logits, loss and every gradient with dump_grads folders")
    c.add_argument("folders", nargs="+", help="each holds model.safetensors and grads.safetensors")
    c.add_argument("--tol-fwd", type=float, default=None, help="logits/loss tolerance (default by dtype)")
    c.add_argument("--tol-grad", type=float, default=None, help="gradient tolerance (default by dtype)")
    c.add_argument("--quiet", action="store_true", help="print only failures and the RESULT lines")
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    all_ok = True
    for folder in args.folders:
        try:
            ok, _, _ = check(folder.rstrip("/"), args.tol_fwd, args.tol_grad, verbose=not args.quiet)
        except Exception as e:  # a broken dump is a FAIL of that case, not the end of the others
            print(f"  error: {type(e).__name__}: {e}")
            print(f"RESULT {folder.rstrip('/')} FAIL ? fwd nan grad nan worst ({type(e).__name__})")
            ok = False
        all_ok &= ok
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
