"""The small causal LM of the ablation: a Llama-style ``transformers`` model built from a config.

Nothing is downloaded: the config is written here and the weights are initialised from a seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["answer_logits", "build_model", "generate", "greedy_accuracy", "kl_to_reference",
           "require_transformers"]


def require_transformers():
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "the precision ablation builds its model with transformers; install it with "
            "pip install 'rlvr_optim[ablation]' (or pip install transformers)"
        ) from e
    return transformers


def build_model(vocab_size: int, *, hidden: int, layers: int, heads: int, intermediate: int,
                max_length: int, bos: int, eos: int, seed: int) -> nn.Module:
    """A fp32 ``LlamaForCausalLM`` from a config, initialised from ``seed``.

    The caller's global RNG is left as it was.
    """
    transformers = require_transformers()
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_length, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, tie_word_embeddings=False, use_cache=False,
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def generate(model: nn.Module, prompts: Tensor, length: int, generator: torch.Generator,
             temperature: float = 1.0) -> Tensor:
    """Sample ``length`` tokens after each prompt; returns prompts and samples, ``[n, P + length]``.

    Every step reruns the whole (short) sequence: no cache to keep consistent across dtypes.
    """
    seq = prompts
    for _ in range(length):
        logits = _logits(model, seq)[:, -1].float() / temperature
        probs = torch.softmax(logits, dim=-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return seq


@torch.no_grad()
def greedy_accuracy(model: nn.Module, prompts: Tensor, answers: Tensor) -> float:
    """Share of prompts whose greedy completion is exactly the answer."""
    seq = prompts
    for _ in range(answers.shape[1]):
        seq = torch.cat([seq, _logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return float((seq[:, prompts.shape[1]:] == answers).all(dim=1).float().mean())


def answer_logits(model: nn.Module, seq: Tensor, prompt_length: int) -> Tensor:
    """fp32 logits that predict the answer tokens ``seq[:, prompt_length:]``."""
    return _logits(model, seq)[:, prompt_length - 1:-1].float()


def kl_to_reference(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Exact KL(policy || reference) per position over the whole vocabulary."""
    return (logp.exp() * (logp - ref_logp)).sum(dim=-1)
