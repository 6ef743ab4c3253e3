"""A1111's prediction check for SD 2.x files without a yaml: one UNet forward pass, in numpy.

A1111 (modules/sd_models_config.py `is_using_v_parameterization_for_sd2`) builds the SD2 UNet, loads
the file's weights and runs it once on fixed inputs: latent `x = 0.5` (1x4x8x8), timestep 999,
context `0.5` (1x2x1024). A v-prediction model outputs values far below the input there:
`mean(unet(x) - x) < -1` -> v, else epsilon. sdtk computes the same pass (float32; A1111 uses the
UNet's dtype under autocast) with the LDM layer definitions (ldm/ComfyUI openaimodel.py,
attention.py): ResBlocks with GroupNorm(32), SpatialTransformers with linear proj_in/out
(eps 1e-6), self and cross attention, GEGLU feed-forward, nearest upsampling. The network's
structure is read from the keys and shapes, never from code in the file.

Cost: every UNet weight is read once, one layer at a time (peak memory: one layer in float32,
at most ~60 MB for SD2), and the activations are 8x8: a few seconds for a full SD2 UNet.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

from sdtk.tensors import LazyTensor

# modules/sd_models_config.py (A1111 1.10): the inputs and the rule
A1111_LATENT = 0.5
A1111_TIMESTEP = 999
A1111_CONTEXT_TOKENS = 2
A1111_THRESHOLD = -1.0  # mean(unet(x) - x) below this -> v
HEAD_CHANNELS = 64  # SD2: num_head_channels=64


class _Net:
    def __init__(self, tensors: Mapping[str, LazyTensor], head_channels: int):
        import numpy as np

        self.np = np
        self.t = tensors
        self.head_channels = head_channels

    def has(self, key: str) -> bool:
        return key in self.t

    def w(self, key: str):
        return self.np.asarray(self.t[key].read(), dtype=self.np.float32)

    # -- layers (NCHW, batch 1) ---------------------------------------------------------------
    def conv(self, p: str, x, stride: int = 1):
        np = self.np
        weight = self.w(p + ".weight")
        o, c, kh, kw = weight.shape
        pad = kh // 2
        if pad:
            x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        h = (x.shape[2] - kh) // stride + 1
        w = (x.shape[3] - kw) // stride + 1
        cols = np.empty((c, kh, kw, h, w), np.float32)
        for i in range(kh):
            for j in range(kw):
                cols[:, i, j] = x[0, :, i:i + stride * h:stride, j:j + stride * w:stride]
        out = weight.reshape(o, -1) @ cols.reshape(c * kh * kw, h * w)
        out += self.w(p + ".bias")[:, None]
        return out.reshape(1, o, h, w)

    def linear(self, p: str, x, bias: bool = True):
        out = x @ self.w(p + ".weight").T
        return out + self.w(p + ".bias") if bias else out

    def group_norm(self, p: str, x, eps: float, groups: int = 32):
        np = self.np
        n, c, h, w = x.shape
        if c % groups:
            raise ValueError(f"{p}: {c} channels do not split into {groups} groups")  # no such LDM UNet
        g = x.reshape(n, groups, -1).astype(np.float64)
        g = (g - g.mean(axis=2, keepdims=True)) / np.sqrt(g.var(axis=2, keepdims=True) + eps)
        g = g.reshape(n, c, h, w).astype(np.float32)
        return g * self.w(p + ".weight")[None, :, None, None] + self.w(p + ".bias")[None, :, None, None]

    def layer_norm(self, p: str, x, eps: float = 1e-5):
        np = self.np
        x64 = x.astype(np.float64)
        y = (x64 - x64.mean(axis=-1, keepdims=True)) / np.sqrt(x64.var(axis=-1, keepdims=True) + eps)
        return y.astype(np.float32) * self.w(p + ".weight") + self.w(p + ".bias")

    def silu(self, x):
        return x / (1.0 + self.np.exp(-x))

    def gelu(self, x):
        """Exact (erf) GELU, torch's default; erf by Abramowitz & Stegun 7.1.26 (error < 1.5e-7)."""
        np = self.np
        z = np.abs(x.astype(np.float64)) / math.sqrt(2.0)
        t = 1.0 / (1.0 + 0.3275911 * z)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
        return (0.5 * x * (1.0 + erf)).astype(np.float32)

    # -- blocks -------------------------------------------------------------------------------
    def resblock(self, p: str, x, emb):
        h = self.conv(p + ".in_layers.2", self.silu(self.group_norm(p + ".in_layers.0", x, 1e-5)))
        h = h + self.linear(p + ".emb_layers.1", self.silu(emb))[0][None, :, None, None]
        h = self.conv(p + ".out_layers.3", self.silu(self.group_norm(p + ".out_layers.0", h, 1e-5)))
        skip = self.conv(p + ".skip_connection", x) if self.has(p + ".skip_connection.weight") else x
        return skip + h

    def attention(self, p: str, x, context):
        np = self.np
        q = self.linear(p + ".to_q", x, bias=False)
        k = self.linear(p + ".to_k", context, bias=False)
        v = self.linear(p + ".to_v", context, bias=False)
        heads = max(1, q.shape[-1] // self.head_channels)
        d = q.shape[-1] // heads
        q, k, v = (a.reshape(a.shape[0], heads, d).transpose(1, 0, 2) for a in (q, k, v))
        scores = (q @ k.transpose(0, 2, 1)) * (d ** -0.5)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out = (scores @ v).transpose(1, 0, 2).reshape(q.shape[1], heads * d)
        return self.linear(p + ".to_out.0", out)

    def transformer(self, p: str, x, context):
        n, c, h, w = x.shape
        x_in = x
        y = self.group_norm(p + ".norm", x, 1e-6)
        linear = len(self.t[p + ".proj_in.weight"].shape) == 2
        if not linear:  # SD1-style 1x1 conv projections
            y = self.conv(p + ".proj_in", y)
        y = y.reshape(y.shape[1], h * w).T  # (tokens, channels)
        if linear:
            y = self.linear(p + ".proj_in", y)
        b = 0
        while self.has(f"{p}.transformer_blocks.{b}.attn1.to_q.weight"):
            tb = f"{p}.transformer_blocks.{b}"
            n1 = self.layer_norm(tb + ".norm1", y)
            y = self.attention(tb + ".attn1", n1, n1) + y  # self-attention
            y = self.attention(tb + ".attn2", self.layer_norm(tb + ".norm2", y), context) + y
            z = self.linear(tb + ".ff.net.0.proj", self.layer_norm(tb + ".norm3", y))
            half = z.shape[-1] // 2
            y = self.linear(tb + ".ff.net.2", z[:, :half] * self.gelu(z[:, half:])) + y
            b += 1
        if linear:
            y = self.linear(p + ".proj_out", y)
        y = y.T.reshape(1, -1, h, w)
        if not linear:
            y = self.conv(p + ".proj_out", y)
        return y + x_in

    def block(self, p: str, x, emb, context):
        j = 0
        while any(k.startswith(f"{p}.{j}.") for k in self._prefixes(p)):
            q = f"{p}.{j}"
            if self.has(q + ".in_layers.0.weight"):
                x = self.resblock(q, x, emb)
            elif self.has(q + ".proj_in.weight"):
                x = self.transformer(q, x, context)
            elif self.has(q + ".op.weight"):
                x = self.conv(q + ".op", x, stride=2)
            elif self.has(q + ".conv.weight"):
                x = self.conv(q + ".conv", x.repeat(2, axis=2).repeat(2, axis=3))
            elif self.has(q + ".weight"):  # input_blocks.0.0: the first convolution
                x = self.conv(q, x)
            else:
                raise ValueError(f"unknown layer {q}")
            j += 1
        return x

    def _prefixes(self, p: str):
        if not hasattr(self, "_keys_by_block"):
            self._keys_by_block = {}
            for k in self.t:
                parts = k.split(".")
                root = parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])
                self._keys_by_block.setdefault(root, []).append(k)
        return self._keys_by_block.get(p, [])

    def forward(self, x, timestep: float, context):
        np = self.np
        ch = self.t["time_embed.0.weight"].shape[1]
        half = ch // 2
        freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float32) / half)
        args = np.float32(timestep) * freqs
        temb = np.concatenate([np.cos(args), np.sin(args)])[None].astype(np.float32)
        emb = self.linear("time_embed.2", self.silu(self.linear("time_embed.0", temb)))
        hs = []
        i = 0
        while self.has(f"input_blocks.{i}.0.weight") or self.has(f"input_blocks.{i}.0.in_layers.0.weight") \
                or self.has(f"input_blocks.{i}.0.op.weight"):
            x = self.block(f"input_blocks.{i}", x, emb, context)
            hs.append(x)
            i += 1
        x = self.block("middle_block", x, emb, context)
        i = 0
        while self.has(f"output_blocks.{i}.0.in_layers.0.weight"):
            x = np.concatenate([x, hs.pop()], axis=1)
            x = self.block(f"output_blocks.{i}", x, emb, context)
            i += 1
        x = self.conv("out.2", self.silu(self.group_norm("out.0", x, 1e-5)))
        return x


def unet_forward(tensors: Mapping[str, LazyTensor], x, timestep: float, context, head_channels: int = HEAD_CHANNELS):
    """The LDM UNet's output for latent `x` (1xCxHxW float32), one timestep and `context`
    (tokens x dim), from the bare UNet tensors (keys without `model.diffusion_model.`)."""
    return _Net(tensors, head_channels).forward(x, timestep, context)


def a1111_forward_check(tensors: Mapping[str, LazyTensor], head_channels: int = HEAD_CHANNELS) -> Optional[Tuple[str, float]]:
    """("v" | "epsilon", mean(unet(x) - x)) by A1111's rule, or None when the tensors are not an
    LDM UNet this pass can run (or the output is not finite)."""
    import numpy as np

    need = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")
    if any(k not in tensors for k in need):
        return None
    if not np.any(np.asarray(tensors["out.2.weight"].read())):
        return None  # a zero last convolution (a zero-filled file): the output says nothing of the model
    in_ch = tensors["input_blocks.0.0.weight"].shape[1]
    ctx_dim = next((t.shape[1] for k, t in tensors.items() if k.endswith(".attn2.to_k.weight")), None)
    if ctx_dim is None:
        return None
    x = np.full((1, in_ch, 8, 8), A1111_LATENT, np.float32)
    context = np.full((A1111_CONTEXT_TOKENS, ctx_dim), A1111_LATENT, np.float32)
    try:
        out = unet_forward(tensors, x, A1111_TIMESTEP, context, head_channels)
    except (KeyError, ValueError, IndexError):
        return None  # a layout this pass does not know: no information
    if out.shape != x.shape:
        return None
    mean = float((out.astype(np.float64) - x).mean())
    if not math.isfinite(mean) or float(out.std()) == 0.0:
        return None  # not finite, or the same value everywhere: no information
    return ("v" if mean < A1111_THRESHOLD else "epsilon"), mean
