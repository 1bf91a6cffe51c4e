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
instead of writing them again. The file's first line records the training data they belong to
(``{"training_data_sha256": ...}``, :func:`ragcompress.distill.corpus.data_hash`): a run on other
data refuses it rather than train on questions about passages that may have changed (a file from
before the line was written is read unchecked).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ragcompress.distill.corpus import check_alone
from ragcompress.errors import InputError
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


DATA_KEY = "training_data_sha256"  # the header line's one field


def synthetic_questions(
    lm: LoadedModel, passages: list[PassageInput], count: int, path: Path, data_sha256: str, progress: bool = True
) -> list[Question]:
    """One question per passage for ``count`` evenly spaced ``passages`` (0: every one), read
    from ``path`` where already written there for the same training data (``data_sha256``; other
    data is refused). A passage whose reply is empty gets none."""
    from tqdm import tqdm

    done: dict[str, Question] = {}
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        record = json.loads(line)
        if "passage_id" not in record:  # the header
            check_data(path, record.get(DATA_KEY), data_sha256)
            continue
        done[record["passage_id"]] = Question(record["id"], record["question"], [], record["passage_id"])
    chosen = evenly_spaced(passages, count or None)
    # every one still to write is checked before the first is written
    needs = ((p, len(request_ids(lm, p.text)) + MAX_QUESTION_TOKENS) for p in chosen if p.id not in done)
    use = f"for the question the base model writes about it (the passage, the request and {MAX_QUESTION_TOKENS} question tokens)"
    check_alone(lm, needs, use)
    with path.open("a", encoding="utf-8") as sink:
        if not lines:  # a new file (or one a killed run left empty) opens with its data
            sink.write(json.dumps({DATA_KEY: data_sha256}) + "\n")
            sink.flush()
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


def check_data(path: Path, recorded: str | None, data_sha256: str) -> None:
    """Refuse questions written for other training data: their passages (by id) may hold other
    text now, and the adaptor would record the new data's hash."""
    if recorded != data_sha256:
        raise InputError(
            f"{path} holds questions written for other training data (sha256 {str(recorded)[:16]}, not "
            f"{data_sha256[:16]}: the passages, questions, --extra-passages or held-out articles differ); delete "
            f"{path.name} to write them again, or train on the files they were written for"
        )
