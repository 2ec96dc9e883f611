"""The synthetic task of the LM ablation: fixed-width addition with a verifiable answer.

``"07+45="`` -> ``"052"`` or, reversed, ``"250"``, then end-of-sequence: two correct outputs
per prompt (one for palindromic sums), so which one a policy writes is its own choice and
an SFT data set can carry either. Operands and answer are zero-padded, so every prompt and
every answer has the same length and batches need no padding.

Problems are numbered ``a * 10**digits + b``; :meth:`AdditionTask.split` sets a fixed share of
them aside, so held-out accuracy is measured on problems that no warm-up or training step saw.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AdditionTask"]


class AdditionTask:
    """``a + b`` with ``digits``-digit operands and its own character tokenizer.

    Tokens: ``0``-``9`` are ids 0-9, then ``+``, ``=``, ``<bos>``, ``<eos>``. A prompt is
    ``<bos> a + b =`` (``2 * digits + 3`` tokens); the answer is the ``digits + 1`` digits of
    the sum, most significant first ("forward") or last ("reversed"), then ``<eos>``.

    Args:
        digits: digits per operand (default 2).
    """

    SYMBOLS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "+", "=", "<bos>", "<eos>")

    def __init__(self, digits: int = 2) -> None:
        if digits < 1:
            raise ValueError(f"digits must be at least 1, got {digits}")
        self.digits = digits
        self.ids = {s: i for i, s in enumerate(self.SYMBOLS)}
        self.plus, self.equals = self.ids["+"], self.ids["="]
        self.bos, self.eos = self.ids["<bos>"], self.ids["<eos>"]

    @property
    def vocab_size(self) -> int:
        return len(self.SYMBOLS)

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 3

    @property
    def answer_length(self) -> int:
        return self.digits + 2

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (digits, ``+``, ``=``, ``<bos>``, ``<eos>``)."""
        out, i = [], 0
        while i < len(text):
            for symbol in ("<bos>", "<eos>"):
                if text.startswith(symbol, i):
                    out.append(self.ids[symbol])
                    i += len(symbol)
                    break
            else:
                if text[i] not in self.ids:
                    raise ValueError(f"character {text[i]!r} is not in the vocabulary "
                                     f"{self.SYMBOLS}")
                out.append(self.ids[text[i]])
                i += 1
        return out

    def decode(self, ids) -> str:
        return "".join(self.SYMBOLS[int(i)] for i in ids)

    def _digits(self, x: Tensor, width: int) -> Tensor:
        powers = 10 ** torch.arange(width - 1, -1, -1)
        return (x.unsqueeze(-1) // powers) % 10

    @property
    def problem_count(self) -> int:
        return 10 ** (2 * self.digits)

    def split(self, held_out: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(training ids, held-out ids)``: ``held_out`` problem ids drawn once by ``seed``
        (sorted), and every other id."""
        if not 0 < held_out < self.problem_count:
            raise ValueError(f"held_out must be in 1..{self.problem_count - 1}, got {held_out}")
        order = torch.randperm(self.problem_count, generator=torch.Generator().manual_seed(seed))
        return order[held_out:].sort().values, order[:held_out].sort().values

    def problems(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Prompts and forward answers of problem ids (``a * 10**digits + b``)."""
        return self._encode(ids // 10**self.digits, ids % 10**self.digits)

    def sample(self, n: int, generator: torch.Generator,
               pool: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``n`` random problems: prompts ``[n, prompt_length]``, answers ``[n, answer_length]``.

        Drawn uniformly (with replacement) from the problem ids in ``pool``, or from all
        problems when ``pool`` is None.
        """
        if pool is not None:
            return self.problems(pool[torch.randint(0, len(pool), (n,), generator=generator)])
        a = torch.randint(0, 10**self.digits, (n,), generator=generator)
        b = torch.randint(0, 10**self.digits, (n,), generator=generator)
        return self._encode(a, b)

    def _encode(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        n = len(a)
        column = lambda v: torch.full((n, 1), v, dtype=torch.int64)  # noqa: E731
        prompts = torch.cat([column(self.bos), self._digits(a, self.digits), column(self.plus),
                             self._digits(b, self.digits), column(self.equals)], dim=1)
        answers = torch.cat([self._digits(a + b, self.digits + 1), column(self.eos)], dim=1)
        return prompts, answers

    def reverse(self, answers: Tensor) -> Tensor:
        """Forward answers ``[..., answer_length]`` written reversed (digits flipped, ``<eos>``
        last)."""
        return torch.cat([answers[..., :-1].flip(-1), answers[..., -1:]], dim=-1)

    def reward(self, completions: Tensor, answers: Tensor) -> Tensor:
        """1.0 where the completion is exactly the forward or the reversed answer (digits and
        ``<eos>``), else 0.0; ``answers`` are forward, any leading batch shape."""
        forward = (completions == answers).all(dim=-1)
        return (forward | (completions == self.reverse(answers)).all(dim=-1)).float()

    def is_reversed(self, completions: Tensor, answers: Tensor) -> Tensor:
        """True where the completion is the reversed answer and not the forward one."""
        return ((completions == self.reverse(answers)).all(dim=-1)
                & ~(completions == answers).all(dim=-1))
