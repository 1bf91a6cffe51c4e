"""The rendering of the documents' result tables from ``docs/results/*.json``, one module per
family of results files; ``benchmarks/report.py`` is its command and tells the layout."""
