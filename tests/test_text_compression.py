"""ragcompress.text (self-information pruning, sentence extraction) and its LlamaIndex wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from ragcompress.text import Budget, SelfInformationCompressor, SentenceExtractor, make_text_compressor, split_sentences

TEXT = (
    "The Apollo program was the third United States human spaceflight program. "
    "It landed the first humans on the Moon in 1969. "
    "Melbourne is described as the sporting capital of Australia. "
    "The program was named after Apollo, the Greek god of light."
)


def test_budget_rate_and_total():
    assert Budget(rate=0.5).split([10, 7, 0, 1]) == [5, 4, 0, 1]
    assert Budget(rate=1.0).split([3]) == [3]
    shares = Budget(target_tokens=10).split([30, 10, 10])
    assert shares == [6, 2, 2] and sum(shares) == 10
    assert Budget(target_tokens=100).split([30, 10]) == [30, 10]  # under budget: unchanged


def test_budget_rate_is_not_rounded_up_past_an_exact_product():
    """``ceil(rate * n)`` of the exact product: 0.55 * 100 is 55.00000000000001 in floating point,
    and once kept 56 tokens of 100."""
    assert Budget(rate=0.55).split([100, 20]) == [55, 11]
    assert Budget(rate=0.07).split([100]) == [7]
    assert Budget(rate=0.55).split([101]) == [56]  # 55.55: still rounded up


def test_target_tokens_is_a_total_even_below_one_token_per_passage(lm):
    """Every passage got at least 1 token, so ``target_tokens=1`` over 6 passages kept 6 or more;
    the shares add up to the total now, and a share of 0 returns empty text."""
    assert Budget(target_tokens=1).split([10, 5, 3, 2, 1, 7]) == [1, 0, 0, 0, 0, 0]
    assert Budget(target_tokens=4).split([10, 5, 3, 2, 1, 7]) == [2, 1, 0, 0, 0, 1]
    texts = [f"Passage {i} tells of rivers, castles and comets over the years." for i in range(6)]
    for total in (1, 3):
        out = SelfInformationCompressor(lm, unit="token").compress(texts, target_tokens=total)
        assert sum(r.kept_tokens for r in out) <= total
        assert sum(r.text == "" for r in out) >= 6 - total


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({}, "exactly one"),
        ({"rate": 0.5, "target_tokens": 3}, "exactly one"),
        ({"rate": 0.0}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"target_tokens": 0}, "target_tokens"),
    ],
)
def test_budget_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Budget(**kwargs)


def test_split_sentences():
    assert split_sentences('One. "Two?" Three 3! 4 four.\n\nFive e.g. six') == [
        "One.",
        '"Two?"',
        "Three 3!",
        "4 four.",
        "Five e.g. six",
    ]
    assert split_sentences("  ") == []
    assert split_sentences("End.\n\nnext one") == ["End.", "next one"]  # a blank line ends one, whatever follows
    assert split_sentences("A b.\nc d") == ["A b.\nc d"]
    # capitals of other scripts, and CJK sentence marks (they were one sentence each: not shortened)
    assert split_sentences("Москва большая. Это город. Über alles. 東京です。人口？はい") == [
        "Москва большая.",
        "Это город.",
        "Über alles.",
        "東京です。",
        "人口？",
        "はい",
    ]


@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from ragcompress.models import load_model

    return load_model(tiny_lm_dir)


def test_surprisal_matches_log_softmax_per_window(lm):
    compressor = SelfInformationCompressor(lm, unit="token", window=5)
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:12]
    scores = compressor.surprisal(ids)
    start = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    expected = []
    for begin in range(0, len(ids), 5):
        window = torch.tensor([[start, *ids[begin : begin + 5]]])
        with torch.inference_mode():
            logp = torch.log_softmax(lm.model(input_ids=window).logits[0, :-1].float(), -1)
        expected += [-float(logp[i, t]) for i, t in enumerate(window[0, 1:].tolist())]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_token_pruning_keeps_the_most_surprising_tokens_in_order(lm):
    compressor = SelfInformationCompressor(lm, unit="token")
    ids = lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    (out,) = compressor.compress([TEXT], rate=0.4)
    budget = math.ceil(0.4 * len(ids))
    keep = sorted(torch.sort(compressor.surprisal(ids), descending=True, stable=True).indices[:budget].tolist())
    assert out.text == lm.tokenizer.decode([ids[i] for i in keep]).strip()  # ASCII: the kept tokens' text
    assert out.original_tokens == len(ids)
    assert out.kept_tokens == compressor.count_tokens(out.text)


def test_token_pruning_keeps_the_earlier_of_equally_surprising_tokens(lm, monkeypatch):
    """Equal surprisal keeps the earliest tokens (``topk`` broke ties by its algorithm)."""
    compressor = SelfInformationCompressor(lm, unit="token")
    text = " ".join(f"item{i}" for i in range(100))
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(compressor, "surprisal", lambda token_ids: torch.zeros(len(token_ids)))
    (out,) = compressor.compress([text], rate=0.05)
    budget = math.ceil(0.05 * len(ids))
    assert out.text == lm.tokenizer.decode(ids[:budget]).strip()


def test_token_pruning_cuts_whole_characters_from_the_input(lm):
    """Byte-level BPE splits a CJK or Cyrillic character over tokens; decoding the kept ids joined
    bytes of different characters into one the input does not hold (or U+FFFD). The kept text is
    cut from the input, so every character of it is the input's, in order."""
    compressor = SelfInformationCompressor(lm, unit="token")
    for text in (
        "墨尔本是澳大利亚维多利亚州的首府，也是该国第二大城市。它以文化、艺术和体育闻名。",
        "Москва является столицей России и крупнейшим городом страны.",
    ):
        (out,) = compressor.compress([text], rate=0.5)
        assert out.text and out.kept_tokens < out.original_tokens
        position = 0
        for character in out.text.replace(" ", ""):  # an in-order subsequence of the input's characters
            position = text.index(character, position) + 1


def test_kept_text_keeps_a_character_split_over_tokens_once_and_whole():
    """Offsets as byte-level BPE gives them: the two tokens of one character (here 墨, bytes split
    over tokens 1 and 2) both span it. Keeping either keeps the character, once."""
    from ragcompress.text.selfinfo import kept_text

    text = "它墨尔本"
    offsets = [(0, 1), (1, 2), (1, 2), (2, 3), (3, 4)]
    assert kept_text(text, [offsets[i] for i in (0, 2, 4)]) == "它墨本"
    assert kept_text(text, [offsets[i] for i in (1, 2, 3)]) == "墨尔"
    assert kept_text(" a b", [(0, 2), (2, 4)]) == "a b"  # a token's leading space is its own


def test_whitespace_only_text_compresses_to_nothing(lm):
    """Word pruning of a text of whitespace only raised ``max() arg is an empty sequence``."""
    for unit in ("word", "token"):
        (out,) = SelfInformationCompressor(lm, unit=unit).compress(["\n\n   \n\n  \t \n"], rate=0.5)
        assert out.text == "" and out.kept_tokens == 0


def test_word_pruning_keeps_whole_words_in_order_within_budget(lm):
    compressor = SelfInformationCompressor(lm, unit="word")
    (out,) = compressor.compress([TEXT], rate=0.5)
    words = TEXT.split()
    kept = out.text.split()
    position = 0
    for word in kept:  # an in-order subsequence of the original words
        position = words.index(word, position) + 1
    assert 0 < len(kept) < len(words)
    budget = math.ceil(0.5 * out.original_tokens)
    assert sum(len(lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in kept) <= budget


def test_each_token_belongs_to_the_word_its_text_starts_in():
    """Byte-level BPE puts the space before a word into the word's first token ("ĠMelbourne"
    starts at the space): that token is the word's, not the previous word's."""
    from transformers import AutoTokenizer

    from ragcompress.models import DEFAULT_MODEL, resolve_model_dir
    from ragcompress.text.selfinfo import _WORD, word_tokens

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL))
    text = "Culturally, Melbourne is home to 1,234 museums.\n\nThe city  hosts events."
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    members = word_tokens(text, encoded["offset_mapping"], words)
    pieces = {
        text[a:b]: tokenizer.decode([encoded["input_ids"][t] for t in tokens]).strip()
        for (a, b), tokens in zip(words, members, strict=True)
    }
    assert pieces == {word: word for word in pieces}  # every word decodes from exactly its own tokens
    assert list(pieces) == [
        "Culturally,",
        "Melbourne",
        "is",
        "home",
        "to",
        "1,234",
        "museums.",
        "The",
        "city",
        "hosts",
        "events.",
    ]


NUMBERS = (
    "In 2021 the city had 4 917 750 people, 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 votes in "
    "1999 and 2004 and 2008."
)


def test_word_pruning_keeps_its_budget_on_text_with_numbers(lm):
    """SmolLM2 splits the space before digits into a token of its own (``"Ġ"``), which belongs to
    no word: words were costed a token short each, so a text full of numbers kept every word at
    rate 0.8 (90 of 90 tokens for a budget of 72), and ordinary text overshot by one (46 of 45).
    A word now costs the tokens of ``" " + word``, and the output is re-counted."""
    compressor = SelfInformationCompressor(lm, unit="word")
    for text in (NUMBERS, TEXT):
        for rate in (0.33, 0.5, 0.6, 0.7, 0.8, 0.9):
            (out,) = compressor.compress([text], rate=rate)
            budget = Budget(rate=rate).split([out.original_tokens])[0]
            assert 0 < out.kept_tokens <= budget, (text[:20], rate, out.kept_tokens, budget)
            assert out.kept_tokens == compressor.count_tokens(out.text)


def test_token_pruning_keeps_its_budget_on_characters_split_over_tokens(lm):
    """Byte-level BPE splits a CJK character or an emoji over tokens; keeping one of them put the
    whole character back, so ``unit="token"`` kept 40-90 % more than its budget on such text.
    The tokens of one character are one unit now, costing all of them."""
    compressor = SelfInformationCompressor(lm, unit="token")
    for text in (
        "墨尔本是澳大利亚维多利亚州的首府。它以文化、艺术和体育闻名。人口约五百万。",
        "Hello 👋🏽 world! Ça va? Naïve café — résumé… ok.",
    ):
        for rate in (0.1, 0.33, 0.5, 0.9):
            (out,) = compressor.compress([text], rate=rate)
            budget = Budget(rate=rate).split([out.original_tokens])[0]
            assert 0 < out.kept_tokens <= budget, (text[:5], rate, out.kept_tokens, budget)


def test_character_groups_join_the_tokens_of_one_character():
    from ragcompress.text.selfinfo import character_groups

    assert character_groups([(0, 1), (1, 2), (1, 2), (2, 3), (3, 4)]) == [[0], [1, 2], [3], [4]]
    assert character_groups([(0, 2), (1, 3), (3, 4)]) == [[0, 1], [2]]  # a token across two characters
    assert character_groups([(0, 1), (1, 2)]) == [[0], [1]]  # ASCII: a token each


def test_rate_one_returns_text_unchanged(lm):
    (out,) = SelfInformationCompressor(lm).compress([TEXT], rate=1.0)
    assert out.text == TEXT and out.ratio == 1.0


def test_invalid_selfinfo_options(lm):
    with pytest.raises(ValueError, match="unit"):
        SelfInformationCompressor(lm, unit="sentence")
    with pytest.raises(ValueError, match="unknown text compression method"):
        make_text_compressor("lingua", lm=lm)


def test_extraction_keeps_the_sentence_about_the_question(lm, embedder):
    extractor = SentenceExtractor(lm.tokenizer, embedder)
    (out,) = extractor.compress([TEXT], "Which city is the sporting capital of Australia?", rate=0.3)
    assert out.text == "Melbourne is described as the sporting capital of Australia."
    (wider,) = extractor.compress([TEXT], "When did humans land on the Moon?", rate=0.6)
    sentences = split_sentences(TEXT)
    assert sentences[1] in wider.text
    assert wider.text == " ".join(s for s in sentences if s in wider.text)  # original order
    with pytest.raises(ValueError, match="query"):
        extractor.compress([TEXT], None, rate=0.5)


class MarkedSentences:
    """A stand-in embedder: sentences holding ``*`` are the question's (similarity 1), the rest 0."""

    def embed(self, texts):
        import numpy as np

        return np.array([[1.0, 0.0]] + [[1.0, 0.0] if "*" in t else [0.0, 1.0] for t in texts[1:]])


LONG = "Beta is a sentence of many words that never fits the budget."  # the unmarked: too long to keep
LONG_CJK = "它以文化、艺术、体育和美食闻名于世界各地。"


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"墨尔本是首府*。{LONG_CJK}人口约五百万*。", "墨尔本是首府*。人口约五百万*。"),
        (f"Alpha one*.\n\n{LONG} {LONG}\n\nDelta four*.", "Alpha one*.\n\nDelta four*."),
        (f"Alpha one*. {LONG}\nGamma three*. {LONG}", "Alpha one*. Gamma three*."),
        (f"Alpha one*. {LONG} Gamma three*.", "Alpha one*. Gamma three*."),  # English: one space, as before
    ],
)
def test_extraction_joins_kept_sentences_with_the_inputs_own_separators(lm, text, expected):
    """Kept sentences were joined with one space: CJK got a space its text has none of, and
    paragraph breaks were lost. Each is followed by what followed it in the input."""
    extractor = SentenceExtractor(lm.tokenizer, MarkedSentences())
    (out,) = extractor.compress([text], "question", target_tokens=extractor.count_tokens(expected) + 2)
    assert out.text == expected


# -- the LlamaIndex wrapper ------------------------------------------------------------------------


def _nodes():
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode

    first = TextNode(
        id_="a",
        text=TEXT,
        metadata={"title": "Apollo", "page": 1},
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id="doc-1")},
    )
    second = TextNode(id_="b", text=TEXT.upper(), metadata={"title": "Shout"})
    return [NodeWithScore(node=first, score=0.75), NodeWithScore(node=second, score=0.25)]


@pytest.mark.parametrize("method", ["selfinfo", "extractive"])
def test_postprocessor_keeps_one_node_per_input_with_metadata_and_score(method, tiny_lm_dir):
    from llama_index.core.schema import MetadataMode, NodeRelationship

    from llama_index.postprocessor.ragcompress import TextCompressionPostprocessor

    post = TextCompressionPostprocessor(method=method, rate=0.5, model=tiny_lm_dir)
    nodes = _nodes()
    out = post.postprocess_nodes(nodes, query_str="Which city is the sporting capital of Australia?")
    assert [n.node.node_id for n in out] == ["a", "b"]
    assert [n.score for n in out] == [0.75, 0.25]
    assert {k: out[0].node.metadata[k] for k in ("title", "page")} == {"title": "Apollo", "page": 1}
    assert out[0].node.relationships[NodeRelationship.SOURCE].node_id == "doc-1"
    assert nodes[0].node.text == TEXT  # inputs untouched
    original = sum(n.node.metadata["ragcompress_original_tokens"] for n in out)
    kept = sum(n.node.metadata["ragcompress_kept_tokens"] for n in out)
    assert post.last_ratio == kept / original < 0.75
    for n in out:
        assert n.node.metadata["ragcompress_kept_tokens"] == post.compressor.count_tokens(n.node.text)
        assert "ragcompress_kept_tokens" not in n.node.get_content(metadata_mode=MetadataMode.LLM)


def test_postprocessor_token_budget_and_async(tiny_lm_dir):
    import asyncio

    from llama_index.postprocessor.ragcompress import TextCompressionPostprocessor

    post = TextCompressionPostprocessor(method="selfinfo", unit="token", target_tokens=20, model=tiny_lm_dir)
    out = asyncio.run(post.apostprocess_nodes(_nodes()))
    assert len(out) == 2
    assert post.last_stats["original_tokens"] > 20


def test_postprocessor_validation(tiny_lm_dir):
    from llama_index.postprocessor.ragcompress import TextCompressionPostprocessor

    assert TextCompressionPostprocessor(model=tiny_lm_dir).rate == 0.5
    with pytest.raises(ValueError, match="rate"):
        TextCompressionPostprocessor(rate=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        TextCompressionPostprocessor(rate=0.5, target_tokens=10)
    with pytest.raises(ValueError, match="query"):
        TextCompressionPostprocessor(method="extractive", model=tiny_lm_dir).postprocess_nodes(_nodes())
