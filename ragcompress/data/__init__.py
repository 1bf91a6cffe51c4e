"""Bundled sample data (see squad_sample/README.md for its source and licence)."""

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent / "squad_sample"
SAMPLE_PASSAGES = SAMPLE_DIR / "passages.jsonl"
SAMPLE_QUESTIONS = SAMPLE_DIR / "questions.jsonl"
