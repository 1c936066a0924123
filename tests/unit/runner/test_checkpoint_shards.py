"""Sharded (DCP) checkpoints in one process: layout, round trip, offline assembly, the crash and
shared-folder guards, and the resume guard. The two-rank FSDP run is in test_distributed.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from runner.checkpoint import find_latest, load_checkpoint, save_checkpoint, start_sharded_save
from runner.checkpoint_shards import checkpoint_weights, load_shards, save_sharded_checkpoint
from runner.distributed import Dist, Launch
from runner.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group


def _dist(rank: int = 0, world_size: int = 1, strategy: str = "fsdp") -> Dist:
    return Dist(Launch(rank, world_size, rank), None, torch.device("cpu"), strategy)


def _small(step: int) -> dict:
    return dict(scheduler_state={"last_epoch": step}, data_cursor={"samples": step},
                recipe_text="training: {mode: full}\n", loss_weight_state=None, keep_last=2,
                rng_states=[{"rank": 0}])


def _states(seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return dict(model.named_parameters()), {"state": {n: optimizer.state[p] for n, p in
                                                      model.named_parameters()}}


def _save(tmp_path, step: int, seed: int):
    model, optim = _states(seed)
    path = save_sharded_checkpoint(tmp_path, step, dist=_dist(), model_state=model, optimizer_state=optim,
                                   **_small(step))
    return path, model, optim


def test_layout_round_trip_and_offline_assembly(tmp_path):
    path, model, optim = _save(tmp_path, 3, seed=0)
    assert path == tmp_path / "checkpoints/step_000003" and find_latest(tmp_path) == path
    names = {p.name for p in path.iterdir()}
    assert {"sharded", "meta.json", "training_state.pt", "data_cursor.json"} <= names
    assert not names & {"trainable.safetensors", "optimizer.pt"}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == 2 and meta["sharded"]["world_size"] == 1
    assert meta["sharded"]["files"] == [".metadata", "__0_0.distcp"]
    ck = load_checkpoint(path, restore_rng=False)
    assert (ck.step, ck.sharded["world_size"], ck.trainable, ck.optimizer) == (3, 1, {}, {})

    weights = checkpoint_weights(path)  # the offline export path: full tensors, no process group
    assert weights.keys() == model.keys()
    for name in model:
        assert torch.equal(weights[name], model[name].detach()), name

    other_model, other_optim = _states(seed=1)  # load_shards writes in place
    load_shards(path, other_model, other_optim)
    for name in model:
        assert torch.equal(other_model[name], model[name])
        assert torch.equal(other_optim["state"][name]["exp_avg"], optim["state"][name]["exp_avg"])
    with pytest.raises(UserError, match=r"does not fit this recipe's model \(missing \['extra'\]"):
        load_shards(path, {**other_model, "extra": torch.zeros(1)}, other_optim)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    good, _, _ = _save(tmp_path, 1, seed=0)
    start_sharded_save(tmp_path, 2, keep_last=None)  # a save that dies after the shards were written
    partial = tmp_path / "checkpoints/.tmp-step_000002"
    (partial / "sharded").mkdir()
    (partial / "sharded/__0_0.distcp").write_bytes(b"partial")
    assert find_latest(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".tmp-step_000002", "latest",
                                                                            "step_000001"]

    def dying_write(path, text):
        raise KeyboardInterrupt("killed while rank 0 wrote the small files")

    monkeypatch.setattr("runner.checkpoint._write_text", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, seed=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert find_latest(tmp_path) == good
    assert _save(tmp_path, 2, seed=1)[0] == find_latest(tmp_path)


def test_shards_rank_0_cannot_see_are_refused(tmp_path, monkeypatch):
    """What a multi-node run with output.dir on each node's local disk looks like to rank 0."""
    real_save = dcp.save

    def save_elsewhere(state, *, storage_writer):
        real_save(state, storage_writer=storage_writer)
        (tmp_path / "checkpoints/.tmp-step_000001/sharded/__0_0.distcp").unlink()

    monkeypatch.setattr(dcp, "save", save_elsewhere)
    with pytest.raises(UserError, match="output.dir must be one folder all ranks share"):
        _save(tmp_path, 1, seed=0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []


def test_a_sharded_checkpoint_resumes_only_under_fsdp_at_its_world_size(tmp_path):
    sharded = {"strategy": "fsdp", "world_size": 2, "files": []}
    _dist(0, 2, "fsdp").check_sharding(sharded, "ck")
    _dist(0, 2, "ddp").check_sharding(None, "ck")  # unsharded checkpoints: check_world_size decides
    fix = r"torchrun --nproc_per_node 2 -m runner RECIPE.*runner export --checkpoint ck --to original"
    for dist, now in ((_dist(), "one process"), (_dist(0, 2, "ddp"), "2 processes with strategy ddp"),
                      (_dist(0, 4, "fsdp"), "4 processes with strategy fsdp")):
        with pytest.raises(UserError, match=f"over 2 processes but this run is {now}; .*{fix}"):
            dist.check_sharding(sharded, "ck")


def test_unsharded_checkpoints_still_export(tmp_path):
    path = save_checkpoint(tmp_path, 1, trainable={"w": torch.ones(2)}, optimizer_state={},
                           scheduler_state={}, data_cursor={}, recipe_text="")
    assert torch.equal(checkpoint_weights(path)["w"], torch.ones(2))
