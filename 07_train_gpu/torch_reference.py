#!/usr/bin/env python3
"""Stage 07: the whole training loss in PyTorch, an outside oracle of our hand-written backward.

    h_0 = Emb(t_0..t_{T-1});  h_{l+1} = Block_l(h_l)        (dense SwiGLU for l < first_k_dense_replace, else MoE)
    z   = norm(h_L);          L_CE  = CE(head(z), t_1..t_T)
    L_MTP = (mtp_lambda / depth) sum_k CE_k                  (module k reads z^{k-1}; CE_k over T-k targets / T)
    L_Bal = sum over MoE layers (MTP blocks included) of alpha * mean_b sum_i f_{b,i} P_{b,i}
    L     = L_CE + L_MTP + L_Bal

Written from the papers and the stage READMEs, with every detail taken from the CPU reference (the
specification): 06_full_model/model_cpu.cpp, 05_mtp/{block,mtp}_cpu.cpp, 04_aux_loss/{aux_loss,lm_parts}_cpu.cpp,
03_moe/{moe_cpu.cpp,moe_route.h}, 02_mla/mla_cpu.cpp, 01_rmsnorm_rope/rmsnorm_rope_cpu.cpp. Torch's autograd
then differentiates the total; nothing here is a hand-written backward.

    python3 07_train_gpu/torch_reference.py oracle DIR      compare with `07_train_gpu grads ... --dump DIR`
    python3 07_train_gpu/torch_reference.py steps DIR       N optimizer steps vs `grads ... --steps N --dump DIR`
    python3 07_train_gpu/torch_reference.py --self-test     autograd vs central differences on a tiny model
    python3 07_train_gpu/torch_reference.py bench CONFIG [--batch 32] [--seq-len 512] [--steps 20] [--warmup 10]
        [--compile reduce-overhead|default|none] [--precision bf16|fp32] [--experts auto|grouped|loop] [--seed 1]
        [--device cuda]                                     training steps of the speed peer, timed (tokens/s)
    python3 07_train_gpu/torch_reference.py bench-check [--device cpu|cuda] [--compile none|default|reduce-overhead]
                                                            the speed peer against the oracle

The speed peer (FastModel, `bench`): the same loss written for speed, the PyTorch yardstick of `07_train_gpu bench`
(scripts/bench_vs_torch.sh runs both): bf16 autocast over fp32 master weights, SDPA attention, the routed experts
through torch._grouped_mm (torch >= 2.8; a loop over experts otherwise), fused AdamW, torch.compile. CONFIG: a
config.json such as `07_train_gpu bench --preset small --write-config FILE` writes.

DIR (written by the C++ program): config.json, model.safetensors (fp32, Hugging Face names), tokens.bin (int32,
B*(T+1)), losses.json ({B, T, ce, mtp, mtp_depths, balance, total}), grads.safetensors (fp32 gradient of the total
for every trained parameter, same names; the MoE biases e_score_correction_bias have none).

Shape legend: B batch, T positions per sequence, N = B*T, D hidden_size, V vocab_size, H heads,
Dq q_lora_rank, Dc kv_lora_rank, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim, S = Dn+Dr,
E routed experts, K experts per token, G expert groups, Lg kept groups, F expert width.

Runs on PyTorch 1.13 and 2.x (CPU is enough, bench's speed aside; no transformers, no safetensors package). Exit
status 0 on PASS, 1 on FAIL, 2 on a usage or input error.
"""
import argparse
import json
import math
import os
import struct
import sys
import time
import warnings

import numpy as np
import torch

# The oracle's tolerances (the brief): every loss part to 1e-6 relative, every gradient to 1e-5 normalised
# (||ours - torch|| / max(||torch||, tiny)), torch computing in float64 from the fp32 weights.
LOSS_TOL = 1e-6
GRAD_TOL = 1e-5
TINY = 1e-30
# A routing margin (gap between the last chosen and the best unchosen biased score, or between the last kept and
# the best dropped group) below this is close enough to a tie that the fp32 C++ may have decided otherwise.
NEAR_TIE = 1e-5


def f32(x):
    """The value a C++ `float` field holds for the double x (eps, alpha, lambda, route_scale are floats there)."""
    return float(np.float32(x))


# ---- files ------------------------------------------------------------------------------------------------------

def read_safetensors(path):
    """name -> float32 numpy array of the tensor's shape (dtypes F32, BF16, F16, F64). A minimal reader: 8-byte
    little-endian header length, JSON header, raw little-endian data."""
    with open(path, "rb") as fh:
        blob = fh.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError(f"{path}: header length {n} exceeds the file")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    out = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        raw = data[a:b]
        dt = v["dtype"]
        if dt == "F32":
            arr = np.frombuffer(raw, dtype="<f4")
        elif dt == "F64":
            arr = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        elif dt == "F16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: tensor '{name}' has dtype {dt}; F32, F64, F16 or BF16 expected")
        shape = tuple(int(s) for s in v["shape"])
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor '{name}' holds {arr.size} values for shape {shape}")
        out[name] = arr.reshape(shape).copy()
    return out


class Config:
    """The fields of config.json that 06_full_model/model_config.cpp reads, under their Hugging Face names, and
    our training fields (section nano_dsv3; losses.json may carry them too)."""

    def __init__(self, j, extra=None):
        self.vocab_size = int(j["vocab_size"])
        self.hidden_size = int(j["hidden_size"])
        self.intermediate_size = int(j["intermediate_size"])
        self.moe_intermediate_size = int(j["moe_intermediate_size"])
        self.num_hidden_layers = int(j["num_hidden_layers"])
        self.num_attention_heads = int(j["num_attention_heads"])
        self.q_lora_rank = int(j["q_lora_rank"] or 0)
        self.kv_lora_rank = int(j["kv_lora_rank"])
        self.qk_nope_head_dim = int(j["qk_nope_head_dim"])
        self.qk_rope_head_dim = int(j["qk_rope_head_dim"])
        self.v_head_dim = int(j["v_head_dim"])
        self.n_routed_experts = int(j["n_routed_experts"])
        self.n_shared_experts = int(j["n_shared_experts"])
        self.num_experts_per_tok = int(j["num_experts_per_tok"])
        self.n_group = int(j.get("n_group", 1))
        self.topk_group = int(j.get("topk_group", 1))
        self.routed_scaling_factor = float(j["routed_scaling_factor"])
        self.norm_topk_prob = bool(j["norm_topk_prob"])
        self.scoring_func = j.get("scoring_func", "sigmoid")
        self.first_k_dense_replace = int(j["first_k_dense_replace"])
        self.num_nextn_predict_layers = int(j["num_nextn_predict_layers"])
        self.rms_norm_eps = float(j["rms_norm_eps"])
        self.max_position_embeddings = int(j["max_position_embeddings"])
        # transformers 5 writes rope_parameters (rope_type, rope_theta, YaRN fields); older files rope_theta and
        # rope_scaling (null for plain RoPE)
        if "rope_parameters" in j:
            rp = j["rope_parameters"]
            self.rope_theta = float(rp["rope_theta"])
            self.rope_scaling = None if rp.get("rope_type") == "default" else rp
        else:
            self.rope_theta = float(j["rope_theta"])
            self.rope_scaling = j.get("rope_scaling")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported")
        if self.norm_topk_prob != (self.scoring_func == "sigmoid"):
            raise ValueError("norm_topk_prob must be true exactly with sigmoid scoring (model_config.cpp)")
        if j.get("tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings = true is not supported")
        t = dict(aux_alpha=1e-4, bias_update_speed=1e-3, mtp_lambda=0.3)  # TrainingFields defaults
        self.training_source = "defaults (model_config.h TrainingFields)"
        if extra and any(k in extra for k in t):
            t.update({k: extra[k] for k in t if k in extra})
            self.training_source = "losses.json"
        if "nano_dsv3" in j:
            t.update(j["nano_dsv3"])
            self.training_source = "config.json nano_dsv3"
        self.aux_alpha = float(t["aux_alpha"])
        self.mtp_lambda = float(t["mtp_lambda"])
        self.bias_update_speed = float(t["bias_update_speed"])

    def is_moe_layer(self, layer):
        return layer >= self.first_k_dense_replace


# ---- the model --------------------------------------------------------------------------------------------------

def rope_tables(c, T, dtype):
    """cos, sin (T, Dr/2) of stage 01: f_i = theta^(-2i/Dr), YaRN-corrected when active (max_position_embeddings
    > original_max_position_embeddings); and the softmax-scale factor mscale^2 (1 without YaRN)."""
    dim = c.qk_rope_head_dim
    half = dim // 2
    f = [1.0 / c.rope_theta ** ((2.0 * i) / dim) for i in range(half)]
    factor_sq = 1.0
    rs = c.rope_scaling
    if rs is not None:
        orig = int(rs["original_max_position_embeddings"])
        if c.max_position_embeddings > orig:  # RopeConfig::yarn_active
            factor = float(rs["factor"])

            def corr(rot):
                return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(c.rope_theta))

            low = max(int(math.floor(corr(float(rs["beta_fast"])))), 0)
            high = min(int(math.ceil(corr(float(rs["beta_slow"])))), dim - 1)
            lo, hi = float(low), float(high) if high != low else high + 0.001
            for i in range(half):
                ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
                smooth = 1.0 - ramp
                f[i] = f[i] / factor * (1.0 - smooth) + f[i] * smooth
            m = 0.1 * float(rs["mscale_all_dim"]) * math.log(factor) + 1.0  # ModelConfig::rope() takes mscale_all_dim
            factor_sq = m * m
    ang = np.arange(T, dtype=np.float64)[:, None] * np.array(f, dtype=np.float64)[None, :]
    return torch.tensor(np.cos(ang), dtype=dtype), torch.tensor(np.sin(ang), dtype=dtype), factor_sq


def rms_norm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def apply_rope(x, cos, sin):
    """Rotates adjacent pairs (x[2i], x[2i+1]) by angle p*f_i; x (B, T, ..., Dr), cos/sin (T, Dr/2)."""
    shape = x.shape
    xp = x.reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    extra = x0.dim() - 3  # head axes between T and the pairs
    c = cos.reshape(1, cos.shape[0], *([1] * extra), cos.shape[1])
    s = sin.reshape(1, sin.shape[0], *([1] * extra), sin.shape[1])
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(shape)


def swiglu(x, w1, w2, w3):
    """(silu(x w1^T) * (x w3^T)) w2^T."""
    return (torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


class Reference:
    """The model over a dict of HF-named leaf tensors P (float64 or float32)."""

    def __init__(self, c, P, dtype):
        self.c, self.P, self.dtype = c, P, dtype
        self.eps = f32(c.rms_norm_eps)  # MlaConfig/BlockConfig/MtpConfig norm_eps and lm_head's eps are floats
        self.route_scale = f32(c.routed_scaling_factor)
        self.alpha = f32(c.aux_alpha)
        self.mtp_lambda = f32(c.mtp_lambda)
        self.routing = {}  # layer -> dict(indices (N, K) numpy, min margins, near ties)
        self.forced = None  # layer -> indices to use instead of routing (the fp32 noise-floor pass)

    def p(self, name):
        return self.P[name]

    # -- 02 MLA, training form ------------------------------------------------------------------------------------
    def mla(self, x, pre, cos, sin, scale):
        c = self.c
        B, T, _ = x.shape
        H, Dn, Dr, Dv, Dc = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                             c.kv_lora_rank)
        a = pre + "self_attn."
        if c.q_lora_rank > 0:
            q = rms_norm(x @ self.p(a + "q_a_proj.weight").t(), self.p(a + "q_a_layernorm.weight"), self.eps)
            q = q @ self.p(a + "q_b_proj.weight").t()
        else:
            q = x @ self.p(a + "q_proj.weight").t()
        q = q.reshape(B, T, H, Dn + Dr)
        q_nope, q_pe = q[..., :Dn], apply_rope(q[..., Dn:], cos, sin)
        kva = x @ self.p(a + "kv_a_proj_with_mqa.weight").t()  # (B, T, Dc+Dr)
        c_kv = rms_norm(kva[..., :Dc], self.p(a + "kv_a_layernorm.weight"), self.eps)
        k_pe = apply_rope(kva[..., Dc:], cos, sin)  # (B, T, Dr): one per token, shared by the heads
        kv = (c_kv @ self.p(a + "kv_b_proj.weight").t()).reshape(B, T, H, Dn + Dv)
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        sc = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * scale
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        att = torch.softmax(sc.masked_fill(mask, float("-inf")), dim=-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, H * Dv)
        return y @ self.p(a + "o_proj.weight").t()

    # -- 03 DeepSeekMoE -------------------------------------------------------------------------------------------
    def route(self, sel, layer):
        """The discrete decisions of moe_route.h::route_token on the biased scores sel (N, E), numpy float64:
        group scores (sum of each group's top-2), the topk_group best groups, the top-K experts among them; ties
        to the lower index. Returns indices (N, K) in rank order and records the decision margins."""
        c = self.c
        N, E = sel.shape
        K, G, Lg = c.num_experts_per_tok, c.n_group, c.topk_group
        sel = sel.copy()
        gmargin = np.full(N, np.inf)
        if G > 1:
            Eg = E // G
            grp = np.sort(sel.reshape(N, G, Eg), axis=-1)[..., ::-1]
            gscore = grp[..., 0] + grp[..., 1]  # (N, G)
            gorder = np.argsort(-gscore, axis=-1, kind="stable")
            keep = np.zeros((N, G), dtype=bool)
            np.put_along_axis(keep, gorder[:, :Lg], True, axis=-1)
            if Lg < G:
                gs = np.take_along_axis(gscore, gorder, axis=-1)
                gmargin = gs[:, Lg - 1] - gs[:, Lg]
            sel[~np.repeat(keep, Eg, axis=1)] = -np.inf
        order = np.argsort(-sel, axis=-1, kind="stable")
        idx = order[:, :K]
        ss = np.take_along_axis(sel, order, axis=-1)
        emargin = ss[:, K - 1] - ss[:, K] if K < E else np.full(N, np.inf)  # inf when the rest was dropped
        margin = np.minimum(gmargin, emargin)
        self.routing[layer] = dict(indices=idx, margin=margin, gmargin=gmargin, emargin=emargin)
        return idx

    def moe(self, x, pre, layer):
        c = self.c
        B, T, D = x.shape
        N, E = B * T, c.n_routed_experts
        m = pre + "mlp."
        xf = x.reshape(N, D)
        logits = xf @ self.p(m + "gate.weight").t()
        softmax = c.scoring_func == "softmax"
        s = torch.softmax(logits, dim=-1) if softmax else torch.sigmoid(logits)  # (N, E) unbiased affinities
        bias = self.P.get(m + "gate.e_score_correction_bias")
        with torch.no_grad():
            sel = s.detach().double().numpy()
            if bias is not None:
                sel = sel + bias.detach().double().numpy()[None, :]  # the bias only chooses experts
        idx = self.route(sel, layer)
        if self.forced is not None:
            idx = self.forced[layer]
        idx_t = torch.from_numpy(np.ascontiguousarray(idx)).long()
        w = torch.gather(s, 1, idx_t)  # (N, K) unbiased scores of the chosen experts
        if not softmax:
            w = w / w.sum(-1, keepdim=True)  # norm_topk_prob
        w = w * self.route_scale
        out = torch.zeros_like(xf)
        if c.n_shared_experts > 0:
            sh = m + "shared_experts."
            out = swiglu(xf, self.p(sh + "gate_proj.weight"), self.p(sh + "down_proj.weight"),
                         self.p(sh + "up_proj.weight"))
        routed = torch.zeros_like(xf)
        for e in range(E):
            rows, slot = np.nonzero(idx == e)
            if rows.size == 0:
                continue
            r = torch.from_numpy(rows).long()
            ex = f"{m}experts.{e}."
            y = swiglu(xf[r], self.p(ex + "gate_proj.weight"), self.p(ex + "down_proj.weight"),
                       self.p(ex + "up_proj.weight"))
            routed = routed.index_add(0, r, y * w[r, torch.from_numpy(slot).long()].unsqueeze(1))
        return (out + routed).reshape(B, T, D), s, idx

    # -- 04 sequence-wise balance loss ----------------------------------------------------------------------------
    def balance(self, s, idx, B, T):
        """alpha * mean_b sum_i f_{b,i} P_{b,i}: f_{b,i} = E/(K T) * tokens of sequence b routed to i (a count, no
        gradient), P_{b,i} = (1/T) sum_t s_{i,t} / sum_j s_{j,t}."""
        E, K = self.c.n_routed_experts, self.c.num_experts_per_tok
        cnt = np.zeros((B, E))
        for b in range(B):
            cnt[b] = np.bincount(idx[b * T:(b + 1) * T].reshape(-1), minlength=E)
        f = torch.tensor(cnt * (E / (K * T)), dtype=s.dtype)
        sn = s / s.sum(-1, keepdim=True)
        P = sn.reshape(B, T, E).mean(1)
        return self.alpha * (f * P).sum(-1).mean()

    # -- 05 block -------------------------------------------------------------------------------------------------
    def block(self, x, layer, cos, sin, scale, bal):
        pre = f"model.layers.{layer}."
        h = x + self.mla(rms_norm(x, self.p(pre + "input_layernorm.weight"), self.eps), pre, cos, sin, scale)
        hf = rms_norm(h, self.p(pre + "post_attention_layernorm.weight"), self.eps)
        if self.c.is_moe_layer(layer):
            y, s, idx = self.moe(hf, pre, layer)
            if self.c.aux_alpha > 0:  # Model::has_balance_loss
                bal.append(self.balance(s, idx, x.shape[0], x.shape[1]))
        else:
            m = pre + "mlp."
            y = swiglu(hf, self.p(m + "gate_proj.weight"), self.p(m + "down_proj.weight"), self.p(m + "up_proj.weight"))
        return h + y

    @staticmethod
    def ce_rows(logits, targets):
        """Per-row -log softmax(logits)[target]; logits (N, V), targets (N)."""
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    # -- 06 the whole loss ----------------------------------------------------------------------------------------
    def forward(self, window, B, T):
        """window: int64 numpy (B, T+1). Returns dict(ce, mtp, mtp_depths, balance, total) of torch scalars."""
        c = self.c
        L, depth, V = c.num_hidden_layers, c.num_nextn_predict_layers, c.vocab_size
        cos, sin, fsq = rope_tables(c, T, self.dtype)
        scale = 1.0 / math.sqrt(c.qk_nope_head_dim + c.qk_rope_head_dim) * fsq
        win = torch.from_numpy(window).long()
        inputs, targets = win[:, :T], win[:, 1:]
        emb, norm, head = self.p("model.embed_tokens.weight"), self.p("model.norm.weight"), self.p("lm_head.weight")
        bal = []
        h = emb[inputs]
        for l in range(L):
            h = self.block(h, l, cos, sin, scale, bal)
        z = rms_norm(h, norm, self.eps)
        ce = self.ce_rows((z @ head.t()).reshape(B * T, V), targets.reshape(-1)).mean()
        # MTP: module k (1..depth) at position i reads z^{k-1}_i and Emb(t_{i+k}) (t_T past the end), predicts
        # t_{i+k+1} for i < T-k; CE_k = sum over those rows / (B T)... = (mean over the B(T-k) rows) * (T-k)/T
        depths = []
        hprev = z
        for k in range(1, depth + 1):
            pre = f"model.layers.{L + k - 1}."
            pos = torch.clamp(torch.arange(T) + k, max=T)
            tok = win[:, pos]  # (B, T)
            en = rms_norm(emb[tok], self.p(pre + "enorm.weight"), self.eps)
            hn = rms_norm(hprev, self.p(pre + "hnorm.weight"), self.eps)
            hp = torch.cat((en, hn), dim=-1) @ self.p(pre + "eh_proj.weight").t()  # embedding first
            hk = self.block(hp, L + k - 1, cos, sin, scale, bal)
            zk = rms_norm(hk, norm, self.eps)
            if T > k:
                rows = self.ce_rows((zk[:, :T - k] @ head.t()).reshape(B * (T - k), V),
                                    win[:, k + 1:T + 1].reshape(-1))
                depths.append(rows.mean() * ((T - k) / T))
            else:
                depths.append(torch.zeros((), dtype=self.dtype))
            hprev = zk
        zero = torch.zeros((), dtype=self.dtype)
        mtp = self.mtp_lambda / depth * sum(depths) if depth > 0 else zero
        balance = sum(bal) if bal else zero
        return dict(ce=ce, mtp=mtp, mtp_depths=depths, balance=balance, total=ce + mtp + balance)


def trained_names(c):
    """HF names of every parameter the model trains (the gradients expected), in the model's list order."""
    L, depth, E = c.num_hidden_layers, c.num_nextn_predict_layers, c.n_routed_experts
    names = ["model.embed_tokens.weight"]

    def block(l):
        p = f"model.layers.{l}."
        a = p + "self_attn."
        out = [p + "input_layernorm.weight"]
        if c.q_lora_rank > 0:
            out += [a + "q_a_proj.weight", a + "q_a_layernorm.weight", a + "q_b_proj.weight"]
        else:
            out += [a + "q_proj.weight"]
        out += [a + "kv_a_proj_with_mqa.weight", a + "kv_a_layernorm.weight", a + "kv_b_proj.weight",
                a + "o_proj.weight", p + "post_attention_layernorm.weight"]
        m = p + "mlp."
        if not c.is_moe_layer(l):
            out += [m + "gate_proj.weight", m + "up_proj.weight", m + "down_proj.weight"]
        else:
            out += [m + "gate.weight"]
            for kind in ("gate_proj", "down_proj", "up_proj"):
                out += [f"{m}experts.{e}.{kind}.weight" for e in range(E)]
            if c.n_shared_experts > 0:
                out += [m + f"shared_experts.{k}.weight" for k in ("gate_proj", "down_proj", "up_proj")]
        return out

    for l in range(L):
        names += block(l)
    names += ["model.norm.weight", "lm_head.weight"]
    for k in range(depth):
        p = f"model.layers.{L + k}."
        names += [p + "enorm.weight", p + "hnorm.weight", p + "eh_proj.weight"] + block(L + k)
    return names


def bias_names(c):
    L, depth = c.num_hidden_layers, c.num_nextn_predict_layers
    return [f"model.layers.{l}.mlp.gate.e_score_correction_bias" for l in range(L + depth) if c.is_moe_layer(l)]


def mirror_names(c):
    """The copies of the shared tensors DeepSeek's release stores with each MTP module (checkpoint.cpp):
    name -> the tensor it copies."""
    out = {}
    for k in range(c.num_nextn_predict_layers):
        p = f"model.layers.{c.num_hidden_layers + k}."
        out[p + "embed_tokens.weight"] = "model.embed_tokens.weight"
        out[p + "shared_head.norm.weight"] = "model.norm.weight"
        out[p + "shared_head.head.weight"] = "lm_head.weight"
    return out


def make_params(c, arrays, dtype):
    """Leaf tensors (dtype) of the trained parameters (requires_grad) and the biases (constants)."""
    P = {}
    for n in trained_names(c):
        if n not in arrays:
            raise ValueError(f"model.safetensors: tensor '{n}' is missing")
        P[n] = torch.tensor(arrays[n], dtype=dtype).requires_grad_(True)
    for n in bias_names(c):
        if n in arrays:
            P[n] = torch.tensor(arrays[n], dtype=dtype)
    return P


# ---- the oracle -------------------------------------------------------------------------------------------------

def rel(a, b):
    return abs(a - b) / max(abs(b), TINY)


def print_problems(problems, most=40):
    """The failures a check found, the first `most` of them."""
    print("\nproblems:")
    for p in problems[:most]:
        print("  " + p)
    if len(problems) > most:
        print(f"  ... and {len(problems) - most} more")


def read_dump(d, who):
    """A `07_train_gpu grads --dump d` folder: (config, losses.json, B, T, windows (B, T+1) int64, weights), or None
    after printing `<who>: FAIL (why)`."""
    losses = json.load(open(os.path.join(d, "losses.json")))
    c = Config(json.load(open(os.path.join(d, "config.json"))), losses)
    B, T = int(losses["B"]), int(losses["T"])
    toks = np.fromfile(os.path.join(d, "tokens.bin"), dtype="<i4")
    if toks.size != B * (T + 1):
        print(f"{who}: FAIL (tokens.bin holds {toks.size} tokens, B*(T+1) = {B * (T + 1)} expected)")
        return None
    window = toks.reshape(B, T + 1).astype(np.int64)
    if window.min() < 0 or window.max() >= c.vocab_size:
        print(f"{who}: FAIL (a token is outside the vocabulary [0, {c.vocab_size}))")
        return None
    return c, losses, B, T, window, read_safetensors(os.path.join(d, "model.safetensors"))


def oracle(d, noise_floor=True):
    dump = read_dump(d, "oracle")
    if dump is None:
        return 1
    c, losses, B, T, window, weights = dump
    grads = read_safetensors(os.path.join(d, "grads.safetensors"))
    print(f"oracle on {d}: B={B} T={T} L={c.num_hidden_layers} MTP depth={c.num_nextn_predict_layers} "
          f"D={c.hidden_size} V={c.vocab_size} E={c.n_routed_experts} K={c.num_experts_per_tok} "
          f"aux_alpha={c.aux_alpha} mtp_lambda={c.mtp_lambda} (from {c.training_source}); torch {torch.__version__}")

    # 1) float64 forward and autograd of the total
    P = make_params(c, weights, torch.float64)
    ref = Reference(c, P, torch.float64)
    out = ref.forward(window, B, T)
    out["total"].backward()
    problems = []

    # 2) the loss parts
    print("\nloss part       ours (C++)            torch float64         rel. error")
    parts = [("ce", losses["ce"], out["ce"].item()), ("mtp", losses["mtp"], out["mtp"].item()),
             ("balance", losses["balance"], out["balance"].item()), ("total", losses["total"], out["total"].item())]
    ours_depths = losses.get("mtp_depths", [])
    if len(ours_depths) != len(out["mtp_depths"]):
        problems.append(f"mtp_depths has {len(ours_depths)} entries, the config has {len(out['mtp_depths'])} modules")
    for k, (a, b) in enumerate(zip(ours_depths, out["mtp_depths"])):
        parts.append((f"mtp_depth[{k + 1}]", a, b.item()))
    worst_loss = 0.0
    for name, a, b in parts:
        e = rel(float(a), b)
        worst_loss = max(worst_loss, e)
        flag = "  <-- over 1e-6" if e > LOSS_TOL else ""
        print(f"{name:15s} {float(a):20.12g}  {b:20.12g}  {e:10.3e}{flag}")
        if e > LOSS_TOL:
            problems.append(f"loss {name}: ours {float(a):.10g} vs torch {b:.10g} (rel {e:.2e})")

    # 3) routing decisions: the smallest margins (a flip in the fp32 C++ cannot be seen in its outputs directly)
    near = []
    print("\nrouting (biased top-k): smallest decision margin per MoE layer")
    for l in sorted(ref.routing):
        r = ref.routing[l]
        i = int(np.argmin(r["margin"]))
        where = f"token b={i // T} t={i % T}"
        kind = "group" if r["gmargin"][i] <= r["emargin"][i] else "expert"
        nn = int((r["margin"] < NEAR_TIE).sum())
        print(f"  layer {l:3d}{' (MTP)' if l >= c.num_hidden_layers else '      '}  min margin {r['margin'][i]:.3e} "
              f"({kind} choice, {where}); {nn} token(s) under {NEAR_TIE:g}")
        for j in np.nonzero(r["margin"] < NEAR_TIE)[0]:
            near.append(f"layer {l} token b={j // T} t={j % T} (margin {r['margin'][j]:.2e})")

    # 4) the gradients
    trained = trained_names(c)
    missing = [n for n in trained if n not in grads]
    for n in missing:
        problems.append(f"grads.safetensors lacks '{n}'")
    # beside the trained parameters the file may hold what the checkpoint writer always writes: the MoE biases
    # (no gradient: must be zeros) and DeepSeek's per-module copies of the shared tensors (must equal the source)
    mirrors = mirror_names(c)
    biases = set(bias_names(c))
    extras = 0
    for n in grads:
        if n in P and P[n].requires_grad:
            continue
        extras += 1
        if n in biases:
            if np.any(grads[n] != 0):
                problems.append(f"'{n}' (a routing bias, which has no gradient) holds nonzero values")
        elif n in mirrors:
            src = mirrors[n]
            if src not in grads or not np.array_equal(grads[n], grads[src]):
                problems.append(f"'{n}' is not a copy of '{src}'")
        else:
            problems.append(f"grads.safetensors has '{n}', which is not a parameter of this model")
    rows = []
    for n in trained:
        if n not in grads:
            continue
        g = P[n].grad
        g = torch.zeros_like(P[n]) if g is None else g
        ours = torch.tensor(grads[n], dtype=torch.float64)
        if tuple(ours.shape) != tuple(g.shape):
            problems.append(f"'{n}': gradient shape {tuple(ours.shape)}, expected {tuple(g.shape)}")
            continue
        nb = g.norm().item()
        err = (ours - g).norm().item() / max(nb, TINY)
        if nb == 0 and ours.norm().item() == 0:
            err = 0.0
        rows.append((err, n, ours.norm().item(), nb))

    # 5) the fp32 noise floor: the same reference in float32 with the float64 pass's routing, against float64
    floor = {}
    if noise_floor:
        P32 = make_params(c, weights, torch.float32)
        r32 = Reference(c, P32, torch.float32)
        r32.forced = {l: v["indices"] for l, v in ref.routing.items()}
        o32 = r32.forward(window, B, T)
        o32["total"].backward()
        for n in trained:
            g64, g32 = P[n].grad, P32[n].grad
            if g64 is None or g32 is None:
                continue
            floor[n] = (g32.double() - g64).norm().item() / max(g64.norm().item(), TINY)
        floor["__losses__"] = max(rel(o32[k].item(), out[k].item()) for k in ("ce", "mtp", "balance", "total"))

    rows.sort(reverse=True)
    print(f"\ngradients: worst 10 of {len(rows)} tensors, error = ||ours - torch|| / ||torch||"
          + ("  (floor: torch fp32 vs fp64)" if floor else ""))
    print(f"  {'error':>10s}  {'floor':>10s}  {'||ours||':>12s}  {'||torch||':>12s}  tensor")
    for err, n, na, nb in rows[:10]:
        fl = f"{floor[n]:10.3e}" if n in floor else f"{'-':>10s}"
        print(f"  {err:10.3e}  {fl}  {na:12.5e}  {nb:12.5e}  {n}")
    worst = rows[0][0] if rows else 0.0
    over = [r for r in rows if r[0] > GRAD_TOL]
    for err, n, _, _ in over:
        problems.append(f"gradient '{n}': error {err:.2e}")

    # per-layer summary: the worst error of each layer (where a mismatch starts)
    per_layer = {}
    for err, n, _, _ in rows:
        parts_n = n.split(".")
        key = f"layer {parts_n[2]}" if parts_n[:2] == ["model", "layers"] else n
        per_layer[key] = max(per_layer.get(key, 0.0), err)
    print("\nworst gradient error per layer: " + ", ".join(
        f"{k}: {v:.1e}" for k, v in sorted(per_layer.items(), key=lambda kv: (len(kv[0]), kv[0]))))
    if floor:
        fmax = max(v for k, v in floor.items() if k != "__losses__")
        print(f"fp32 noise floor of this model (torch float32 vs float64, same routing): gradients up to "
              f"{fmax:.2e}, losses up to {floor['__losses__']:.2e} relative")

    if extras:
        print(f"{extras} further tensor(s) in grads.safetensors checked (routing biases must be all zero, the MTP "
              f"modules' copies of the shared tensors equal to their source)")
    summary = (f"max grad error {worst:.2e} over {len(rows)} tensors; losses max rel error {worst_loss:.2e} "
               f"(ce {out['ce'].item():.6g}, mtp {out['mtp'].item():.6g}, balance {out['balance'].item():.6g}, "
               f"total {out['total'].item():.6g})")
    if problems:
        print_problems(problems)
        if near:
            print(f"near-tie routing decisions (the fp32 C++ may have chosen other experts there; check these "
                  f"first): {'; '.join(near[:10])}")
        print(f"oracle: FAIL ({summary}; {len(problems)} problem(s))")
        return 1
    print(f"oracle: PASS ({summary})")
    return 0


# ---- N optimizer steps ------------------------------------------------------------------------------------------

# The steps' tolerances. Losses and grad_norm: 1e-4 relative at every step (the brief's target; step 1 is the oracle's
# 1e-6 case, later steps add the drift of the fp32 C++ weights from the float64-gradient ones). Final weights: the
# per-tensor error ||ours - torch|| / ||torch||, bounded by STEPS_W_FLOOR_X times the float32 noise floor of the
# same trajectory (torch float32 vs torch float64, both with the C++'s fp32 AdamW), but never below STEPS_W_MIN.
# Why a floor and not a fixed number: Adam normalises each element's step to about lr * m^/sqrt(v^), so an element
# whose gradient is near zero (its fp32 rounding noise comparable to its value) moves by about +-lr whatever its
# size; fp32 vs fp64 gradients flip such signs, and the per-tensor error after N steps scales with lr*sqrt(count of
# such elements), not with the gradients' 1e-6 agreement. The float32 torch run shows how large that is for this
# model, lr and N; an optimizer bug (wrong eps, bias correction, decay set, schedule, clipping) moves whole tensors
# by O(lr) per element and lands orders of magnitude above it.
STEPS_LOSS_TOL = 1e-4
STEPS_W_FLOOR_X = 10.0
STEPS_W_MIN = 1e-5


def lr_at(cfg, step):
    """07_train_gpu/train.cpp lr_at: linear warm-up to lr, then a cosine to lr * min_lr_ratio at max_steps."""
    lr, lo_ratio = float(cfg["lr"]), float(cfg["min_lr_ratio"])
    warm, max_steps = int(cfg["warmup_steps"]), int(cfg["max_steps"])
    step = max(step, 1)
    if step <= warm:
        return lr * float(step) / float(warm)
    lo = lr * lo_ratio
    decay_steps = max_steps - warm
    if step >= max_steps or decay_steps <= 0:
        return lo
    progress = float(step - warm) / float(decay_steps)
    return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_norm(name):
    """ParamKind::Norm (never decayed): every RMSNorm weight; the rest (matrices, the embedding) decay."""
    return name.endswith("norm.weight")


def adamw_f32(p, g, m, v, lr, wd, b1, b2, step, decay):
    """04_aux_loss/adamw.h adamw_scalars + adamw_update, CPU form, in float32 numpy: every product rounded."""
    f = np.float32
    lr32 = f(lr)
    lr_wd = f(lr32 * f(wd)) if decay else f(0)  # T(c.lr * c.weight_decay), both floats
    b1, b2 = f(b1), f(b2)
    omb1, omb2 = f(1) - b1, f(1) - b2
    eps = f(1e-8)  # AdamWConfig::eps (main.cpp leaves it)
    bc1 = f(1.0 - math.pow(float(b1), float(step)))
    bc2 = f(1.0 - math.pow(float(b2), float(step)))
    m[...] = b1 * m + omb1 * g
    v[...] = b2 * v + (omb2 * g) * g
    mhat, vhat = m / bc1, v / bc2
    root = np.sqrt(vhat)
    p[...] = p - lr_wd * p
    p[...] = p - (lr32 * mhat) / (root + eps)


def trajectory(c, weights, window, B, T, scfg, N, dtype, log=None):
    """The C++'s N steps (run_grads_command --steps): forward/backward at the current fp32 weights (computed in
    dtype), global norm, clipping, fp32 AdamW at lr_at(s), the bias update from this forward's loads."""
    trained = trained_names(c)
    W = {n: np.array(weights[n], dtype=np.float32) for n in trained}
    bias = {n: np.array(weights[n], dtype=np.float32) for n in bias_names(c) if n in weights}
    m = {n: np.zeros_like(W[n]) for n in trained}
    v = {n: np.zeros_like(W[n]) for n in trained}
    E, K = c.n_routed_experts, c.num_experts_per_tok
    gamma = np.float32(c.bias_update_speed)
    clip = float(scfg.get("grad_clip", 1.0))
    recs = []
    for s in range(1, N + 1):
        P = make_params(c, {**W, **bias}, dtype)
        ref = Reference(c, P, dtype)
        out = ref.forward(window, B, T)
        out["total"].backward()
        G = {}
        for n in trained:
            g = P[n].grad
            G[n] = np.zeros_like(W[n]) if g is None else g.detach().double().numpy().astype(np.float32)
        norm = math.sqrt(sum(float(np.dot(g.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64)))
                             for g in G.values()))  # backend_cpu grad_norm: sum of double(g)^2 of the fp32 grads
        lr = f32(lr_at(scfg, s))  # opt.lr = float(lr_at(cfg, s))
        scale = np.float32(clip / norm) if (clip > 0 and norm > clip) else np.float32(1)
        for n in trained:
            g = G[n] * scale if scale != 1 else G[n]  # grad[j] * grad_scale in float
            adamw_f32(W[n], g, m[n], v[n], lr, float(np.float32(scfg["weight_decay"])), float(np.float32(scfg["beta1"])),
                      float(np.float32(scfg["beta2"])), s, not is_norm(n))
        loads = {}
        for l, r in ref.routing.items():
            cnt = np.bincount(r["indices"].reshape(-1), minlength=E)
            loads[l] = cnt
            name = f"model.layers.{l}.mlp.gate.e_score_correction_bias"
            if gamma > 0 and name in bias:
                err = float(B * T) * K / E - cnt
                bias[name] = (bias[name] + gamma * np.sign(err).astype(np.float32)).astype(np.float32)
        margins = {l: float(r["margin"].min()) for l, r in ref.routing.items()}
        near = [(l, int(j), float(r["margin"][j])) for l, r in ref.routing.items()
                for j in np.nonzero(r["margin"] < NEAR_TIE)[0]]
        recs.append(dict(step=s, lr=lr, ce=out["ce"].item(), mtp=out["mtp"].item(), balance=out["balance"].item(),
                         total=out["total"].item(), grad_norm=norm, scale=float(scale), margins=margins, near=near,
                         loads=loads))
        if log:
            log(s)
    return recs, W, bias


def steps_check(d, floor=True):
    dump = read_dump(d, "steps")
    if dump is None:
        return 1
    c, losses, B, T, window, weights = dump
    sj = json.load(open(os.path.join(d, "steps.json")))
    final = read_safetensors(os.path.join(d, "final.safetensors"))
    N = int(sj["steps"])
    scfg = sj["config"]
    recs_c = sj["records"]
    print(f"steps on {d}: N={N} B={B} T={T} L={c.num_hidden_layers} MTP depth={c.num_nextn_predict_layers} "
          f"D={c.hidden_size} E={c.n_routed_experts} K={c.num_experts_per_tok}; config {json.dumps(scfg)}; "
          f"gamma={c.bias_update_speed} aux_alpha={c.aux_alpha} (from {c.training_source}); torch {torch.__version__}")
    problems = []
    if len(recs_c) != N:
        problems.append(f"steps.json has {len(recs_c)} records for steps = {N}")
    recs, W, bias = trajectory(c, weights, window, B, T, scfg, N, torch.float64)
    recs32 = W32 = bias32 = None
    if floor:
        recs32, W32, bias32 = trajectory(c, weights, window, B, T, scfg, N, torch.float32)

    # 1) the per-step table
    print(f"\n{'step':>4s} {'lr':>10s} {'total (C++)':>14s} {'rel ce':>9s} {'rel mtp':>9s} {'rel bal':>9s} "
          f"{'rel total':>9s} {'grad_norm':>11s} {'rel norm':>9s} {'clip':>7s} {'min margin':>10s} near"
          + ("  floor(max rel)" if floor else ""))
    worst_loss, first_bad = 0.0, None
    for i, r in enumerate(recs):
        if i >= len(recs_c):
            break
        rc = recs_c[i]
        errs = {k: rel(float(rc[k]), r[k]) for k in ("ce", "mtp", "balance", "total", "grad_norm")}
        e_lr = rel(float(rc["lr"]), r["lr"])
        if int(rc["step"]) != r["step"]:
            problems.append(f"record {i}: step {rc['step']}, expected {r['step']}")
        if e_lr > 1e-6:
            problems.append(f"step {r['step']}: lr {rc['lr']} vs lr_at {r['lr']:.10g}")
        bad = [k for k, e in errs.items() if e > STEPS_LOSS_TOL]
        if bad:
            problems.append(f"step {r['step']}: " + ", ".join(f"{k} ours {float(rc[k]):.10g} vs torch {r[k]:.10g} "
                                                              f"(rel {errs[k]:.2e})" for k in bad))
            if first_bad is None:
                first_bad = (r["step"], bad)
        worst_loss = max(worst_loss, max(errs.values()))
        fl = ""
        if floor:
            r32 = recs32[i]
            fl = f"  {max(rel(r32[k], r[k]) for k in ('ce', 'mtp', 'balance', 'total', 'grad_norm')):.2e}"
        print(f"{r['step']:4d} {r['lr']:10.4g} {float(rc['total']):14.8f} {errs['ce']:9.2e} {errs['mtp']:9.2e} "
              f"{errs['balance']:9.2e} {errs['total']:9.2e} {r['grad_norm']:11.5g} {errs['grad_norm']:9.2e} "
              f"{r['scale']:7.4f} {min(r['margins'].values()) if r['margins'] else float('inf'):10.2e} "
              f"{len(r['near'])}{fl}{'  <--' if bad else ''}")
    near_all = [(r["step"], l, j, mg) for r in recs for (l, j, mg) in r["near"]]
    if near_all:
        print(f"routing near-ties (margin < {NEAR_TIE:g}): " + "; ".join(
            f"step {s} layer {l} token b={j // T} t={j % T} ({mg:.1e})" for s, l, j, mg in near_all[:12]))
    if floor:
        flips = [r["step"] for r, r32 in zip(recs, recs32)
                 if any(not np.array_equal(a, r32["loads"][l]) for l, a in r["loads"].items())]
        if flips:
            print(f"torch float32 routed differently from float64 (expert loads) at steps {flips[:10]}")

    # 2) final weights
    trained = trained_names(c)
    rows = []
    for n in trained:
        if n not in final:
            problems.append(f"final.safetensors lacks '{n}'")
            continue
        ours = final[n].astype(np.float64)
        t = W[n].astype(np.float64)
        if ours.shape != t.shape:
            problems.append(f"'{n}': final shape {ours.shape}, expected {t.shape}")
            continue
        nt = np.linalg.norm(t)
        err = np.linalg.norm(ours - t) / max(nt, TINY)
        moved = np.linalg.norm(t - weights[n].astype(np.float64))
        err_u = np.linalg.norm(ours - t) / max(moved, TINY)
        fl = np.linalg.norm(W32[n].astype(np.float64) - t) / max(nt, TINY) if floor else float("nan")
        rows.append((err, n, err_u, fl, float(np.abs(ours - t).max())))
    rows.sort(reverse=True)
    worst = rows[0][0] if rows else 0.0
    fmax = max((r[3] for r in rows), default=0.0) if floor else float("nan")
    wtol = max(STEPS_W_MIN, STEPS_W_FLOOR_X * fmax) if floor else 1e-3
    lr_sum = sum(r["lr"] for r in recs)
    print(f"\nfinal weights: worst 10 of {len(rows)} tensors, error = ||ours - torch|| / ||torch||; vs update = "
          f"||ours - torch|| / ||torch - initial||; max|d| in units of sum(lr) = {lr_sum:.3g}")
    print(f"  {'error':>10s}  {'vs update':>10s}  {'floor':>10s}  {'max|d|/sum lr':>13s}  tensor")
    for err, n, eu, fl, md in rows[:10]:
        print(f"  {err:10.3e}  {eu:10.3e}  {fl:10.3e}  {md / max(lr_sum, TINY):13.3e}  {n}")
    if floor:
        print(f"fp32 noise floor of this trajectory (torch float32 vs float64): per-tensor error up to {fmax:.2e}; "
              f"tolerance max({STEPS_W_MIN:g}, {STEPS_W_FLOOR_X:g} x floor) = {wtol:.2e}")
    for err, n, _, _, _ in rows:
        if err > wtol:
            problems.append(f"final '{n}': error {err:.2e} over {wtol:.2e}")

    # 3) routing biases: they move by +-gamma, so compare as fp32 values, by count of entries differing
    bdiff, btotal = 0, 0
    for n, b in bias.items():
        if n not in final:
            problems.append(f"final.safetensors lacks '{n}'")
            continue
        d_ = np.nonzero(final[n].astype(np.float32) != b)[0]
        btotal += b.size
        bdiff += d_.size
        if d_.size:
            steps_off = np.abs(final[n].astype(np.float64) - b.astype(np.float64)) / max(c.bias_update_speed, TINY)
            problems.append(f"bias '{n}': {d_.size} of {b.size} entries differ (experts {d_.tolist()[:8]}, by "
                            f"{np.round(steps_off[d_], 2).tolist()[:8]} x gamma)")
    print(f"routing biases: {bdiff} of {btotal} entries differ from torch's (exact fp32 comparison)")
    # the mirrors DeepSeek's layout keeps in each MTP module must equal their source
    for n, src in mirror_names(c).items():
        if n in final and (src not in final or not np.array_equal(final[n], final[src])):
            problems.append(f"final '{n}' is not a copy of '{src}'")
    for n in final:
        if n not in W and n not in bias and n not in mirror_names(c):
            problems.append(f"final.safetensors has '{n}', which is not a tensor of this model")

    summary = (f"{N} steps; losses/grad_norm max rel error {worst_loss:.2e} (tol {STEPS_LOSS_TOL:g}); final weights "
               f"max error {worst:.2e} (tol {wtol:.2e}); biases {bdiff}/{btotal} differ; last total "
               f"{recs[-1]['total']:.6g}" if recs else "0 steps")
    if problems:
        print_problems(problems)
        if first_bad:
            print(f"first diverging step: {first_bad[0]} ({', '.join(first_bad[1])})")
        print(f"steps: FAIL ({summary}; {len(problems)} problem(s))")
        return 1
    print(f"steps: PASS ({summary})")
    return 0


# ---- the speed peer ---------------------------------------------------------------------------------------------
#
# The same loss as Reference, written the way a PyTorch user writes a fast trainer: nn.Modules under the Hugging
# Face names, fp32 master weights, bf16 autocast, SDPA attention, each MoE layer's routed experts as two grouped
# matrix products over the (token, slot) rows sorted by expert, torch.compile. `bench` times its training steps
# (the yardstick of `07_train_gpu bench`), `bench-check` checks it against Reference.

def torch_version():
    """(major, minor) of the running torch: '2.11.0+cu130' -> (2, 11), '1.13.0a0' -> (1, 13)."""
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")  # torch >= 2.8: (M, K) x (G, K, N) with group ends offs
# SDPA takes `scale` from torch 2.1; before that the explicit form below
SDPA = torch.nn.functional.scaled_dot_product_attention if torch_version() >= (2, 1) else None


def linear(d_in, d_out):
    return torch.nn.Linear(d_in, d_out, bias=False)


def rope(x, cos, sin):
    """apply_rope in fp32 (the tables' type), returned in x's type (bf16 under autocast)."""
    return apply_rope(x, cos, sin).to(x.dtype)


def causal_attention(q, k, v, scale):
    """softmax(q k^T scale, causal) v: q, k (B, H, T, S), v (B, H, T, Dv) -> (B, H, T, Dv). SDPA picks its kernel
    from the shapes and dtype (bench prints which; with Dv != S its flash kernel does not qualify)."""
    if SDPA is not None:
        return SDPA(q, k, v, is_causal=True, scale=scale)
    T = q.shape[2]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    att = torch.softmax(((q @ k.transpose(-1, -2)) * scale).masked_fill(mask, float("-inf")), dim=-1)
    return att.to(v.dtype) @ v


class RMSNorm(torch.nn.Module):
    """rms_norm in fp32 whatever comes in; the output stays fp32 (the next product's autocast casts it)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))  # (dim)

    def forward(self, x):
        return rms_norm(x.float(), self.weight, self.eps)


class SwiGLU(torch.nn.Module):
    """A dense FFN (layers < first_k_dense_replace) or the shared experts: down(silu(gate x) * up x)."""

    def __init__(self, D, F):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(D, F), linear(D, F), linear(F, D)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(torch.nn.Module):
    """02 MLA, training form: per-head K_nope and V decompressed from the latent c_kv, one rope key per token
    shared by the heads, then causal SDPA over head dims S = Dn + Dr (q, k) and Dv (v)."""

    def __init__(self, c, eps):
        super().__init__()
        D, H = c.hidden_size, c.num_attention_heads
        self.H, self.Dn, self.Dr, self.Dv, self.Dc = (H, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                                                      c.kv_lora_rank)
        S = self.Dn + self.Dr
        self.q_lora = c.q_lora_rank > 0
        if self.q_lora:
            self.q_a_proj = linear(D, c.q_lora_rank)                   # (Dq, D)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps)
            self.q_b_proj = linear(c.q_lora_rank, H * S)               # (H S, Dq)
        else:
            self.q_proj = linear(D, H * S)                             # (H S, D)
        self.kv_a_proj_with_mqa = linear(D, self.Dc + self.Dr)         # (Dc + Dr, D)
        self.kv_a_layernorm = RMSNorm(self.Dc, eps)
        self.kv_b_proj = linear(self.Dc, H * (self.Dn + self.Dv))      # (H (Dn + Dv), Dc)
        self.o_proj = linear(H * self.Dv, D)                           # (D, H Dv)

    def forward(self, x, cos, sin, scale):
        B, T, _ = x.shape
        H, Dn, Dr, Dv, Dc = self.H, self.Dn, self.Dr, self.Dv, self.Dc
        # 1) queries: (B, T, H, Dn + Dr), the rope part rotated
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, H, Dn + Dr)
        q = torch.cat((q[..., :Dn], rope(q[..., Dn:], cos, sin)), dim=-1)
        # 2) the latent and the shared rope key, then per-head K_nope and V from the latent
        kva = self.kv_a_proj_with_mqa(x)                               # (B, T, Dc + Dr)
        k_pe = rope(kva[..., Dc:], cos, sin)                           # (B, T, Dr)
        kv = self.kv_b_proj(self.kv_a_layernorm(kva[..., :Dc])).view(B, T, H, Dn + Dv)
        k = torch.cat((kv[..., :Dn], k_pe.unsqueeze(2).expand(B, T, H, Dr)), dim=-1)
        # 3) attention over (B, H, T, .)
        y = causal_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., Dn:].transpose(1, 2), scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * Dv))


class GatherRows(torch.autograd.Function):
    """out = x[index], where row r of x appears K times in out, at the rows back_index[r K], ..., back_index[r K +
    K - 1]. The backward gathers too, grad_x[r] = sum_k grad_out[back_index[r K + k]], where the autograd of a plain
    x[index] scatter-adds (atomics, and bf16 sums rounded at every add)."""

    @staticmethod
    def forward(ctx, x, index, back_index, K):
        ctx.save_for_backward(back_index)
        ctx.K = K
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, g):
        (back_index,) = ctx.saved_tensors
        gx = g.index_select(0, back_index)
        if ctx.K > 1:
            gx = gx.view(-1, ctx.K, g.shape[1]).sum(1)
        return gx, None, None, None


def grouped_swiglu(xs, counts, wg, wu, wd):
    """Every routed expert's SwiGLU on its rows of xs (M, D), the rows grouped by expert, counts (E) rows each:
    gate and up as one grouped product with (E, D, 2F), then down with (E, F, D); bf16 operands, fp32 accumulation.
    wg, wu (E, F, D), wd (E, D, F): the fp32 masters, cast here."""
    F = wg.shape[1]
    offs = torch.cumsum(counts, 0).to(torch.int32)                   # (E) where each group's rows end
    w13 = torch.cat((wg, wu), dim=1).to(torch.bfloat16).transpose(1, 2)  # (E, D, 2F), column-major slices
    h = torch._grouped_mm(xs, w13, offs=offs)                          # (M, 2F)
    a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]                  # (M, F)
    return torch._grouped_mm(a, wd.to(torch.bfloat16).transpose(1, 2), offs=offs)  # (M, D)


def looped_swiglu(xs, counts, wg, wu, wd):
    """grouped_swiglu as one SwiGLU per expert: torch without _grouped_mm, the CPU and fp32 (the check). Reads the
    counts on the host, a synchronisation per layer."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n > 0:
            outs.append(swiglu(xs[start:start + n], wg[e], wd[e], wu[e]))
            start += n
    return torch.cat(outs)


class Router(torch.nn.Module):
    """mlp.gate: the affinity weight and the routing bias, a buffer (it only chooses experts: no gradient; the
    bias update moves it)."""

    def __init__(self, E, D):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(E, D))            # (E, D)
        self.register_buffer("e_score_correction_bias", torch.zeros(E))  # (E)


class Experts(torch.nn.Module):
    """The routed experts' weights stacked: expert e's Hugging Face tensors experts.{e}.{gate,up,down}_proj.weight
    are the slices [e] (FastModel.hf_tensors)."""

    def __init__(self, E, F, D):
        super().__init__()
        self.gate_proj = torch.nn.Parameter(torch.empty(E, F, D))      # (E, F, D)
        self.up_proj = torch.nn.Parameter(torch.empty(E, F, D))        # (E, F, D)
        self.down_proj = torch.nn.Parameter(torch.empty(E, D, F))      # (E, D, F)


class MoE(torch.nn.Module):
    """03 DeepSeekMoE with 04's sequence-wise balance loss. path: 'grouped' (torch._grouped_mm) or 'loop'."""

    def __init__(self, c, layer, path, cdtype):
        super().__init__()
        D, E, F = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        self.layer, self.path, self.cdtype = layer, path, cdtype
        self.E, self.K, self.G, self.Lg = E, c.num_experts_per_tok, c.n_group, c.topk_group
        self.softmax = c.scoring_func == "softmax"
        self.route_scale, self.alpha = f32(c.routed_scaling_factor), f32(c.aux_alpha)
        self.gate = Router(E, D)
        self.experts = Experts(E, F, D)
        if c.n_shared_experts > 0:
            self.shared_experts = SwiGLU(D, F * c.n_shared_experts)
        self.record = None  # a dict when set: layer -> idx of the last forward (bench-check)

    def route(self, xf):
        """Reference.route in torch ops on xf (N, D): s (N, E) the unbiased affinities, idx (N, K) the chosen
        experts, w (N, K) their weights, all fp32. The biased scores choose (group score = sum of the group's top-2,
        the topk_group best groups kept, the top-K experts among them); the weights are the unbiased s of the
        chosen, normalised to sum 1 (sigmoid), times routed_scaling_factor."""
        N, E = xf.shape[0], self.E
        with torch.autocast(xf.device.type, enabled=False):
            logits = xf.float() @ self.gate.weight.t()                # (N, E) fp32
        s = torch.softmax(logits, dim=-1) if self.softmax else torch.sigmoid(logits)
        with torch.no_grad():
            sel = s + self.gate.e_score_correction_bias
            if self.G > 1:
                grp = sel.view(N, self.G, E // self.G)
                gscore = grp.topk(2, dim=-1).values.sum(-1)           # (N, G)
                keep = torch.zeros_like(gscore, dtype=torch.bool)
                keep.scatter_(1, gscore.topk(self.Lg, dim=-1).indices, True)
                sel = grp.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)
            idx = sel.topk(self.K, dim=-1).indices                    # (N, K)
        w = s.gather(1, idx)
        if not self.softmax:
            w = w / w.sum(-1, keepdim=True)                           # norm_topk_prob
        return s, idx, w * self.route_scale

    def routed(self, xc, idx, w, counts):
        """sum_k w[t, k] expert_{idx[t, k]}(x_t) for every token: the N K (token, slot) rows sorted by expert (a
        stable sort: each expert's rows in token order), the experts' products, the rows back in slot order."""
        N, D = xc.shape
        K = self.K
        flat = idx.reshape(-1)                                        # (N K) expert of each slot
        order = torch.sort(flat, stable=True).indices                 # sorted row j holds slot order[j]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        xs = GatherRows.apply(xc, order // K, inverse, K)             # (N K, D) grouped by expert
        ex = self.experts
        run = grouped_swiglu if self.path == "grouped" else looped_swiglu
        ys = run(xs, counts, ex.gate_proj, ex.up_proj, ex.down_proj)  # (N K, D)
        yt = GatherRows.apply(ys, inverse, order, 1).view(N, K, D)    # slot order
        return (yt.float() * w.unsqueeze(-1)).sum(1)                  # (N, D) fp32

    def forward(self, x):
        """x (B, T, D) -> (output (B, T, D), balance term or None, loads (E): tokens routed to each expert)."""
        B, T, D = x.shape
        N, E, K = B * T, self.E, self.K
        xf = x.reshape(N, D)
        s, idx, w = self.route(xf)
        if self.record is not None:
            self.record[self.layer] = idx
        # tokens of each sequence routed to each expert: the balance loss's f (a count, no gradient) and the loads
        cnt = torch.zeros(B, E, dtype=s.dtype, device=x.device)
        cnt.scatter_add_(1, idx.view(B, T * K), torch.ones(B, T * K, dtype=s.dtype, device=x.device))
        load = cnt.sum(0)                                             # (E)
        bal = None
        if self.alpha > 0:  # Reference.balance: alpha * mean_b sum_i f_{b,i} P_{b,i}
            P = (s / s.sum(-1, keepdim=True)).view(B, T, E).mean(1)
            bal = self.alpha * (cnt * (E / (K * T)) * P).sum(-1).mean()
        out = self.routed(xf.to(self.cdtype), idx, w, load.long())
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(xf)
        return out.view(B, T, D), bal, load


class Block(torch.nn.Module):
    """05 block: h = x + MLA(norm x); h + FFN(norm h), the FFN dense or MoE. An MTP module's block also holds its
    enorm, hnorm and eh_proj (DeepSeek's layout: model.layers.{L + k - 1})."""

    def __init__(self, c, layer, path, cdtype, mtp):
        super().__init__()
        D, eps = c.hidden_size, f32(c.rms_norm_eps)
        if mtp:
            self.enorm, self.hnorm = RMSNorm(D, eps), RMSNorm(D, eps)
            self.eh_proj = linear(2 * D, D)                            # (D, 2D): embedding first
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(c, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.moe = c.is_moe_layer(layer)
        self.mlp = MoE(c, layer, path, cdtype) if self.moe else SwiGLU(D, c.intermediate_size)

    def forward(self, x, cos, sin, scale, aux):
        """aux collects (balance term, loads) of a MoE block."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, scale)
        hn = self.post_attention_layernorm(h)
        if not self.moe:
            return h + self.mlp(hn)
        y, bal, load = self.mlp(hn)
        aux.append((bal, load))
        return h + y


def resolve_experts(path, amp, device):
    """'auto' -> 'grouped' where torch._grouped_mm runs (CUDA, bf16), else 'loop'."""
    grouped_ok = HAS_GROUPED_MM and amp and torch.device(device).type == "cuda"
    if path == "auto":
        return "grouped" if grouped_ok else "loop"
    if path == "grouped" and not grouped_ok:
        raise ValueError(f"--experts grouped needs torch._grouped_mm (torch >= 2.8; this is {torch.__version__}), "
                         f"CUDA and bf16")
    return path


class FastModel(torch.nn.Module):
    """Reference's loss as a module: forward(window) -> dict(total, ce, mtp, mtp_depths, balance, loads).
    amp: bf16 autocast (fp32 master weights); off, everything is fp32 (bench-check). experts: 'grouped' or 'loop'
    (resolve_experts)."""

    def __init__(self, c, amp=True, experts="loop"):
        super().__init__()
        self.c, self.amp, self.experts = c, amp, experts
        cdtype = torch.bfloat16 if amp else torch.float32
        D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
        eps = f32(c.rms_norm_eps)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(V, D)                # (V, D)
        self.model.layers = torch.nn.ModuleList(
            Block(c, l, experts, cdtype, mtp=l >= L) for l in range(L + c.num_nextn_predict_layers))
        self.model.norm = RMSNorm(D, eps)
        self.lm_head = linear(D, V)                                       # (V, D)
        cos, sin, fsq = rope_tables(c, c.max_position_embeddings, torch.float32)
        self.register_buffer("rope_cos", cos, persistent=False)           # (max positions, Dr/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.scale = 1.0 / math.sqrt(c.qk_nope_head_dim + c.qk_rope_head_dim) * fsq
        self.mtp_lambda = f32(c.mtp_lambda)

    def moe_layers(self):
        return [b.mlp for b in self.model.layers if b.moe]

    def forward(self, window):
        """window (B, T+1) int64 on the model's device: inputs window[:, :T], targets window[:, 1:]."""
        with torch.autocast(window.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.loss(window)

    def ce(self, z, targets):
        """Mean cross-entropy of head(z) against targets; the logits upcast to fp32 (fused when compiled)."""
        logits = self.lm_head(z)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def loss(self, window):
        c, m = self.c, self.model
        T = window.shape[1] - 1
        L, depth = c.num_hidden_layers, c.num_nextn_predict_layers
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        aux = []
        # 1) the main model and its next-token loss
        h = m.embed_tokens(window[:, :T])
        for block in m.layers[:L]:
            h = block(h, cos, sin, self.scale, aux)
        z = m.norm(h)
        ce = self.ce(z, window[:, 1:])
        # 2) MTP module k reads z^{k-1} and Emb(t_{i+k}) (t_T past the end), predicts t_{i+k+1} for i < T-k
        depths, hprev = [], z
        pos = torch.arange(T, device=window.device)
        for k in range(1, depth + 1):
            block = m.layers[L + k - 1]
            emb = m.embed_tokens(window[:, (pos + k).clamp(max=T)])
            hp = block.eh_proj(torch.cat((block.enorm(emb), block.hnorm(hprev)), dim=-1))
            zk = m.norm(block(hp, cos, sin, self.scale, aux))
            depths.append(self.ce(zk[:, :T - k], window[:, k + 1:]) * ((T - k) / T) if T > k else z.new_zeros(()))
            hprev = zk
        # 3) the total
        zero = z.new_zeros(())
        mtp = self.mtp_lambda / depth * sum(depths) if depth > 0 else zero
        bals = [b for b, _ in aux if b is not None]
        balance = sum(bals) if bals else zero
        loads = torch.stack([ld for _, ld in aux]) if aux else z.new_zeros(0, c.n_routed_experts)
        return dict(total=ce + mtp + balance, ce=ce, mtp=mtp, mtp_depths=depths, balance=balance, loads=loads)

    @torch.no_grad()
    def update_bias(self, loads, gamma):
        """b_i += gamma sign(mean load - load_i) in every MoE layer (train.h apply_update), loads (MoE layers, E)
        from this step's forward."""
        if gamma == 0 or loads.numel() == 0:
            return
        err = torch.sign(loads.sum(-1, keepdim=True) / loads.shape[1] - loads)
        for moe, e in zip(self.moe_layers(), err.unbind(0)):
            moe.gate.e_score_correction_bias.add_(e, alpha=gamma)

    @torch.no_grad()
    def init_weights(self):
        """The C++ model's scales (06 model_cpu.cpp): embedding N(0, 1), every other matrix N(0, 1/fan_in), norm
        weights 1, routing biases 0."""
        for n, p in self.named_parameters():
            if is_norm(n):
                p.fill_(1.0)
            elif n == "model.embed_tokens.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for moe in self.moe_layers():
            moe.gate.e_score_correction_bias.zero_()

    def hf_tensors(self, grads=False):
        """Hugging Face name -> this model's tensor (grads: its gradient, None where there is none), the names of
        trained_names and bias_names; a routed expert's tensors are slices of the stacked parameters."""
        out = {}
        for n, p in self.named_parameters():
            t = p.grad if grads else p.detach()
            if ".mlp.experts." in n:
                pre, kind = n.rsplit(".", 1)
                for e in range(p.shape[0]):
                    out[f"{pre}.{e}.{kind}.weight"] = None if t is None else t[e]
            else:
                out[n] = t
        if not grads:
            for n, b in self.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    out[n] = b
        return out

    @torch.no_grad()
    def load_arrays(self, arrays):
        """Copies the numpy arrays of read_safetensors / random_arrays (HF names) into the parameters and biases."""
        for n, t in self.hf_tensors().items():
            if n not in arrays:
                raise ValueError(f"tensor '{n}' is missing")
            t.copy_(torch.from_numpy(np.asarray(arrays[n], dtype=np.float32)).reshape(t.shape))


def make_optimizer(model, lr, weight_decay, fused):
    """AdamW (betas 0.9, 0.95, eps 1e-8, decoupled decay): decay on every matrix and the embedding, none on the
    norm weights (is_norm, the C++'s ParamKind::Norm)."""
    named = list(model.named_parameters())
    groups = [dict(params=[p for n, p in named if not is_norm(n)], weight_decay=weight_decay),
              dict(params=[p for n, p in named if is_norm(n)], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **(dict(fused=True) if fused else {}))


def sdpa_backend(B, H, T, S, Dv, device):
    """The kernel SDPA runs for bf16 (B, H, T, S) q, k and (B, H, T, Dv) v, causal: the name of the aten op one
    eager call records ('flash', 'efficient', 'cudnn', 'math'), or 'explicit' below torch 2.1."""
    if SDPA is None:
        return "explicit"
    q = torch.randn(B, H, T, S, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, H, T, Dv, device=device, dtype=torch.bfloat16)
    with warnings.catch_warnings():  # the profiler's notes on its own cycles
        warnings.simplefilter("ignore")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            SDPA(q, q, v, is_causal=True, scale=S ** -0.5)
    names = " ".join(e.name for e in prof.events() if "scaled_dot_product" in e.name or "attention" in e.name)
    for kind in ("flash", "efficient", "cudnn", "math"):
        if kind in names:
            return kind
    return "unknown"


def median(v):
    s = sorted(v)
    n = len(s)
    return 0.0 if n == 0 else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


def bench(a):
    """Times training steps of FastModel on random tokens: forward of the whole loss, backward, clipping at 1,
    fused AdamW, the routing-bias update; the same protocol as `07_train_gpu bench` (synchronised steps, the
    median reported).

    Compile scope: the module, i.e. forward and (through AOTAutograd) backward, with the mode of --compile
    (reduce-overhead: replayed as CUDA graphs, the step boundary marked). The optimizer stays eager: fused AdamW is
    one multi-tensor kernel per parameter group and clip_grad_norm_'s foreach path a handful, 1.5 ms of a 24.7 ms
    step on an H200 (small preset, batch 32 x 512, torch 2.11), about 0.9 ms of which is the memory traffic any
    version pays (fp32 weights, gradients and both moments); compiling them would buy at most ~2% for a second
    compiled graph. SDPA chooses cuDNN there (0.43 ms forward+backward per layer, against 0.80 for the efficient
    kernel; flash needs Dv = S and, with V zero-padded to S, takes 0.58)."""
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("torch_reference.py bench: CUDA is not available (--device cpu for a smoke run)", file=sys.stderr)
        return 2
    if a.compile != "none" and not hasattr(torch, "compile"):
        print(f"torch_reference.py bench: torch {torch.__version__} has no torch.compile (--compile none)",
              file=sys.stderr)
        return 2
    c = Config(json.load(open(a.config)))
    B, T = a.batch, a.seq_len
    if T > c.max_position_embeddings:
        print(f"torch_reference.py bench: --seq-len {T} exceeds the model's {c.max_position_embeddings} positions",
              file=sys.stderr)
        return 2
    amp = a.precision == "bf16"
    try:
        experts = resolve_experts(a.experts, amp, dev)
    except ValueError as e:
        print(f"torch_reference.py bench: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    model = FastModel(c, amp=amp, experts=experts).to(dev)
    model.init_weights()
    cuda = dev.type == "cuda"
    v2 = torch_version() >= (2, 0)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, fused=cuda and v2)
    params = list(model.parameters())
    clip_kw = dict(foreach=True) if cuda and v2 else {}
    fwd = model
    if a.compile != "none":
        fwd = torch.compile(model, mode=None if a.compile == "default" else a.compile)
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    mark_step = mark_step if a.compile == "reduce-overhead" else None
    gamma = c.bias_update_speed
    attn = sdpa_backend(B, c.num_attention_heads, T, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim, dev) \
        if cuda and amp else ("explicit" if SDPA is None else "sdpa (cpu/fp32)")
    where = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"torch_reference.py bench: {a.config}: L={c.num_hidden_layers} MTP depth={c.num_nextn_predict_layers} "
          f"D={c.hidden_size} V={c.vocab_size} E={c.n_routed_experts} K={c.num_experts_per_tok}; batch {B} seq_len "
          f"{T}; {a.precision}, experts {experts}, attention {attn}, compile {a.compile}; torch {torch.__version__} on "
          f"{where}; seed {a.seed}", flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    n = a.warmup + a.steps
    totals = torch.zeros(n, device=dev)
    step_ms, fb_ms = [], []
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None  # around forward+backward
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t_start = time.perf_counter()
    for s in range(n):
        window = torch.randint(0, c.vocab_size, (B, T + 1), device=dev)
        sync()
        t0 = time.perf_counter()
        if cuda:
            ev[0].record()
        if mark_step is not None:
            mark_step()
        out = fwd(window)
        out["total"].backward()
        if cuda:
            ev[1].record()
        torch.nn.utils.clip_grad_norm_(params, 1.0, **clip_kw)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_bias(out["loads"], gamma)
        totals[s].copy_(out["total"].detach())
        sync()
        t1 = time.perf_counter()
        if s == 0 or s + 1 == a.warmup:
            print(f"  step {s + 1}: {(t1 - t0) * 1e3:.1f} ms{' (compiles)' if s == 0 and a.compile != 'none' else ''}"
                  f"; {time.perf_counter() - t_start:.1f} s so far", flush=True)
        if s >= a.warmup:
            step_ms.append((t1 - t0) * 1e3)
            if cuda:
                fb_ms.append(ev[0].elapsed_time(ev[1]))
    losses = totals.tolist()
    ms = median(step_ms)
    tps = B * T / (ms / 1e3)
    peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None  # CUDA only, like fb
    fb = median(fb_ms) if fb_ms else None
    split = f" (forward+backward {fb:.3f} ms, clipping+AdamW+bias {ms - fb:.3f} ms)" if cuda else ""
    print(f"  median step {ms:.3f} ms{split} over {a.steps} steps after {a.warmup} warm-up; min {min(step_ms):.3f}, "
          f"max {max(step_ms):.3f}")
    print(f"  tokens/s {tps:,.0f}; peak memory {f'{peak:.3f} GiB' if cuda else '-'}; loss first {losses[0]:.4f}, "
          f"last {losses[-1]:.4f}")
    print(json.dumps(dict(bench="torch_reference", device=where, torch=torch.__version__, compile=a.compile,
                          precision=a.precision, experts=experts, attention=attn, batch=B, seq_len=T, steps=a.steps,
                          tokens_per_s=round(tps), step_ms=round(ms, 3), fwd_bwd_ms=fb and round(fb, 3),
                          peak_mem_gib=peak and round(peak, 3), loss_first=round(losses[0], 4),
                          loss_last=round(losses[-1], 4))))
    return 0 if all(math.isfinite(x) for x in losses) else 1


# ---- self-test --------------------------------------------------------------------------------------------------

def tiny_config(variant):
    """Stage 06's tiny preset (06_full_model/model_config.cpp kPresets), routed_scaling_factor 2.5 as every preset;
    variant 'yarn' adds YaRN, two MTP modules and a visible balance loss; 'softmax' drops q compression and
    scores with softmax."""
    j = dict(vocab_size=61, hidden_size=24, intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=2,
             first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
             qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
             n_group=4, topk_group=2, num_nextn_predict_layers=1, max_position_embeddings=64,
             routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid", rms_norm_eps=1e-6,
             rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False,
             nano_dsv3=dict(aux_alpha=0.05, bias_update_speed=1e-3, mtp_lambda=0.3))
    if variant == "yarn":
        j["num_nextn_predict_layers"] = 2
        j["rope_scaling"] = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                                 beta_slow=1.0, mscale=0.7, mscale_all_dim=0.7)
    elif variant == "softmax":
        j.update(q_lora_rank=None, scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=0)
    return Config(j)


def random_arrays(c, seed):
    """Fan-in-scaled random weights, jittered norms (so a gradient that ignored a norm weight cannot pass) and a
    nonzero routing bias (so selection and weighting differ)."""
    rng = np.random.default_rng(seed)
    D, V = c.hidden_size, c.vocab_size
    shapes = {}
    H, S = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    for n in trained_names(c):
        if n == "model.embed_tokens.weight" or n == "lm_head.weight":
            shapes[n] = (V, D)
        elif n.endswith("norm.weight") or n.endswith("layernorm.weight"):
            dim = {"q_a_layernorm": c.q_lora_rank, "kv_a_layernorm": c.kv_lora_rank}.get(n.split(".")[-2], D)
            shapes[n] = (dim,)
        else:
            shapes[n] = None
    arrays = {}
    for n in trained_names(c):
        key = n.split(".")[-2]
        F = c.moe_intermediate_size if ".experts." in n else (
            c.moe_intermediate_size * c.n_shared_experts if "shared_experts" in n else c.intermediate_size)
        sh = shapes[n] or {
            "q_a_proj": (c.q_lora_rank, D), "q_b_proj": (H * S, c.q_lora_rank), "q_proj": (H * S, D),
            "kv_a_proj_with_mqa": (c.kv_lora_rank + c.qk_rope_head_dim, D),
            "kv_b_proj": (H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            "o_proj": (D, H * c.v_head_dim), "gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F),
            "gate": (c.n_routed_experts, D), "eh_proj": (D, 2 * D)}[key]
        if len(sh) == 1:
            arrays[n] = (1 + 0.2 * rng.standard_normal(sh)).astype(np.float32)
        else:
            std = 1.0 if n == "model.embed_tokens.weight" else 1.0 / math.sqrt(sh[1])
            arrays[n] = (std * rng.standard_normal(sh)).astype(np.float32)
    for n in bias_names(c):
        arrays[n] = (0.05 * rng.standard_normal(c.n_routed_experts)).astype(np.float32)
    return arrays


def self_test():
    ok = True
    for variant, seed in (("tiny", 1), ("yarn", 2), ("softmax", 3)):
        c = tiny_config(variant)
        arrays = random_arrays(c, seed)
        B, T = 2, 7
        rng = np.random.default_rng(100 + seed)
        window = rng.integers(0, c.vocab_size, size=(B, T + 1)).astype(np.int64)
        P = make_params(c, arrays, torch.float64)
        ref = Reference(c, P, torch.float64)
        out = ref.forward(window, B, T)
        out["total"].backward()
        sig = {l: v["indices"].copy() for l, v in ref.routing.items()}
        print(f"self-test '{variant}': ce {out['ce'].item():.6f} mtp {out['mtp'].item():.6f} "
              f"balance {out['balance'].item():.6e} total {out['total'].item():.6f}")
        # a few entries of a spread of tensors: embedding, attention, a dense and a routed expert, the router
        # (through the weights and the balance loss), the MTP projection, norms
        L = c.num_hidden_layers
        moe_l = c.first_k_dense_replace
        picks = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 f"model.layers.{moe_l}.mlp.gate.weight", f"model.layers.{L}.eh_proj.weight",
                 f"model.layers.{L}.hnorm.weight", f"model.layers.{L}.mlp.gate.weight",
                 f"model.layers.{L}.self_attn.o_proj.weight", f"model.layers.{moe_l}.input_layernorm.weight"]
        picks += [n for n in trained_names(c) if ".experts." in n][:3:2]
        picks += [n for n in trained_names(c) if "q_a_proj" in n or "q_proj" in n][:1]
        if c.first_k_dense_replace > 0:
            picks.append("model.layers.0.mlp.up_proj.weight")
        worst, count, skipped = 0.0, 0, 0
        h = 1e-6
        for n in picks:
            t = P[n]
            g = (t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1)
            flat = t.detach().reshape(-1)
            # the entries with the largest gradients and one random entry
            cand = list(torch.topk(g.abs(), min(2, g.numel())).indices.tolist()) + [int(rng.integers(g.numel()))]
            for i in cand:
                vals = []
                for sgn in (1, -1):
                    with torch.no_grad():
                        old = flat[i].item()
                        t.view(-1)[i] = old + sgn * h
                        r2 = Reference(c, P, torch.float64)
                        vals.append(r2.forward(window, B, T)["total"].item())
                        t.view(-1)[i] = old
                    same = all(np.array_equal(r2.routing[l]["indices"], sig[l]) for l in sig)
                    if not same:
                        break
                if not same:
                    skipped += 1  # a routing decision moved within +-h: the loss is not smooth there
                    continue
                fd = (vals[0] - vals[1]) / (2 * h)
                an = g[i].item()
                e = abs(fd - an) / max(abs(an), abs(fd), 1e-7)
                count += 1
                worst = max(worst, e)
                if e > 1e-5:
                    print(f"  {n}[{i}]: autograd {an:.10e} vs central difference {fd:.10e} (rel {e:.2e})")
        passed = worst <= 1e-5 and count > 0
        ok &= passed
        print(f"  {count} entries of {len(picks)} tensors, worst relative difference {worst:.2e}"
              f"{f', {skipped} skipped (routing moved)' if skipped else ''}: {'ok' if passed else 'FAILED'}")
    print(f"self-test: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


# ---- bench-check: the speed peer against Reference --------------------------------------------------------------

# FastModel in fp32 against Reference in float64, same arrays, same routing: what is left are fp32 roundings of the
# same sums, about 1e-7 relative on these sizes; the bounds leave a hundredfold margin.
FAST_LOSS_TOL = 1e-5
FAST_GRAD_TOL = 1e-4
# bf16 autocast against fp32: bf16 keeps 8 significant bits (a rounding moves a value by up to 2^-9 = 2e-3
# relative), and the cross-entropy sums such roundings over every product feeding the logits; a routing decision
# may flip too. The grouped and the looped experts in bf16 differ only in the products' accumulation order.
BF16_LOSS_TOL = 2e-2
PATH_LOSS_TOL = 2e-3
PATH_GRAD_TOL = 5e-2


def fast_run(c, arrays, window, device, amp, experts, compile_mode="none"):
    """One forward and backward of a FastModel holding `arrays`: (model, outputs, routing {layer: idx numpy})."""
    fm = FastModel(c, amp=amp, experts=experts).to(device)
    fm.load_arrays(arrays)
    rec = {}
    for moe in fm.moe_layers():
        moe.record = rec if compile_mode == "none" else None
    fwd = fm if compile_mode == "none" else torch.compile(fm, mode=None if compile_mode == "default" else compile_mode)
    out = fwd(torch.from_numpy(window).to(device))
    out["total"].backward()
    return fm, out, {l: v.cpu().numpy() for l, v in rec.items()}


def grad_errors(c, got, want):
    """name -> ||got - want|| / ||want|| over trained_names (dicts of HF name -> tensor or None)."""
    errs = {}
    for n in trained_names(c):
        g, w = got.get(n), want.get(n)
        g = torch.zeros(1, dtype=torch.float64) if g is None else g.detach().double().cpu()
        w = torch.zeros(1, dtype=torch.float64) if w is None else w.detach().double().cpu()
        d = (g - w).norm().item()
        errs[n] = 0.0 if d == 0 else d / max(w.norm().item(), TINY)
    return errs


def bench_check(a):
    """FastModel against Reference: fp32 on --device, every loss part and gradient, the routing, the loads and the
    bias update; on CUDA with torch._grouped_mm also bf16 (grouped and looped experts) against fp32, and with
    --compile the compiled module against the eager one."""
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench-check: CUDA is not available", file=sys.stderr)
        return 2
    ok = True
    B, T = 3, 11
    print(f"bench-check: FastModel vs Reference on {dev}, torch {torch.__version__}, B={B} T={T}")
    cases = (("tiny", 1), ("yarn", 2), ("softmax", 3))
    for variant, seed in cases:
        c = tiny_config(variant)
        arrays = random_arrays(c, seed)
        window = np.random.default_rng(200 + seed).integers(0, c.vocab_size, size=(B, T + 1)).astype(np.int64)
        problems = []
        # 0) one list of names: the module's tensors are Reference's parameters and biases
        names = set(FastModel(c, amp=False).hf_tensors())
        if names != set(trained_names(c)) | set(bias_names(c)):
            problems.append(f"names differ from trained_names + bias_names: "
                            f"{sorted(names ^ (set(trained_names(c)) | set(bias_names(c))))[:6]}")
        # 1) the truth: Reference in float64
        P = make_params(c, arrays, torch.float64)
        ref = Reference(c, P, torch.float64)
        ro = ref.forward(window, B, T)
        ro["total"].backward()
        margin = min(float(r["margin"].min()) for r in ref.routing.values())
        # 2) FastModel in fp32, looped experts
        fm, fo, routing = fast_run(c, arrays, window, dev, amp=False, experts="loop")
        for l, r in ref.routing.items():
            if not np.array_equal(np.sort(r["indices"], 1), np.sort(routing[l], 1)):
                problems.append(f"layer {l}: routing differs (Reference's smallest margin {r['margin'].min():.1e})")
        parts = [(k, fo[k].item(), ro[k].item()) for k in ("ce", "mtp", "balance", "total")]
        parts += [(f"mtp_depth[{k + 1}]", x.item(), y.item()) for k, (x, y) in
                  enumerate(zip(fo["mtp_depths"], ro["mtp_depths"]))]
        worst_loss = max(rel(x, y) for _, x, y in parts)
        for k, x, y in parts:
            if rel(x, y) > FAST_LOSS_TOL:
                problems.append(f"loss {k}: fast {x:.10g} vs reference {y:.10g} (rel {rel(x, y):.2e})")
        errs = grad_errors(c, fm.hf_tensors(grads=True), {n: P[n].grad for n in trained_names(c)})
        worst_n = max(errs, key=errs.get)
        for n, e in errs.items():
            if e > FAST_GRAD_TOL:
                problems.append(f"gradient '{n}': error {e:.2e}")
        # 3) the loads and the bias update: b + gamma sign(N K / E - count), float32, as trajectory()
        E, K = c.n_routed_experts, c.num_experts_per_tok
        before = {n: t.detach().cpu().numpy().copy() for n, t in fm.hf_tensors().items() if n in bias_names(c)}
        fm.update_bias(fo["loads"], c.bias_update_speed)
        after = fm.hf_tensors()
        loads = fo["loads"].cpu().numpy()
        for i, l in enumerate(sorted(ref.routing)):
            cnt = np.bincount(ref.routing[l]["indices"].reshape(-1), minlength=E)
            if not np.array_equal(loads[i], cnt):
                problems.append(f"layer {l}: loads {loads[i].tolist()} vs {cnt.tolist()}")
            name = f"model.layers.{l}.mlp.gate.e_score_correction_bias"
            want = (before[name] + np.float32(c.bias_update_speed) *
                    np.sign(float(B * T) * K / E - cnt).astype(np.float32)).astype(np.float32)
            if not np.array_equal(after[name].cpu().numpy(), want):
                problems.append(f"layer {l}: bias update differs")
        print(f"  {variant:8s} fp32 {fm.experts}: losses max rel {worst_loss:.1e} (tol {FAST_LOSS_TOL:g}), gradients "
              f"max {errs[worst_n]:.1e} ({worst_n}; tol {FAST_GRAD_TOL:g}), routing min margin {margin:.1e}: "
              f"{'ok' if not problems else 'FAILED'}")
        # 4) bf16: the grouped experts (CUDA, torch >= 2.8) and the looped ones against fp32 and each other
        if dev.type == "cuda":
            paths = ["loop"] + (["grouped"] if HAS_GROUPED_MM else [])
            runs = {p: fast_run(c, arrays, window, dev, amp=True, experts=p) for p in paths}
            for p, (m16, o16, r16) in runs.items():
                e = rel(o16["total"].item(), fo["total"].item())
                g = grad_errors(c, m16.hf_tensors(grads=True), fm.hf_tensors(grads=True))
                flips = sum(int((np.sort(r16[l], 1) != np.sort(routing[l], 1)).any(1).sum()) for l in routing)
                print(f"  {variant:8s} bf16 {p:7s}: total {o16['total'].item():.6f} vs fp32 {fo['total'].item():.6f} "
                      f"(rel {e:.1e}, tol {BF16_LOSS_TOL:g}); gradients vs fp32 max {max(g.values()):.1e} (not "
                      f"checked; {flips} token(s) routed otherwise than in fp32)")
                if e > BF16_LOSS_TOL:
                    problems.append(f"bf16 {p}: total rel {e:.2e} from fp32")
            if "grouped" in runs:
                (mg, og, rg), (ml, ol, rl) = runs["grouped"], runs["loop"]
                e = rel(og["total"].item(), ol["total"].item())
                g = grad_errors(c, mg.hf_tensors(grads=True), ml.hf_tensors(grads=True))
                n = max(g, key=g.get)
                same = all(np.array_equal(rg[l], rl[l]) for l in rg)
                print(f"  {variant:8s} bf16 grouped vs loop: total rel {e:.1e} (tol {PATH_LOSS_TOL:g}), gradients "
                      f"max {g[n]:.1e} ({n}; tol {PATH_GRAD_TOL:g}), routing {'same' if same else 'DIFFERS'}")
                if e > PATH_LOSS_TOL or (same and g[n] > PATH_GRAD_TOL):
                    problems.append(f"bf16 grouped vs loop: total rel {e:.2e}, gradient '{n}' {g[n]:.2e}")
            # 5) the compiled module (what bench times) against the eager one, bf16, the bench's expert path
            if a.compile != "none":
                path = resolve_experts("auto", True, dev)
                _, oc, _ = fast_run(c, arrays, window, dev, amp=True, experts=path, compile_mode=a.compile)
                e = rel(oc["total"].item(), runs[path][1]["total"].item())
                print(f"  {variant:8s} bf16 {path} compiled ({a.compile}) vs eager: total rel {e:.1e} "
                      f"(tol {PATH_LOSS_TOL:g})")
                if e > PATH_LOSS_TOL:
                    problems.append(f"compiled: total rel {e:.2e} from eager")
        for p in problems[:20]:
            print("    " + p)
        ok &= not problems
    if not HAS_GROUPED_MM or dev.type != "cuda":
        print("  (bf16 and the grouped experts not checked: no CUDA device)" if dev.type != "cuda" else
              f"  (the grouped experts not checked: torch {torch.__version__} has no _grouped_mm)")
    print(f"bench-check: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def bench_main(argv):
    ap = argparse.ArgumentParser(prog="torch_reference.py bench", description=bench.__doc__.split("\n\n")[0])
    ap.add_argument("config", help="config.json (07_train_gpu bench --preset small --write-config FILE)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up (the median is reported)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (the compilation happens there)")
    ap.add_argument("--compile", choices=["reduce-overhead", "default", "none"], default="reduce-overhead",
                    help="torch.compile mode of the module (reduce-overhead: CUDA graphs too)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16: autocast, fp32 masters")
    ap.add_argument("--experts", choices=["auto", "grouped", "loop"], default="auto",
                    help="routed experts: torch._grouped_mm, or a loop over experts (auto: grouped where it runs)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args(argv)
    if min(a.batch, a.seq_len, a.steps) < 1 or a.warmup < 0:
        ap.error("batch, seq-len and steps must be positive, warmup not negative")
    return bench(a)


def bench_check_main(argv):
    ap = argparse.ArgumentParser(prog="torch_reference.py bench-check", description=bench_check.__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", choices=["none", "default", "reduce-overhead"], default="none",
                    help="CUDA: also check the compiled module against the eager one")
    return bench_check(ap.parse_args(argv))


def main(argv):
    if argv and argv[0] == "bench":
        return bench_main(argv[1:])
    if argv and argv[0] == "bench-check":
        return bench_check_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--self-test", action="store_true", help="check autograd against central differences")
    ap.add_argument("--no-floor", action="store_true", help="skip the float32 noise-floor pass (oracle) / trajectory (steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("command", nargs="?", choices=["oracle", "steps"])
    ap.add_argument("dir", nargs="?")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.self_test:
        return self_test()
    if a.command not in ("oracle", "steps") or not a.dir:
        ap.print_usage()
        print("torch_reference.py: give 'oracle DIR', 'steps DIR', 'bench CONFIG', 'bench-check' or --self-test",
              file=sys.stderr)
        return 2
    if a.command == "steps":
        for f in ("config.json", "model.safetensors", "tokens.bin", "losses.json", "steps.json", "final.safetensors"):
            if not os.path.isfile(os.path.join(a.dir, f)):
                print(f"torch_reference.py: {a.dir} has no {f} (write it with `07_train_gpu grads ... --steps N "
                      f"--dump {a.dir}`)", file=sys.stderr)
                return 2
        return steps_check(a.dir, floor=not a.no_floor)
    for f in ("config.json", "model.safetensors", "tokens.bin", "losses.json", "grads.safetensors"):
        if not os.path.isfile(os.path.join(a.dir, f)):
            print(f"torch_reference.py: {a.dir} has no {f} (write it with `07_train_gpu grads ... --dump {a.dir}`)",
                  file=sys.stderr)
            return 2
    return oracle(a.dir, noise_floor=not a.no_floor)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
