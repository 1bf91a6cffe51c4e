"""The row names of ``benchmarks/lowrank_frontier.py`` (``METHOD@RATIO/QUANT/RANK`` and its
suffixes, e.g. ``global:kvzip@0.21/int4v2/r32k+adaptor~keep4-4``: the grammar is told in that
script's docstring), parsed without torch.

One grammar for the two readers of these names: the frontier builds a store from each row it is
given (``RowSpec.parse``), and ``benchmarks/report.py`` reads the rows of the files the frontier
published (the protection table's first / last column). When each kept a pattern of its own, a name
the frontier cannot have written was still read by the report, as protecting 1 and 0.
"""

from __future__ import annotations

import re

ROW = re.compile(
    r"(?P<method>[^@]+)@(?P<ratio>[0-9.]+?)(?:f(?P<floor>[0-9.]+))?/(?P<quant>none|fp16|int8|int4|int2)(?:v(?P<vbits>[248]))?(?:g(?P<group>\d+))?/(?P<rank>-|r\d+k?|[ep][0-9.]+k?)(?P<adaptor>\+adaptor(?:-[A-Za-z0-9]+)?)?(?P<merge>~merge)?(?P<basescore>~basescore)?(?P<vnorm>~vnorm)?(?P<pool>~pool)?(?P<corpus>~corpus)?(?P<entity>~entity)?(?:~keep(?P<keep_first>\d+)-(?P<keep_last>\d+))?"
)
ROW_FORMAT = "METHOD@RATIO[fFLOOR]/QUANT[vBITS][gGROUP]/(-|rN[k]|eE[k]|pE[k])[+adaptor[-LABEL]][~merge][~basescore][~vnorm][~pool][~corpus][~entity][~keepF-L]"
# issue 16's setting: an eviction row protects each passage's first token and none of its last
# unless it names other counts (``~keepF-L``)
DEFAULT_PROTECTION = (1, 0)


def match_row(name: str) -> re.Match[str]:
    """``name`` parsed by :data:`ROW`; a ``ValueError`` naming the expected form when it is no row name."""
    match = ROW.fullmatch(name)
    if match is None:
        raise ValueError(f"bad row {name!r}: expected {ROW_FORMAT}")
    return match


def named_protection(match: re.Match[str]) -> tuple[int, int] | None:
    """The tokens a parsed row protects first and last where it names them (``~keepF-L``), else None."""
    return (int(match["keep_first"]), int(match["keep_last"])) if match["keep_first"] else None


def protection(name: str) -> tuple[int, int]:
    """The tokens row ``name`` protects first and last: its ``~keepF-L``, else :data:`DEFAULT_PROTECTION`."""
    return named_protection(match_row(name)) or DEFAULT_PROTECTION
