"""The small causal LM of the ablation, written for many runs at once.

A Llama-style decoder (RMSNorm, SiLU-gated MLP, causal attention; learned positions instead
of rotary ones) whose every weight carries a leading *run* dimension: one forward pass
computes ``A`` independent models, so the arms and seeds of an ablation share the Python
and kernel-launch overhead that dominates a 100k-parameter model on a CPU. Runs never mix:
each slice of a weight only meets its own slice of the batch.

Weights are stored as a precision mode dictates (bf16, or fp32 for the control) and used in
fp32: ``forward`` upcasts each weight where it is used, so autograd hands a bf16 weight its
gradient rounded once to bf16 and every matmul runs in fp32 (bf16 matmuls round differently
per CPU, and run ~17x slower without bf16 instructions). fp32 kernels still reassociate with
their vector width, so runs differ in their low bits across CPUs, and training can amplify
that (a warm-up on an AVX-512 CPU once ended far from an AVX2 one): the ablation's starts are
committed files (:mod:`rlvr_optim.ablation.starts`). Nothing is downloaded; weights start
from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LMShape", "forward", "generate", "greedy", "init_weights", "kl_to_reference",
           "require_transformers", "weight_shapes"]


def require_transformers():
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "the MiniLM ablation loads its model with transformers; install it with "
            "pip install 'rlvr_optim[ablation]' (or pip install transformers)"
        ) from e
    return transformers


@dataclass(frozen=True)
class LMShape:
    """Sizes of the model: vocabulary, width, blocks, heads, MLP width, longest sequence."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_length: int

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")


def weight_shapes(shape: LMShape) -> dict[str, tuple[int, ...]]:
    """Weight names (as in HF Llama, so layer and module-type grouping apply) and shapes."""
    h, i = shape.hidden, shape.intermediate
    out = {"model.embed_tokens.weight": (shape.vocab, h),
           "model.embed_positions.weight": (shape.max_length, h)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{proj}.weight"] = (h, h)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (shape.vocab, h)
    return out


def init_weights(shape: LMShape, seed: int) -> dict[str, Tensor]:
    """fp32 weights of one model, ``{name: tensor}``: norms 1, the rest N(0, 0.02) (HF Llama's
    init), drawn from ``seed`` in name order."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, dims in weight_shapes(shape).items():
        if len(dims) == 1:
            out[name] = torch.ones(dims)
        else:
            out[name] = 0.02 * torch.randn(dims, generator=gen)
    return out


def _linear(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` per run: ``x`` ``[A, N, in]``, ``w`` ``[A, out, in]``."""
    return torch.matmul(x, w.float().transpose(1, 2))


def _rms_norm(x: Tensor, w: Tensor) -> Tensor:
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x * w.float()[:, None, :]


def forward(weights: dict[str, Tensor], ids: Tensor, shape: LMShape) -> Tensor:
    """fp32 logits ``[A, B, T, vocab]`` of token ids ``[A, B, T]`` under stacked weights.

    Args:
        weights: ``{name: [A, ...]}`` in any float dtype (upcast at use); a leading dimension
            of 1 is shared by every run of ``ids``.
        ids: token ids, one batch per run.
        shape: the model's sizes.
    """
    runs, batch, length = ids.shape
    w = {n: (t.expand(runs, *t.shape[1:]) if t.shape[0] != runs else t)
         for n, t in weights.items()}
    emb = w["model.embed_tokens.weight"].float()
    x = torch.gather(emb, 1, ids.reshape(runs, -1, 1).expand(-1, -1, shape.hidden))
    x = x.reshape(runs, batch, length, shape.hidden)
    x = x + w["model.embed_positions.weight"].float()[:, None, :length]
    x = x.reshape(runs, batch * length, shape.hidden)
    heads, head_dim = shape.heads, shape.hidden // shape.heads

    def split(t: Tensor) -> Tensor:
        return t.reshape(runs * batch, length, heads, head_dim).transpose(1, 2)

    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"])
        q, k, v = (split(_linear(h, w[p + f"self_attn.{n}.weight"]))
                   for n in ("q_proj", "k_proj", "v_proj"))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        att = att.transpose(1, 2).reshape(runs, batch * length, shape.hidden)
        x = x + _linear(att, w[p + "self_attn.o_proj.weight"])
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(_linear(h, w[p + "mlp.gate_proj.weight"]))
        x = x + _linear(gate * _linear(h, w[p + "mlp.up_proj.weight"]),
                        w[p + "mlp.down_proj.weight"])
    x = _rms_norm(x, w["model.norm.weight"])
    return _linear(x, w["lm_head.weight"]).reshape(runs, batch, length, shape.vocab)


@torch.no_grad()
def generate(weights: dict[str, Tensor], prompts: Tensor, length: int, shape: LMShape,
             generators: list[torch.Generator], temperature: float = 1.0) -> Tensor:
    """Sample ``length`` tokens after each prompt ``[A, B, P]``; returns ``[A, B, P + length]``.

    Run ``a`` draws from ``generators[a]`` alone, so its samples do not depend on the other
    runs. Every step reruns the whole (short) sequence: no cache to keep consistent.
    """
    seq = prompts
    for _ in range(length):
        probs = torch.softmax(forward(weights, seq, shape)[:, :, -1] / temperature, dim=-1)
        picked = torch.stack([torch.multinomial(probs[a], 1, generator=g)
                              for a, g in enumerate(generators)])
        seq = torch.cat([seq, picked], dim=2)
    return seq


@torch.no_grad()
def greedy(weights: dict[str, Tensor], prompts: Tensor, length: int, shape: LMShape) -> Tensor:
    """Greedy completions ``[A, B, length]`` of prompts ``[A, B, P]``."""
    seq = prompts
    for _ in range(length):
        seq = torch.cat([seq, forward(weights, seq, shape)[:, :, -1].argmax(-1, keepdim=True)],
                        dim=2)
    return seq[:, :, prompts.shape[2]:]


def kl_to_reference(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Exact KL(p || ref) per position over the whole vocabulary (log-probabilities in)."""
    return (logp.exp() * (logp - ref_logp)).sum(dim=-1)
