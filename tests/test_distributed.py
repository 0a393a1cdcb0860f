"""``fit`` under ``torchrun``: two CPU processes (gloo) give the single-process result.

The test writes a small script, launches it with
``python -m torch.distributed.run --standalone --nproc_per_node=2`` (torchrun
picks a free port on the loopback itself) and compares what the processes
saved with ``fit`` run here, in one process, with the same seed and the same
global batch.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyro_nflows.density import DensityModel, fit, load

REPOSITORY = Path(__file__).resolve().parents[1]

# 101 rows: 10 held out, 91 to train on in batches of 9 -> ten batches split 5 + 4 between the two
# processes, and a last batch of one row, which leaves the second process nothing of its own
# (with batchnorm, which needs 2 rows on each process, that row joins the batch before).
SETTINGS = dict(num_layers=2, hidden_dims=[16, 16], epochs=4, batch_size=9, lr=1e-2, patience=100, seed=0)

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from pyro_nflows.density import DensityModel, fit

    folder = Path(sys.argv[1])
    settings = json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    data = torch.load(folder / "data.pt")
    report = {"world_size": int(os.environ["WORLD_SIZE"])}

    fresh = fit(data, progress=False, **settings)  # initialises the process group (gloo)
    report["backend"] = dist.get_backend()
    fresh.save(folder / f"fresh{rank}.pt")
    report["fresh_history"] = [fresh.history.validation, fresh.history.best_epoch, fresh.history.stopped]

    resumed = fit(data, checkpoint=folder / "run.ckpt", progress=True, **settings)  # prints "resuming" on rank 0
    resumed.save(folder / f"resumed{rank}.pt")
    report["resumed_history"] = resumed.history.validation

    batchnorm = fit(data, progress=False, **{**settings, "normalization": "batchnorm", "epochs": 2})
    batchnorm.save(folder / f"batchnorm{rank}.pt")

    unseeded = fit(data, progress=False, **{**settings, "seed": None, "epochs": 1})  # rank 0's seed is shared
    unseeded.save(folder / f"unseeded{rank}.pt")
    report["unseeded_seed"] = torch.initial_seed()  # the seed fit drew its split and shuffling from

    # A loss that turns NaN on one process only stops every process (instead of leaving one waiting).
    original, calls = DensityModel.log_prob, [0]

    def nan_on_rank_one(self, x):
        calls[0] += self.training
        result = original(self, x)
        return result * float("nan") if rank == 1 and self.training and calls[0] > 15 else result

    DensityModel.log_prob = nan_on_rank_one
    report["diverged"] = fit(data, progress=False, **settings).history.stopped
    DensityModel.log_prob = original

    for name, call in [
        ("small_batch", lambda: fit(data, progress=False, **{**settings, "batch_size": 1})),
        ("other_data", lambda: fit(data + rank, progress=False, **settings)),
    ]:
        try:
            call()
        except ValueError as error:
            report[name] = str(error)

    # The returned model is the plain one: a backward pass on one process alone must not wait for the other.
    if rank == 0:
        fresh.log_prob(data).mean().backward()
    (folder / f"report{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _data(n=101, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.tensor([[2.0, 0.0], [1.5, 0.5]])
    return torch.randn(n, 2, generator=generator) @ mixing.T + torch.tensor([10.0, -3.0])


def _interrupt_in_epoch_three(monkeypatch):
    calls = {"count": 0}
    original = DensityModel.log_prob

    def interrupting(self, x):  # 1 initialisation call, then 11 batches and 1 validation pass per epoch
        calls["count"] += 1
        if self.training and calls["count"] > 1 + 2 * 12 + 3:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(DensityModel, "log_prob", interrupting)


def _launch(folder: Path) -> subprocess.CompletedProcess:
    script = folder / "train.py"
    script.write_text(SCRIPT)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    if "GLOO_SOCKET_IFNAME" not in env and "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the loopback, whatever the host name resolves to
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        str(script), str(folder), json.dumps(SETTINGS),
    ]
    result = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    data = _data()
    torch.save(data, tmp_path / "data.pt")
    reference = fit(data, progress=False, **SETTINGS)

    # A single-process run interrupted in epoch 3 leaves a checkpoint for the two processes to resume.
    _interrupt_in_epoch_three(monkeypatch)
    with pytest.warns(RuntimeWarning, match="resume with fit"):
        interrupted = fit(data, checkpoint=tmp_path / "run.ckpt", progress=False, **SETTINGS)
    monkeypatch.undo()
    assert len(interrupted.history.validation) == 2

    result = _launch(tmp_path)

    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["world_size"] == 2 and reports[0]["backend"] == "gloo"
    points = _data(n=50, seed=1)
    expected = reference.log_prob(points)
    for rank, report in enumerate(reports):
        fresh, resumed = load(tmp_path / f"fresh{rank}.pt"), load(tmp_path / f"resumed{rank}.pt")
        # Same global batch, same seed: the same model, up to the order of float32 sums.
        assert torch.allclose(fresh.log_prob(points), expected, atol=1e-5, rtol=0)
        assert report["fresh_history"][0] == pytest.approx(reference.history.validation, abs=1e-5)
        assert report["fresh_history"][1:] == [reference.history.best_epoch, reference.history.stopped]
        # Resuming a single-process checkpoint with two processes finishes the same run.
        assert torch.allclose(resumed.log_prob(points), expected, atol=1e-5, rtol=0)
        assert report["resumed_history"] == pytest.approx(reference.history.validation, abs=1e-5)
        # Every process returns the very same model, BatchNorm's running statistics included.
        for name in ("fresh", "resumed", "batchnorm", "unseeded"):
            mine, main = (load(tmp_path / f"{name}{r}.pt").state_dict() for r in (rank, 0))
            assert all(torch.equal(mine[key], main[key]) for key in main), name
        assert report["diverged"].startswith("diverged: the training loss became nan in epoch 2")
        # Mistakes are named on every process instead of hanging the job.
        assert "at least 2" in report["small_batch"] and "global batch" in report["small_batch"]
        assert "must pass the same" in report["other_data"]

    assert reports[0]["unseeded_seed"] == reports[1]["unseeded_seed"]
    # Only rank 0 printed, and it wrote the finished run's checkpoint, which one process can read back.
    assert result.stdout.count("resuming from") == 1
    assert result.stderr.count("fit stopped: the training loss became nan") == 1
    finished = fit(data, checkpoint=tmp_path / "run.ckpt", progress=False, **SETTINGS)
    assert finished.history.validation == reports[0]["resumed_history"]
    assert torch.equal(finished.log_prob(points), load(tmp_path / "resumed0.pt").log_prob(points))


def test_outside_torchrun_a_world_size_of_one_changes_nothing(monkeypatch):
    data = _data()
    plain = fit(data, progress=False, **{**SETTINGS, "epochs": 1})
    monkeypatch.setenv("WORLD_SIZE", "1")
    alone = fit(data, progress=False, **{**SETTINGS, "epochs": 1})
    assert torch.equal(plain.log_prob(data), alone.log_prob(data))
    assert not torch.distributed.is_initialized()


def test_a_world_size_without_the_rest_of_torchrun_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="lacks RANK, MASTER_ADDR, MASTER_PORT: start the script with torchrun"):
        fit(_data(), progress=False, **SETTINGS)
    # distributed=False trains in this process alone, whatever the environment says.
    assert fit(_data(), progress=False, distributed=False, **{**SETTINGS, "epochs": 1}).history.stopped


def test_every_layer_of_the_registry_uses_all_its_parameters_in_log_prob():
    """DDP runs without find_unused_parameters, which needs every parameter to get a gradient."""
    from pyro_nflows.registry import FLOWS

    names = [name for name, entry in FLOWS.items() if entry.event == "vector"]  # a DensityModel models vectors
    assert "maf" in names
    for name in names:
        for normalization in ("actnorm", "batchnorm"):
            torch.manual_seed(0)
            model = DensityModel(3, name, num_layers=2, normalization=normalization)
            model(torch.randn(16, 3)).sum().backward()  # forward is log_prob
            unused = [key for key, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, (name, normalization, unused)
