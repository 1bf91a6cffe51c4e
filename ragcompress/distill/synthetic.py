"""Questions the base model writes about passages that come without any (``train --extra-passages``).

Distillation needs no gold answer: the teacher answers whatever question it is given, over
whatever passages retrieval returns, and the student learns to answer as it does. So any text
can become training examples once it has questions. The evaluation model's general adaptor,
trained on the questions of two SQuAD articles, stopped improving on held-out articles after
about one pass over its 139 examples (docs/distill.md): it needs other text more than more
steps, and the Paul Graham essays in ``../shared/data`` are other text without questions.

Each chosen passage is shown to the base model alone, with a request for one question it
answers; the first line of its greedy reply is the question. Questions are appended to a JSONL
file as they are written, so a killed run resumes, and a run with the same file reads them back
instead of writing them again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ragcompress.evaluation import Question, evenly_spaced
from ragcompress.indexing.inputs import PassageInput
from ragcompress.models import LoadedModel
from ragcompress.prompt import render_user_turn

REQUEST = (
    "Write one short factual question that can be answered with a few words from the passage above. "
    "Reply with the question only."
)
MAX_QUESTION_TOKENS = 40
ID_PREFIX = "synthetic:"  # question id = prefix + passage id: never a dataset question's id


def request_ids(lm: LoadedModel, text: str) -> list[int]:
    """The passage and the request as one user turn (chat template; plain text for base models)."""
    content = f"{text}\n\n{REQUEST}"
    rendered = render_user_turn(lm.tokenizer, content)
    if rendered is None:
        rendered = f"{content}\nQuestion:"
    return lm.tokenizer(rendered, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def write_question(lm: LoadedModel, passage: PassageInput) -> str:
    """The base model's greedy question about ``passage`` (its reply's first non-empty line)."""
    ids = request_ids(lm, passage.text)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    out = lm.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        max_new_tokens=MAX_QUESTION_TOKENS,
        do_sample=False,
        pad_token_id=pad,
    )
    reply = lm.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    return next((line.strip() for line in reply.splitlines() if line.strip()), "")


def synthetic_questions(
    lm: LoadedModel, passages: list[PassageInput], count: int, path: Path, progress: bool = True
) -> list[Question]:
    """One question per passage for ``count`` evenly spaced ``passages`` (0: every one), read
    from ``path`` where already written there. A passage whose reply is empty gets none."""
    from tqdm import tqdm

    done: dict[str, Question] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            done[record["passage_id"]] = Question(record["id"], record["question"], [], record["passage_id"])
    chosen = evenly_spaced(passages, count or None)
    with path.open("a", encoding="utf-8") as sink:
        for passage in tqdm(chosen, desc="synthetic questions", unit="passage", disable=not progress):
            if passage.id in done:
                continue
            text = write_question(lm, passage)
            question = Question(f"{ID_PREFIX}{passage.id}", text, [], passage.id)
            done[passage.id] = question
            record = {"id": question.id, "question": text, "answers": [], "passage_id": passage.id}
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
    return [done[p.id] for p in chosen if done[p.id].question]
