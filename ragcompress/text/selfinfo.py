"""Token-level pruning by self-information under the small LM (LLMLingua family).

Self-information of a token is its surprisal ``-log p(x_t | x_<t)`` under a small causal LM:
tokens the model predicts easily carry little information and can be dropped with little loss
for a larger reader model (Selective Context, Li et al., EMNLP 2023; LLMLingua, Jiang et al.,
EMNLP 2023). This is the question-agnostic, single-pass variant: every token is scored once in
windows of ``window`` tokens, then the highest-scoring units are kept, in their original order,
while they fit the budget.

``unit="token"`` keeps individual tokens (LLMLingua's granularity; the output may split words,
never characters: it is the kept tokens' text cut from the input). Tokens that share a character
(byte-level BPE splits a CJK character or an emoji over several) are one unit costing all of
them, ranked by their mean surprisal: keeping one of them puts the whole character back, so
counting it as one token overshot the budget by 40-90 % on CJK text.
``unit="word"`` keeps whole whitespace-delimited words ranked by their mean token surprisal
(Selective Context's lexical units), which keeps names and numbers intact. A word costs the
tokens of ``" " + word``, as it stands in the output: the space the tokenizer splits off before
digits (``"Ġ"``, ``"1"``, ``"9"``...) belongs to no word of the input, and counting without it
kept every word of a text full of numbers. A script written without spaces (Chinese, Japanese,
Thai) is one "word" per run of text, which word pruning keeps or drops whole: compress such
text with ``unit="token"``.

The budget is a cap on the output as the tokenizer counts it: the joined text is re-counted and
the lowest-scoring kept units are dropped until it fits (joining can merge or split tokens at
the seams). The one exception: a budget smaller than every unit keeps the most informative unit
anyway (a passage never vanishes for a positive budget), as extraction keeps its best sentence;
a text of one unit (a script without spaces under ``unit="word"``) then comes back whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ragcompress.text.base import TextCompressor

UNITS = ("word", "token")
_WORD = re.compile(r"\S+")


class SelfInformationCompressor(TextCompressor):
    """Keeps the most surprising tokens or words of each passage under ``lm`` (a LoadedModel)."""

    name: ClassVar[str] = "selfinfo"

    def __init__(self, lm: Any, *, unit: str = "word", window: int = 1024) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if window < 2:
            raise ValueError(f"window must be at least 2 tokens, got {window}")
        super().__init__(lm.tokenizer)
        self.lm = lm
        self.unit = unit
        self.window = window

    @torch.inference_mode()
    def surprisal(self, token_ids: list[int]) -> torch.Tensor:
        """``[n]`` surprisal in nats of each token given the ones before it in its window.

        Each window starts with the BOS token (or EOS when there is none) so its first token
        is scored too.
        """
        start = self.tokenizer.bos_token_id
        if start is None:
            start = self.tokenizer.eos_token_id
        scores = []
        for begin in range(0, len(token_ids), self.window):
            chunk = token_ids[begin : begin + self.window]
            ids = torch.tensor([[start, *chunk]], device=self.lm.model.device)  # where the model is (CUDA too)
            logits = self.lm.model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [n, vocab]
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(-logprobs.gather(1, ids[0, 1:, None])[:, 0].cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    def _compress_one(self, text: str, query: str | None, budget: int) -> str:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        scores = self.surprisal(ids)
        if self.unit == "token":
            groups = character_groups(offsets)
            spans = [(offsets[g[0]][0], max(offsets[t][1] for t in g)) for g in groups]
            units = [(float(scores[g].mean()), i, len(g)) for i, g in enumerate(groups)]
            return self._within(budget, units, lambda kept: kept_text(text, [spans[i] for i in kept]))
        spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        if not spans:  # whitespace only: no word to keep
            return ""
        words = [text[start:end] for start, end in spans]
        members = word_tokens(text, offsets, spans)
        costs = [len(t) for t in self.tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]]
        units = [(float(scores[m].mean()), i, costs[i]) for i, m in enumerate(members) if m]
        return self._within(budget, units, lambda kept: " ".join(words[i] for i in kept))

    def _within(self, budget: int, units: list[tuple[float, int, int]], join: Callable[[list[int]], str]) -> str:
        """``join`` of the units (``(score, index, cost)``) kept under ``budget``: the highest
        scores first (the earlier of equals), each that still fits, then, while the joined text
        counts more than ``budget`` tokens, the lowest-scoring kept units dropped (the later of
        equals) until what was dropped costs the excess; the kept indices reach ``join`` in order.
        Where no unit fits, the highest-scoring one is kept alone (module doc)."""
        if not units:
            return ""
        kept, used = [], 0
        for score, i, cost in sorted(units, key=lambda u: (-u[0], u[1])):
            if used + cost <= budget:
                kept.append((score, i, cost))
                used += cost
        kept.sort(key=lambda u: (u[0], -u[1]))  # the first to drop first
        out = join(sorted(i for _, i, _ in kept))
        while kept and (excess := self.count_tokens(out) - budget) > 0:
            while kept and excess > 0:
                excess -= kept.pop(0)[2]
            out = join(sorted(i for _, i, _ in kept))
        return out if kept else join([min(units, key=lambda u: (-u[0], u[1]))[1]])

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "unit": self.unit, "window": self.window}


def kept_text(text: str, spans: list[tuple[int, int]]) -> str:
    """The text of the kept tokens' character ``spans`` (in order), sliced from ``text``. Decoding
    the kept ids instead joins the bytes of different characters (byte-level BPE splits a CJK
    character over tokens): ``"墨尔本是大大以文化、佲闻名。"`` held a character the input has
    not. Tokens that share a character (overlapping spans) keep that character once, whole."""
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return "".join(text[start:end] for start, end in merged).strip()


def character_groups(offsets: list[tuple[int, int]]) -> list[list[int]]:
    """The tokens in order, grouped where their character spans overlap: byte-level BPE gives
    every token holding bytes of one character (a CJK character, an emoji) that character's span,
    so keeping any of them keeps the whole character (:func:`kept_text`); a group is the tokens
    that come back together. A token of ASCII text is a group of its own."""
    groups: list[list[int]] = []
    reach = -1
    for t, (start, end) in enumerate(offsets):
        if groups and start < reach:
            groups[-1].append(t)
        else:
            groups.append([t])
        reach = max(reach, end) if groups[-1][0] != t else end
    return groups


def word_tokens(text: str, offsets: list[tuple[int, int]], words: list[tuple[int, int]]) -> list[list[int]]:
    """The tokens of each word (``words``: character spans in ``text``), by where each token's
    text starts. Byte-level BPE offsets include the space before a word (``"ĠMelbourne"`` starts
    at the space), so a token's leading whitespace is skipped first; a whitespace-only token
    belongs to no word."""
    members: list[list[int]] = [[] for _ in words]
    w = 0
    for t, (start, end) in enumerate(offsets):
        piece = text[start:end]
        start += len(piece) - len(piece.lstrip())
        while w + 1 < len(words) and start >= words[w + 1][0]:
            w += 1
        if words and end > start:
            members[w].append(t)
    return members
