"""Training checkpoints round-trip without pickle (ragcompress.distill.checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch

from ragcompress.distill.checkpoint import load_tree, save_tree
from ragcompress.errors import InputError


def test_nested_tree_with_optimizer_state_round_trips(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    optimizer.step()
    tree = {
        "step": 5,
        "elapsed": 1.5,
        "name": "x",
        "none": None,
        "optimizer": optimizer.state_dict(),
        "examples": [{"ids": [1, 2], "lp": torch.arange(4.0)}],
        "params": {"a": param.detach()},
    }
    path = tmp_path / "checkpoint.safetensors"
    save_tree(tree, path)
    back = load_tree(path)
    assert back["step"] == 5 and back["name"] == "x" and back["none"] is None
    assert torch.equal(back["params"]["a"], param.detach())
    assert torch.equal(back["examples"][0]["lp"], torch.arange(4.0)) and back["examples"][0]["ids"] == [1, 2]
    assert list(back["optimizer"]["state"]) == [0]  # int keys stay ints
    saved = optimizer.state_dict()
    for key, value in saved["state"][0].items():  # the moments and the step, not just their names
        assert torch.equal(back["optimizer"]["state"][0][key], value), key
    # the hyperparameters as JSON keeps them (a tuple such as AdamW's betas comes back a list)
    assert back["optimizer"]["param_groups"] == json.loads(json.dumps(saved["param_groups"]))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1)
    fresh.load_state_dict(back["optimizer"])


def test_refuses_what_it_cannot_store_and_files_it_did_not_write(tmp_path):
    with pytest.raises(TypeError):
        save_tree({"x": object()}, tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"t": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="other.safetensors is not a readable ragcompress training file"):
        load_tree(tmp_path / "other.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")  # a damaged one: a CLI traceback before
    with pytest.raises(InputError, match="cut.safetensors is not a readable.*delete it"):
        load_tree(tmp_path / "cut.safetensors")


def test_a_save_deletes_the_temp_files_of_runs_killed_mid_save(tmp_path):
    """``train`` killed during a checkpoint save left ``.NAME.PID.tmp`` beside the checkpoint,
    and nothing removed it; the next save now deletes those whose process is gone."""
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "checkpoint.safetensors"
    leftover = tmp_path / f".checkpoint.safetensors.{dead.pid}.tmp"
    running = tmp_path / f".checkpoint.safetensors.{os.getppid()}.tmp"  # a live run's save in progress
    other = tmp_path / f".basis.safetensors.{dead.pid}.tmp"  # another file's: not this save's to judge
    for temp in (leftover, running, other):
        temp.write_bytes(b"half")
    save_tree({"step": 3}, path)
    assert load_tree(path) == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, running.name, other.name])


def test_a_checkpoint_follows_the_umask(tmp_path):
    """safetensors writes its file 0600 whatever the umask, so a run's checkpoint and teacher files
    were readable by no one the umask shares with (a group training in one folder), unlike the
    history and the store files beside them; saved with the mode ``open`` gives under the umask."""
    import os
    import stat

    old = os.umask(0o002)
    try:
        save_tree({"step": 1, "params": torch.zeros(2)}, tmp_path / "checkpoint.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "checkpoint.safetensors").stat().st_mode) == 0o664
