"""The epoch loop every trainer shares (pyro_nflows.training), on its own.

fit and train_vae are tested through it in test_density.py and test_vae.py;
here the loop's rules are pinned directly: which epochs run, when it stops
and why, which weights it restores, what it does with Ctrl-C and a
diverging loss, and how its state goes through a checkpoint.
"""

import math

import pytest
import torch
from torch import nn

from pyro_nflows.distributed import Ranks
from pyro_nflows.saving import checksum, save_atomically
from pyro_nflows.training import (
    Checkpoint,
    EpochLoop,
    History,
    TrainingState,
    check_loss,
    gradient_step,
)


def _run(loop, scores, action=None):
    """Run ``loop`` with the given validation scores; the model's weight is set
    to the epoch's index, so the restored weight says which epoch was kept."""
    with loop:
        for epoch in loop:
            with torch.no_grad():
                loop.model.weight.fill_(float(epoch))
            if action is not None:
                action(epoch)
            loop.record(epoch, -float(epoch), scores[epoch])
    return loop.history


def _loop(epochs=10, patience=2, **options):
    return EpochLoop(nn.Linear(1, 1, bias=False), epochs, patience, metric="score", name="trainer",
                     progress=False, **options)


def test_it_stops_after_patience_epochs_without_improvement_and_restores_the_best():
    loop = _loop(patience=2)
    history = _run(loop, [1.0, 3.0, 2.0, 2.5, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    assert history.stopped == "early stop: no better score for 2 epochs"
    assert history.validation == [1.0, 3.0, 2.0, 2.5] and history.train == [0.0, -1.0, -2.0, -3.0]
    assert history.best_epoch == 1 and loop.model.weight.item() == 1.0
    assert not loop.model.training


def test_it_runs_every_epoch_when_the_score_keeps_improving():
    history = _run(_loop(epochs=4), [1.0, 2.0, 3.0, 4.0])
    assert history.stopped == "ran all 4 epochs" and history.best_epoch == 3


def test_epochs_that_are_not_patient_do_not_count():
    loop = _loop(epochs=8, patience=2)
    with loop:
        for epoch in loop:
            loop.record(epoch, 0.0, [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0][epoch], patient=epoch >= 3)
    assert len(loop.history.validation) == 5  # epochs 3 and 4 count; 1 and 2 did not
    assert loop.history.stopped.startswith("early stop")


def test_a_diverging_loss_stops_with_a_warning_and_keeps_the_best_weights():
    def diverge(epoch):
        if epoch == 2:
            check_loss(math.nan, epoch)

    loop = _loop()
    with pytest.warns(RuntimeWarning, match="trainer stopped: the training loss became nan in epoch 3"):
        history = _run(loop, [1.0, 2.0, 9.0, 9.0], diverge)
    assert history.stopped == "diverged: the training loss became nan in epoch 3"
    assert loop.model.weight.item() == 1.0 and history.validation == [1.0, 2.0]


def test_ctrl_c_stops_with_a_warning_and_the_hint_and_keeps_the_best_weights():
    def interrupt(epoch):
        if epoch == 3:
            raise KeyboardInterrupt

    loop = _loop(patience=5, interrupt_hint="; run it again")
    with pytest.warns(RuntimeWarning, match="trainer interrupted: restoring the best weights so far; run it again"):
        history = _run(loop, [2.0, 1.0, 1.5, 0.0], interrupt)
    assert history.stopped == "interrupted" and loop.model.weight.item() == 0.0


def test_under_several_processes_ctrl_c_propagates():
    def interrupt(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(_loop(ranks=Ranks(world_size=2, rank=1)), [1.0], interrupt)


def test_other_errors_propagate_and_leave_the_weights_alone():
    def fail(epoch):
        if epoch == 1:
            raise ValueError("bad batch")

    loop = _loop()
    with pytest.raises(ValueError, match="bad batch"):
        _run(loop, [1.0, 2.0], fail)
    assert loop.model.weight.item() == 1.0  # the weights of the failing epoch: nothing restored


def test_a_resumed_loop_carries_on_where_the_state_left_it():
    first = _loop(epochs=6, patience=3)
    with first:
        for epoch in first:
            first.record(epoch, 0.0, [1.0, 3.0, 2.0][epoch])
            if epoch == 2:
                break
    second = _loop(epochs=6, patience=3)
    second.load_state_dict(first.state_dict())
    assert list(second) == [3, 4, 5]
    assert second.history == first.history and second.best_value == 3.0 and second.waited == 1
    finished = _loop(epochs=6)
    finished.load_state_dict({**first.state_dict(), "history": '{"train": [], "validation": [], "stopped": "done"}'})
    assert list(finished) == []  # a finished run does not train again


def test_gradient_step_clips_only_when_asked():
    for clip_norm, expected in [(None, 100.0), (1.0, 1.0)]:
        model = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        gradient_step(-100 * model.weight.sum(), optimizer, model.parameters(), clip_norm)
        assert model.weight.item() == pytest.approx(expected)


def test_a_checkpoint_round_trips_the_training_state_and_refuses_other_settings(tmp_path):
    def state(seed):
        torch.manual_seed(seed)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
        loop = EpochLoop(model, 5, 2, metric="score", name="trainer", progress=False)
        return TrainingState(model, optimizer, scheduler, torch.Generator().manual_seed(seed), loop)

    trained = state(0)
    trained.model(torch.randn(4, 3)).sum().backward()
    trained.optimizer.step()
    trained.scheduler.step()
    trained.loop.record(0, -1.0, 2.0)
    path = tmp_path / "run.ckpt"
    Checkpoint(path, "settings", "data", Ranks(), torch.device("cpu")).save(trained)
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary file left behind

    restored = state(1)
    assert Checkpoint(path, "settings", "data", Ranks(), torch.device("cpu")).resume(restored)
    for key, value in trained.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value)
    assert restored.optimizer.state_dict()["state"][0]["step"] == 1
    assert restored.scheduler.last_epoch == 1
    assert torch.equal(restored.generator.get_state(), trained.generator.get_state())
    assert restored.loop.history == History([-1.0], [2.0], 0, "")
    assert not Checkpoint(tmp_path / "absent.ckpt", "settings", "data", Ranks(), torch.device("cpu")).resume(state(2))
    for settings, data, differ in [("other", "data", "settings"), ("settings", "other", "data")]:
        with pytest.raises(ValueError, match=rf"written for other data or settings \(its {differ} differ\)"):
            Checkpoint(path, settings, data, Ranks(), torch.device("cpu")).resume(state(3))


def _state(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    loop = EpochLoop(model, 5, 2, metric="score", name="trainer", progress=False)
    return TrainingState(model, optimizer, scheduler, torch.Generator().manual_seed(seed), loop)


def _checkpoint(path):
    return Checkpoint(path, "settings", "data", Ranks(), torch.device("cpu"))


def test_a_checkpoint_carries_a_checksum_and_a_flipped_bit_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    trained = _state()
    _checkpoint(path).save(trained)
    saved = torch.load(path, weights_only=True)
    assert saved["checksum"] == checksum(saved)
    content = bytearray(path.read_bytes())
    where = content.find(trained.model.weight.detach().numpy().tobytes())
    assert where > 0
    content[where + 5] ^= 0x04  # one bit of one weight
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match="run.ckpt is damaged: its contents do not match the checksum"):
        _checkpoint(path).resume(_state(1))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "run.ckpt is not a readable checkpoint file: it is empty"),
        (bytes(range(256)) * 8, r"run.ckpt is not a readable checkpoint file \(torch.load failed"),
        (None, "run.ckpt is not a readable checkpoint file"),  # truncated: the first half of a real one
    ],
)
def test_unreadable_checkpoints_are_a_value_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "run.ckpt"
    if content is None:
        _checkpoint(path).save(_state())
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        _checkpoint(path).resume(_state())
    assert "weights_only" not in str(info.value)


def test_checkpoints_without_a_checksum_or_with_non_finite_weights_are_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    payload = {"settings": "settings", "data": "data", **_state().state_dict()}
    torch.save(payload, path)  # an older version's checkpoint
    with pytest.raises(ValueError, match="run.ckpt is not a checkpoint file of this version: it carries no checksum"):
        _checkpoint(path).resume(_state())
    payload["best_model"] = {key: torch.full_like(value, math.nan) for key, value in payload["best_model"].items()}
    torch.save({**payload, "checksum": checksum(payload)}, path)
    with pytest.raises(ValueError, match="run.ckpt: the weights 'weight' hold NaN or infinite values"):
        _checkpoint(path).resume(_state())
    model = {"format": 6, "kind": "density", "config": "{}", "state_dict": {}}
    torch.save({**model, "checksum": checksum(model)}, path)
    with pytest.raises(ValueError, match="is not a checkpoint written by this package's trainers"):
        _checkpoint(path).resume(_state())


def test_save_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pt"
    save_atomically({"version": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_atomically({"version": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_atomically_does_not_follow_a_link_at_a_predictable_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "run.ckpt.tmp").symlink_to(victim)
    save_atomically({"version": 1}, tmp_path / "run.ckpt")
    assert victim.read_text() == "keep me"
    assert torch.load(tmp_path / "run.ckpt", weights_only=True) == {"version": 1}
