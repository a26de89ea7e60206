#!/usr/bin/env python3
"""Golden fixtures for the model tests: a tiny LLaMA and a tiny CLIP ViT computed in numpy.

Regenerate with:
    python3 -m pip install numpy && python3 tools/make_golden.py

This is an independent reference written from the published math (Hugging Face LlamaForCausalLM and
CLIPVisionModel), not from the C++ code. It writes two safetensors files (format written by hand below, no
`safetensors` package needed) into tests/data/:

  llama_golden.safetensors   weights under Hugging Face names (F32), plus
                             golden.config   [vocab, dim, n_layers, n_heads, ffn_dim]           (I64)
                             golden.ids      [B, T] token ids                                    (I64)
                             golden.hidden   [B, T, dim] hidden states after the final RMSNorm   (F64)
                             golden.logits   [B, T, vocab]                                       (F64)
  vit_golden.safetensors     weights under Hugging Face names (F32), plus
                             golden.config   [image, patch, channels, dim, n_layers, n_heads, mlp_dim, every] (I64)
                             golden.images   [B, C, H, W]                                        (F64)
                             golden.hidden   [B, 1 + N, dim] last hidden state (before post_layernorm)  (F64)
                             golden.cls      [B, n_layers / every, dim] [cls] after every `every`-th block (F64)
                             golden.cls_normed  the same tokens through post_layernorm           (F64)

The forward runs in float64 on the float32-rounded weights, so a double-precision C++ forward matches it to
rounding error.
"""
import json
import os
import struct

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}


def save_safetensors(path, tensors):
    """Writes {name: ndarray} as safetensors: u64 header length, JSON header, contiguous little-endian data."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


def weight(rng, *shape, scale=0.2):
    """Random float32 weights; the forward uses their exact float64 values."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def f64(a):
    return a.astype(np.float64)


# ---- LLaMA --------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, n_heads, theta):
    """HF rotate_half RoPE on x [B, T, H*dh] at positions 0..T-1."""
    b, t, d = x.shape
    dh = d // n_heads
    inv_freq = theta ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)      # [dh/2]
    angles = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]    # [T, dh/2]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)                    # [T, dh]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
    xh = x.reshape(b, t, n_heads, dh)
    rotated = np.concatenate([-xh[..., dh // 2:], xh[..., : dh // 2]], axis=-1)
    return (xh * cos[None, :, None, :] + rotated * sin[None, :, None, :]).reshape(b, t, d)


def attention(q, k, v, n_heads, causal):
    b, t, d = q.shape
    dh = d // n_heads
    split = lambda a: a.reshape(b, t, n_heads, dh).transpose(0, 2, 1, 3)  # [B, H, T, dh]
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(dh)
    if causal:
        s = s + np.triu(np.full((t, t), -np.inf), k=1)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, t, d)


def silu(x):
    return x / (1.0 + np.exp(-x))


def llama_golden(rng):
    vocab, dim, n_layers, n_heads, ffn, theta, eps = 37, 32, 2, 4, 48, 10000.0, 1e-6
    w = {"model.embed_tokens.weight": weight(rng, vocab, dim, scale=1.0),
         "model.norm.weight": (1.0 + weight(rng, dim, scale=0.1)),
         "lm_head.weight": weight(rng, vocab, dim)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[p + f"self_attn.{name}.weight"] = weight(rng, dim, dim)
        w[p + "mlp.gate_proj.weight"] = weight(rng, ffn, dim)
        w[p + "mlp.up_proj.weight"] = weight(rng, ffn, dim)
        w[p + "mlp.down_proj.weight"] = weight(rng, dim, ffn)
        w[p + "input_layernorm.weight"] = 1.0 + weight(rng, dim, scale=0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + weight(rng, dim, scale=0.1)

    ids = rng.integers(0, vocab, size=(2, 7)).astype(np.int64)
    g = {k: f64(v) for k, v in w.items()}
    x = g["model.embed_tokens.weight"][ids]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, g[p + "input_layernorm.weight"], eps)
        q = rope(h @ g[p + "self_attn.q_proj.weight"].T, n_heads, theta)
        k = rope(h @ g[p + "self_attn.k_proj.weight"].T, n_heads, theta)
        v = h @ g[p + "self_attn.v_proj.weight"].T
        x = x + attention(q, k, v, n_heads, causal=True) @ g[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, g[p + "post_attention_layernorm.weight"], eps)
        z = silu(h @ g[p + "mlp.gate_proj.weight"].T) * (h @ g[p + "mlp.up_proj.weight"].T)
        x = x + z @ g[p + "mlp.down_proj.weight"].T
    hidden = rms_norm(x, g["model.norm.weight"], eps)
    logits = hidden @ g["lm_head.weight"].T

    w["golden.config"] = np.array([vocab, dim, n_layers, n_heads, ffn], dtype=np.int64)
    w["golden.ids"] = ids
    w["golden.hidden"] = hidden
    w["golden.logits"] = logits
    return w


# ---- CLIP ViT -----------------------------------------------------------------------------------------

def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def conv_patches(images, kernel, patch):
    """Conv2d with stride = kernel size = patch, no bias: [B, C, H, W] * [D, C, P, P] -> [B, Hp*Wp, D]."""
    b, c, hgt, wid = images.shape
    hp, wp = hgt // patch, wid // patch
    out = np.zeros((b, hp * wp, kernel.shape[0]))
    for i in range(hp):
        for j in range(wp):
            window = images[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]  # [B, C, P, P]
            out[:, i * wp + j, :] = np.einsum("bcyx,dcyx->bd", window, kernel)
    return out


def vit_golden(rng):
    image, patch, channels, dim, n_layers, n_heads, mlp, every, eps = 8, 4, 3, 24, 4, 4, 40, 2, 1e-5
    n_pos = (image // patch) ** 2 + 1
    p0 = "vision_model."
    w = {p0 + "embeddings.patch_embedding.weight": weight(rng, dim, channels, patch, patch),
         p0 + "embeddings.class_embedding": weight(rng, dim, scale=1.0),
         p0 + "embeddings.position_embedding.weight": weight(rng, n_pos, dim, scale=0.5),
         p0 + "pre_layrnorm.weight": 1.0 + weight(rng, dim, scale=0.1),
         p0 + "pre_layrnorm.bias": weight(rng, dim, scale=0.1),
         p0 + "post_layernorm.weight": 1.0 + weight(rng, dim, scale=0.1),
         p0 + "post_layernorm.bias": weight(rng, dim, scale=0.1)}
    for i in range(n_layers):
        p = p0 + f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[p + f"self_attn.{name}.weight"] = weight(rng, dim, dim)
            w[p + f"self_attn.{name}.bias"] = weight(rng, dim, scale=0.1)
        w[p + "mlp.fc1.weight"] = weight(rng, mlp, dim)
        w[p + "mlp.fc1.bias"] = weight(rng, mlp, scale=0.1)
        w[p + "mlp.fc2.weight"] = weight(rng, dim, mlp)
        w[p + "mlp.fc2.bias"] = weight(rng, dim, scale=0.1)
        for ln in ("layer_norm1", "layer_norm2"):
            w[p + f"{ln}.weight"] = 1.0 + weight(rng, dim, scale=0.1)
            w[p + f"{ln}.bias"] = weight(rng, dim, scale=0.1)

    images = rng.standard_normal((2, channels, image, image))
    g = {k: f64(v) for k, v in w.items()}
    patches = conv_patches(images, g[p0 + "embeddings.patch_embedding.weight"], patch)
    cls = np.broadcast_to(g[p0 + "embeddings.class_embedding"], (images.shape[0], 1, dim))
    x = np.concatenate([cls, patches], axis=1) + g[p0 + "embeddings.position_embedding.weight"][None]
    x = layer_norm(x, g[p0 + "pre_layrnorm.weight"], g[p0 + "pre_layrnorm.bias"], eps)
    taken = []
    for i in range(n_layers):
        p = p0 + f"encoder.layers.{i}."
        lin = lambda a, name: a @ g[p + name + ".weight"].T + g[p + name + ".bias"]
        h = layer_norm(x, g[p + "layer_norm1.weight"], g[p + "layer_norm1.bias"], eps)
        o = attention(lin(h, "self_attn.q_proj"), lin(h, "self_attn.k_proj"), lin(h, "self_attn.v_proj"), n_heads,
                      causal=False)
        x = x + lin(o, "self_attn.out_proj")
        h = layer_norm(x, g[p + "layer_norm2.weight"], g[p + "layer_norm2.bias"], eps)
        x = x + lin(quick_gelu(lin(h, "mlp.fc1")), "mlp.fc2")
        if (i + 1) % every == 0:
            taken.append(x[:, 0, :])
    cls_tokens = np.stack(taken, axis=1)

    w["golden.config"] = np.array([image, patch, channels, dim, n_layers, n_heads, mlp, every], dtype=np.int64)
    w["golden.images"] = images
    w["golden.hidden"] = x
    w["golden.cls"] = cls_tokens
    w["golden.cls_normed"] = layer_norm(cls_tokens, g[p0 + "post_layernorm.weight"], g[p0 + "post_layernorm.bias"],
                                        eps)
    return w


def main():
    os.makedirs(OUT_DIR, exist_ok=True)
    rng = np.random.default_rng(20240601)
    for name, tensors in (("llama_golden", llama_golden(rng)), ("vit_golden", vit_golden(rng))):
        path = os.path.join(OUT_DIR, name + ".safetensors")
        save_safetensors(path, tensors)
        print(f"wrote {os.path.normpath(path)} ({os.path.getsize(path)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
