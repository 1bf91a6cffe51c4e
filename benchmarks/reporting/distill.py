"""docs/distill.md's blocks: ``distill`` (learned passage caches against full prefill on held-out
articles, ``benchmarks/distill_eval.py``) and ``training-article-retrieval`` (how often held-out
questions retrieve an adaptor's training articles)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .shared import ci95, files, load, model_name, pct, source_line, table


def render_training_article_retrieval(results: Path) -> str:
    """How often held-out questions retrieve passages of an adaptor's training articles
    (``training_article_retrieval.json``, ``benchmarks/training_article_retrieval.py``)."""
    path = results / "training_article_retrieval.json"
    data = load(path)
    rows = [
        [
            "; ".join(a.replace("_", " ") for a in r["train_articles"]),
            str(len(r["adaptors"])),
            str(r["top_k"]),
            f"{r['questions_reaching_training_articles']} / {r['questions']}",
            f"{r['slots_from_training_articles']} / {r['slots']}",
        ]
        for r in data["rows"]
    ]
    header = [
        "adaptors trained on",
        "packaged adaptors",
        "top-k",
        "held-out questions retrieving a training-article passage",
        "retrieved slots from training articles",
    ]
    return table(header, rows) + "\n\n" + source_line([path])


def trained_for(adaptor: dict) -> str:
    """' trained for global:kvzip 0.25 int4' when the adaptor's student was compressed, else ''."""
    words = []
    if adaptor.get("method", "none") != "none":
        words += [adaptor["method"], f"{adaptor['ratio']:g}"]
    if adaptor.get("quant", "none") != "none":
        words.append(adaptor["quant"])
    return " trained for " + " ".join(words) if words else ""


def _kl_vs_baseline(row: dict[str, Any]) -> str:
    """An adaptor row's mean KL as a share of its no-adaptor baseline's (``distill_eval.baseline_of``)."""
    vs = row.get("kl_vs_baseline")
    if not vs:
        return "–"
    low, high = vs["ci95"]
    text = f"{100 * vs['ratio']:.0f} % of {vs['baseline']} [{100 * low:.0f}, {100 * high:.0f}]"
    if "median_per_question_ratio" in vs:
        text += f"; per-question median {100 * vs['median_per_question_ratio']:.0f} %"
    return text


def _wins(paired: dict[str, Any] | None) -> str:
    """'+14 / -3 (p 0.013)': questions an adaptor row gets right that its baseline misses, and back."""
    if not paired or "wins" not in paired:
        return "–"
    return f"+{paired['wins']} / -{paired['losses']} (p {paired['p_value']:.2g})"


def _distill_sample(meta: dict[str, Any]) -> str:
    """'24 questions of held-out articles A, B' or, for a run over every question of them
    (``distill_eval --held-out all``, which records training's ``validation_sample``), 'all 81 ...'."""
    every = "all " if meta.get("validation_sample") else ""
    return f"{every}{meta['questions']} questions of {meta['sample']}"


def render_distill(results: Path) -> str:
    """Learned passage caches (#15, ``distill_*.json``, ``benchmarks/distill_eval.py``): each
    setting against full prefill on held-out articles, the training summary and indexing cost."""
    paths = files(results, "distill_*.json")
    parts = []
    for path in paths:
        data = load(path)
        full = data["full_prefill"]["sub_em"]
        rows = [
            [
                name,
                f"{row['ratio']:g}",
                row["quant"],
                f"{row['kl_answer']:.4f}" + (f" {ci95(row['kl_ci95'])}" if "kl_ci95" in row else ""),
                _kl_vs_baseline(row),
                f"{row['agreement']:.2f}" + (f" {ci95(row['agreement_ci95'])}" if "agreement_ci95" in row else ""),
                f"{row['sub_em']:.2f} ({pct(row['sub_em'], full)})",
                _wins(row.get("sub_em_vs_baseline")),
            ]
            for name, row in data["rows"].items()
        ]
        rows.append(["full prefill (reference)", "1", "-", "0", "–", "1.00", f"{full:.2f} (100 %)", "–"])
        meta, metrics = data["meta"], data["adaptor"]["metrics"]
        header = [
            "setting",
            "ratio",
            "quant",
            "KL to full (answer) [95 % CI]",
            "KL vs same bytes, no adaptor [95 % CI]",
            "agreement [95 % CI]",
            "sub-EM (% of full)",
            "sub-EM right / wrong where no adaptor is not (McNemar p)",
        ]
        kinds = f"'adaptor': kind {meta.get('adaptor_kind') or 'cache'}{trained_for(data['adaptor'])}"
        compared = meta.get("compared_adaptor")
        if compared:
            steps = f"{compared['metrics']['steps']} steps"
            if compared.get("init_adaptor_hash"):  # train --init-adaptor: a continuation of another adaptor
                steps += f" continuing {compared['init_adaptor_hash'][:12]}"
            kinds += f"; 'compared adaptor': kind {compared['kind']}{trained_for(compared)} ({compared['hash'][:12]}, {steps})"
        parts.append(
            f"{model_name(meta['model'])}, {_distill_sample(meta)} "
            f"(load average {meta['load'][0]:.0f} on 2 cores; {kinds}):\n\n" + table(header, rows)
        )
        outside = {name: row["outside_validation"] for name, row in data["rows"].items() if "outside_validation" in row}
        if outside:
            n = next(iter(outside.values()))["questions"]
            sub = [
                [
                    name,
                    f"{o['kl_answer']:.4f} {ci95(o['kl_ci95'])}",
                    _kl_vs_baseline(o),
                    f"{o['agreement']:.2f}",
                    f"{o['sub_em']:.2f}",
                ]
                for name, o in outside.items()
            ]
            parts.append(
                f"The {n} of these questions outside the training run's validation sample (its stopping step was "
                "read off that sample's curve):\n\n"
                + table(
                    ["setting", "KL to full (answer) [95 % CI]", "KL vs same bytes, no adaptor", "agreement", "sub-EM"],
                    sub,
                )
            )
        train = (
            f"Training: {metrics['steps']} steps in {metrics['train_minutes']:.0f} min on "
            f"{metrics['train_examples']} questions; held-out top-k KL (answer) "
            f"{metrics['held_out_start']['kl_answer']:.4f} -> {metrics['held_out_end']['kl_answer']:.4f}, "
            f"(continuation) {metrics['held_out_start']['kl_cont']:.4f} -> {metrics['held_out_end']['kl_cont']:.4f}"
        )
        if metrics.get("scorer_r2") is not None:
            train += f"; scorer fit R^2 {metrics['scorer_r2']:.2f} (log KVzip score, training passages)"
        parts.append(train + ".")
        if data.get("index_cost"):
            cost = [
                [name, f"{1000 * c['seconds']:.0f} ms", f"{c['x_plain']:.2f}x"]
                for name, c in data["index_cost"].items()
            ]
            parts.append(table(["indexing (same passages, medians)", "time", "vs plain forward"], cost))
    return "\n\n".join(parts + [source_line(paths)])
