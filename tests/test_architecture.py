"""Which models ragcompress accepts is decided by what it needs of them
(:mod:`ragcompress.architecture`), not by a list of names: families outside the tested list that
have the parts and pass the shift probe load (and answer as full prefill, tests/test_runtime.py),
and the ones it would run wrongly are refused, each naming why."""

from __future__ import annotations

import pytest
import torch

from ragcompress.architecture import VERIFIED_MODEL_TYPES, head_states, shift_error
from ragcompress.errors import ModelError
from ragcompress.models import load_model


@pytest.mark.parametrize("arch", [*VERIFIED_MODEL_TYPES, "qwen3_moe", "ministral", "granite", "starcoder2", "olmo2"])
def test_the_shift_probe_passes_rope_models(arch, tiny_model_dir):
    """Rounding only, for the tested families too (they skip the probe when they load)."""
    lm = load_model(str(tiny_model_dir(arch)))
    assert shift_error(lm.model) < 1e-4


@pytest.mark.parametrize(
    ("arch", "config", "reason"),
    [
        ("phi3", {}, r"no self_attn\.q_proj \(its q, k and v come from one fused projection\)"),
        ("stablelm", {}, "partial rotary: RoPE turns 4 of a head's 16 channels"),
        ("glm", {}, "partial rotary"),
        ("cohere", {}, "its attention changes when a cache is moved"),  # interleaved RoPE
        ("helium", {}, "its attention changes when a cache is moved"),  # interleaved RoPE
        ("smollm3", {"layers": 4}, "its attention changes when a cache is moved"),  # its fourth layer has no RoPE
        ("exaone4", {"layers": 4}, "its attention changes when a cache is moved"),  # its global layer has no RoPE
    ],
)
def test_models_it_would_run_wrongly_are_refused_by_reason(arch, config, reason, tiny_model_dir):
    with pytest.raises(ModelError, match=f"model type '{arch}' cannot be used with ragcompress: {reason}"):
        load_model(str(tiny_model_dir(arch, **config)))


def test_a_smollm3_without_nope_layers_loads(tiny_model_dir):
    """Two layers are both RoPE layers (SmolLM3 drops RoPE on every fourth): the probe judges
    the model it is given, not its family."""
    assert load_model(str(tiny_model_dir("smollm3"))).config.model_type == "smollm3"


class _Attention(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module | None) -> None:
        super().__init__()
        self.q_norm = norm


def test_head_states_applies_a_norm_per_head_or_over_the_projection():
    torch.manual_seed(0)
    projected = torch.randn(1, 5, 3 * 4)  # 3 heads of 4 channels
    per_head, whole = torch.nn.RMSNorm(4), torch.nn.RMSNorm(12)
    plain = projected.view(1, 5, 3, 4).transpose(1, 2)
    torch.testing.assert_close(head_states(_Attention(None), projected, "q_norm", 3), plain)
    torch.testing.assert_close(head_states(_Attention(per_head), projected, "q_norm", 3), per_head(plain))
    expected = whole(projected).view(1, 5, 3, 4).transpose(1, 2)
    torch.testing.assert_close(head_states(_Attention(whole), projected, "q_norm", 3), expected)
    assert not torch.allclose(expected, per_head(plain))
