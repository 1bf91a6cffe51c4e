"""Token-level pruning by self-information under the small LM (LLMLingua family).

Self-information of a token is its surprisal ``-log p(x_t | x_<t)`` under a small causal LM:
tokens the model predicts easily carry little information and can be dropped with little loss
for a larger reader model (Selective Context, Li et al., EMNLP 2023; LLMLingua, Jiang et al.,
EMNLP 2023). This is the question-agnostic, single-pass variant: every token is scored once in
windows of ``window`` tokens, then the highest-scoring units are kept, in their original order,
until the budget is filled.

``unit="token"`` keeps individual tokens (LLMLingua's granularity; the output may split words,
never characters: it is the kept tokens' text cut from the input);
``unit="word"`` keeps whole whitespace-delimited words ranked by their mean token surprisal
(Selective Context's lexical units), which keeps names and numbers intact. A script written
without spaces (Chinese, Japanese, Thai) is one "word" per run of text, which word pruning keeps
or drops whole: compress such text with ``unit="token"``.
"""

from __future__ import annotations

import re
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
            keep = sorted(torch.sort(scores, descending=True, stable=True).indices[:budget].tolist())  # ties: earlier
            return kept_text(text, [offsets[i] for i in keep])
        words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
        members = word_tokens(text, offsets, words)
        units = [(float(scores[m].mean()), i, len(m)) for i, m in enumerate(members) if m]
        if not units:  # whitespace only: no word to keep
            return ""
        kept, used = [], 0
        for _, i, cost in sorted(units, key=lambda u: (-u[0], u[1])):
            if used + cost <= budget:
                kept.append(i)
                used += cost
        if not kept:  # budget smaller than the most informative word: keep that word anyway
            kept = [max(units, key=lambda u: u[0])[1]]
        return " ".join(text[words[i][0] : words[i][1]] for i in sorted(kept))

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
