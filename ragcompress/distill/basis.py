"""The low-rank basis a student trained for a ``--kv-rank`` store projects its kept rows on
(:func:`student_basis`), kept in the run folder so that a resumed run projects on the same one.

The basis is fitted as ``index --rank`` fits a store's (``indexing/calibrate.py``): on the first
``calibration_passages`` training passages, encoded by the base model (the adaptor moves during
training, the basis stays, and a store fits its own on its own passages). ``student-basis.json``
beside it records what it was fitted for and on: the base model, the rank spec, how many
passages and a hash of their texts. A run for other settings fits anew (a resumed run for another
compression is refused before, ``resume.check_resumed_compression``); a basis fitted on other
passages, or one whose stamp does not say, is refused: a resumed run would otherwise project on a
basis of passages it no longer trains on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ragcompress.distill.config import TrainConfig
from ragcompress.distill.corpus import check_alone
from ragcompress.distill.distiller import Distiller
from ragcompress.errors import InputError
from ragcompress.indexing.inputs import PassageInput
from ragcompress.kv.lowrank import LowRankBasis

LEGACY_STAMP = ("base_fingerprint", "lowrank", "calibration_passages")  # a stamp's list, before passages


def passages_sha256(passages: list[PassageInput]) -> str:
    """sha256 of the texts of ``passages`` in order (what a basis fitted on them depends on)."""
    return hashlib.sha256(json.dumps([p.text for p in passages]).encode()).hexdigest()


def read_stamp(stamp: Path) -> dict[str, Any] | None:
    """What ``stamp`` records (None: no stamp; a stamp from before the passages were recorded has
    no ``passages_sha256``; an unreadable one records nothing, so matches no settings)."""
    if not stamp.is_file():
        return None
    try:
        recorded = json.loads(stamp.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if isinstance(recorded, list) and len(recorded) == len(LEGACY_STAMP):
        return dict(zip(LEGACY_STAMP, recorded, strict=True))
    return recorded if isinstance(recorded, dict) else {}


def check_basis_passages(path: Path, recorded: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse a kept basis fitted on other passages than this run's first ``calibration_passages``
    training passages, or whose stamp does not record which (``recorded``: :func:`read_stamp`)."""
    fitted_on = (recorded or {}).get("passages_sha256")
    count = now["calibration_passages"]
    if fitted_on is None:
        raise InputError(
            f"{path} has no record of the passages it was fitted on (it was written before they were recorded in "
            f"{path.with_suffix('.json').name}), so it cannot be checked against this run's first {count} training "
            f"passages; delete {path.name} (it is fitted again) or use another --out folder"
        )
    if fitted_on != now["passages_sha256"]:
        raise InputError(
            f"{path} was fitted on other passages than this run's first {count} training passages (sha256 "
            f"{fitted_on[:16]}, this run: {now['passages_sha256'][:16]}); train on the passages it was fitted on, "
            f"or delete {path.name} (it is fitted again) or use another --out folder"
        )


def student_basis(
    distiller: Distiller, passages: list[PassageInput], config: TrainConfig, path: Path
) -> LowRankBasis | None:
    """The basis the student projects its kept rows on (``config.kv_rank``; None: none), fitted on
    the first ``config.calibration_passages`` of ``passages`` by ``distiller``'s base model, or
    read back from ``path`` if it was fitted for these settings on these passages. Those passages
    are encoded alone, so each is checked against the model's positions first (``check_alone``)."""
    from ragcompress.indexing.calibrate import fit_calibration_basis
    from ragcompress.store.basis import basis_from_bytes, basis_to_bytes

    spec = config.rank_spec()
    if spec is None:
        return None
    calibration, prefix = passages[: config.calibration_passages], distiller.encoder.prefix_len
    check_alone(
        distiller.lm,
        ((p, prefix + len(distiller.tokens.passage(p.text))) for p in calibration),
        f"to be encoded for the --kv-rank student's basis (the prefix and the passage: the first "
        f"{config.calibration_passages} training passages, --calibration-passages)",
    )
    fitted_for = {
        "base_fingerprint": distiller.lm.fingerprint,
        "lowrank": spec.as_dict(),
        "calibration_passages": config.calibration_passages,
    }
    now = {**fitted_for, "passages_sha256": passages_sha256(calibration)}
    stamp = path.with_suffix(".json")
    if path.is_file():
        recorded = read_stamp(stamp)  # None: a run from before the stamp was written, for these settings
        if recorded is None or {name: recorded.get(name) for name in fitted_for} == fitted_for:
            check_basis_passages(path, recorded, now)
            return basis_from_bytes(path.read_bytes())
    basis = fit_calibration_basis(distiller.encoder, passages, spec, config.calibration_passages)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(basis_to_bytes(basis))
    tmp.replace(path)
    stamp.write_text(json.dumps(now, sort_keys=True))
    return basis
