"""Score the benchmark's passages with NVIDIA kvpress's own presses, for a side-by-side table.

kvpress 0.5.5 pins ``transformers<5.3`` and ragcompress needs 5.24, so this script runs in a
*separate* virtualenv and imports nothing from ragcompress:

    python3 -m venv /tmp/venv-kvpress
    /tmp/venv-kvpress/bin/pip install torch==2.13.0 kvpress==0.5.5
    /tmp/venv-kvpress/bin/python benchmarks/kvpress_scores.py runs/cq-qwen/qwen2.5-coder-0.5b

It reads ``passages-tokens.json`` (written by ``compression_quality.py``: the model directory,
the prefix ids and every needed passage's ids), runs each passage through the model after the
prefix *with the press active*, exactly as kvpress compresses a context during prefill, and
records the press's per-token scores instead of letting it prune: for the ``ScorerPress``
subclasses the ``score()`` each attention layer computes, for ``KVzipPress`` the
reconstruction scores it aggregates before eviction. The passage part of the scores is saved as
``scores-kvpress-<name>.safetensors`` (``<passage id>/scores``: ``[layers, kv_heads, n]``, keyed
by the model folder, the prefix and each passage's tokens as ``common.load_keyed`` reads them), which
``compression_quality.py --methods kvpress-<name> ...`` then turns into real stores with the
same selection, budgets, protected tokens and answering as our own methods. The comparison is
therefore between scoring functions, at equal ratios, on the same passages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
from kvpress import ExpectedAttentionPress, KnormPress, KVzipPress, SnapKVPress
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = {
    "knorm": lambda: KnormPress(compression_ratio=0.5),
    # window 32, as ragcompress's snapkv (kvpress's default 64 would cover a third of a passage)
    "snapkv": lambda: SnapKVPress(compression_ratio=0.5, window_size=32),
    "expected-attention": lambda: ExpectedAttentionPress(compression_ratio=0.5),
    "kvzip": lambda: KVzipPress(compression_ratio=0.5),
    # KVzip+: attention divided by the query's hidden-state norm, times the value's output norm
    "kvzip-plus": lambda: KVzipPress(compression_ratio=0.5, kvzip_plus_normalization=True),
}


def digest(token_ids: list[int]) -> str:
    """common.tokens_digest, restated: a passage's (or the prefix's) token ids, hashed."""
    return hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()[:16]


def capture_scorer(press, n_layers: int) -> list:
    """Wrap ``press.score`` so each layer's scores are kept (the press still prunes its own cache,
    which this script throws away)."""
    captured = [None] * n_layers
    inner = press.score

    def score(module, hidden_states, keys, values, attentions, kwargs):
        scores = inner(module, hidden_states, keys, values, attentions, kwargs)
        captured[module.layer_idx] = scores[0].float().clone()
        return scores

    press.score = score
    return captured


def capture_kvzip(press) -> dict:
    """Keep KVzip's aggregated ``score_val [layers, 1, kv_heads, context]`` before it evicts."""
    captured = {}
    inner = press.compress_post

    def compress_post(model):
        captured["scores"] = press.score_val[:, 0].float().clone()
        return inner(model)

    press.compress_post = compress_post
    return captured


@torch.inference_mode()
def score_passages(model, name: str, prefix: list[int], passages: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    n_layers = model.config.num_hidden_layers
    out = {}
    for pid, ids in passages.items():
        press = PRESSES[name]()
        kvzip = isinstance(press, KVzipPress)
        captured = capture_kvzip(press) if kvzip else capture_scorer(press, n_layers)
        with press(model):
            model.model(input_ids=torch.tensor([prefix + ids]), past_key_values=DynamicCache(), use_cache=True)
        scores = captured["scores"] if isinstance(captured, dict) else torch.stack(captured)
        out[pid] = scores[..., len(prefix) : len(prefix) + len(ids)].contiguous()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="compression_quality.py's per-model workdir")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=list(PRESSES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = json.loads((args.workdir / "passages-tokens.json").read_text())
    # sdpa: KVzipPress refuses eager attention; the scores do not depend on the kernel
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    for name in args.presses:
        t0 = time.perf_counter()
        scores = score_passages(model, name, spec["prefix_ids"], spec["passages"])
        path = args.workdir / f"scores-kvpress-{name}.safetensors"
        # the layout and key of common.save_keyed / compression_quality.scores_key (not importable
        # here: common imports ragcompress, which this virtualenv does not have)
        key = {"scorer": f"kvpress-{name}", "model_dir": spec["model_dir"], "prefix": digest(spec["prefix_ids"])}
        tokens = {pid: digest(ids) for pid, ids in sorted(spec["passages"].items())}
        save_file(
            {f"{pid}/scores": s.contiguous() for pid, s in scores.items()},
            str(path),
            metadata={"key": json.dumps(key, sort_keys=True), "tokens": json.dumps(tokens)},
        )
        print(f"kvpress {name}: {len(scores)} passages in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)


if __name__ == "__main__":
    main()
