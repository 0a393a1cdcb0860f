r"""The CUDA paths, checked on a machine with a GPU (CI has none).

Run from the repository root on a machine with CUDA::

    python benchmarks/cuda_check.py            # checks, then a short timing table
    python benchmarks/cuda_check.py --no-timing

**Checks** (each prints a line; any failure makes the exit status 1):

1. every family of the registry, plain and conditional, at its default
   options: a copy moved to CUDA gives the CPU copy's forward, inverse and
   log-determinant in float64 (to 1e-8), every output lies on the GPU, and
   gradients of ``log_prob`` reach every parameter there;
2. the one-pass inversion of the MADE (MAF sampling, IAF scoring of outside
   data) agrees with the naive loop on CUDA in float32 (to 1e-5);
3. ``fit(two_moons, device="cuda")`` trains (validation log-likelihood
   rises), ``log_prob`` and ``sample`` run on the GPU, and the saved model
   loads on the CPU with the same densities.

**Timing:** median milliseconds to sample 1024 points from a 5-layer MAF
(ours and zuko's) at D = 16, hidden (64, 64), and D = 64, hidden (256, 256),
on the GPU after warm-up, with ``torch.cuda.synchronize``. It is a report,
not a target: the issue's sampling targets are for the CPU (``speed.py``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from typing import Callable, List

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

from pyro_nflows import datasets  # noqa: E402
from pyro_nflows.density import fit, load  # noqa: E402
from pyro_nflows.nn import MADE  # noqa: E402
from pyro_nflows.registry import FLOWS  # noqa: E402
from pyro_nflows.transforms.autoregressive import maf  # noqa: E402
from pyro_nflows.transforms.maps import AffineMap  # noqa: E402

INPUT_DIM, CONTEXT_DIM, BATCH = 5, 3, 7
CUDA = torch.device("cuda")


def _condition(transform, context):
    return transform.condition(context) if context is not None else transform


def check_family(name: str, conditional: bool) -> None:
    entry = FLOWS[name]
    torch.manual_seed(0)
    if conditional:
        cpu = entry.build_conditional(INPUT_DIM, CONTEXT_DIM, hidden_dims=(16, 16)).double()
        context = torch.randn(BATCH, CONTEXT_DIM, dtype=torch.float64)
    else:
        cpu = entry.build(INPUT_DIM)
        cpu = cpu.double() if isinstance(cpu, torch.nn.Module) else cpu
        context = None
    x = torch.randn(BATCH, INPUT_DIM, dtype=torch.float64)
    with torch.no_grad():  # one pass for data-dependent initialisations (actnorm)
        _condition(cpu, context)(x)
        if isinstance(cpu, torch.nn.Module):  # move every parameter off its initialisation
            for parameter in cpu.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    gpu = copy.deepcopy(cpu).to(CUDA) if isinstance(cpu, torch.nn.Module) else cpu
    c_gpu = None if context is None else context.to(CUDA)
    t_cpu, t_gpu = _condition(cpu, context), _condition(gpu, c_gpu)
    x_gpu = x.to(CUDA)
    with torch.no_grad():
        y_cpu, y_gpu = t_cpu(x), t_gpu(x_gpu)
        pairs = {
            "forward": (y_cpu, y_gpu),
            "inverse": (t_cpu.inv(x), t_gpu.inv(x_gpu)),
            "log-det": (t_cpu.log_abs_det_jacobian(x, y_cpu), t_gpu.log_abs_det_jacobian(x_gpu, y_gpu)),
        }
    for what, (a, b) in pairs.items():
        assert b.device.type == "cuda", f"{what} came back on {b.device}"
        error = (a - b.cpu()).abs().max().item()
        assert error <= 1e-8, f"{what}: CPU and CUDA differ by {error:.2e}"
    if isinstance(gpu, torch.nn.Module) and any(True for _ in gpu.parameters()):
        base = dist.Normal(torch.zeros(INPUT_DIM, dtype=torch.float64, device=CUDA), 1.0).to_event(1)
        flow = dist.TransformedDistribution(base, [_condition(gpu, c_gpu)])
        flow.log_prob(x_gpu).sum().backward()
        missing = [n for n, p in gpu.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"no gradient reaches {missing}"


def check_one_pass_inversion() -> None:
    torch.manual_seed(0)
    for shift_on in ("x", "z"):
        made = MADE(16, [64, 64], 2, ordering="reversed").to(CUDA)
        elementwise = AffineMap(shift_on=shift_on)
        w = torch.randn(1024, 16, device=CUDA)

        def step(w_i, theta_i):
            return elementwise.forward(w_i, theta_i)[0]

        with torch.no_grad():
            reference = made.invert_reference(w, step)
            fast = made.invert(w, step)
            in_place = made.invert(w, step, None, elementwise.forward_into)
        for label, value in (("one pass", fast), ("in place", in_place)):
            error = (value - reference).abs().max().item()
            assert error <= 1e-5, f"AffineMap(shift_on={shift_on!r}) {label}: {error:.2e} from the naive loop"


def check_fit() -> None:
    data = datasets.load_dataset("two_moons", 4000, seed=0)
    model = fit(data, flow="maf", epochs=5, device="cuda", seed=0, progress=False)
    history = model.history.validation
    assert history[-1] > history[0], f"validation log-likelihood did not rise: {history}"
    x = data[:100].to(CUDA)
    log_prob = model.log_prob(x)
    samples = model.sample(100)
    assert log_prob.device.type == "cuda" and samples.device.type == "cuda", (log_prob.device, samples.device)
    assert torch.isfinite(log_prob).all() and torch.isfinite(samples).all()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.pt")
        model.save(path)
        restored = load(path)
    error = (restored.log_prob(x.cpu()) - log_prob.detach().cpu()).abs().max().item()
    assert error <= 1e-4, f"the model loaded on the CPU differs by {error:.2e}"


def checks() -> List[tuple[str, Callable[[], None]]]:
    cases = []
    for name, entry in FLOWS.items():
        cases.append((name, lambda name=name: check_family(name, False)))
        if entry.build_conditional is not None:
            cases.append((f"conditional {name}", lambda name=name: check_family(name, True)))
    cases.append(("one-pass inversion (float32)", check_one_pass_inversion))
    cases.append(("fit on cuda, load on cpu", check_fit))
    return cases


def _median_ms(function: Callable[[], object], repeats: int = 21) -> float:
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def timing() -> None:
    print("\nsampling 1024 points from 5 MAF layers on the GPU (median ms; ratio = zuko / ours)")
    for dim, width in ((16, 64), (64, 256)):
        torch.manual_seed(0)
        layers = [maf(dim, [width, width], ordering="natural" if i % 2 == 0 else "reversed") for i in range(5)]
        ours = dist.TransformedDistribution(
            dist.Normal(torch.zeros(dim, device=CUDA), 1.0).to_event(1), [layer.to(CUDA) for layer in layers]
        )
        with torch.no_grad():
            ours_ms = _median_ms(lambda: ours.sample((1024,)))
        line = f"  D={dim} hidden ({width}, {width}): ours {ours_ms:.2f} ms"
        try:
            import zuko

            theirs = zuko.flows.MAF(dim, transforms=5, hidden_features=(width, width)).to(CUDA)
            with torch.no_grad():
                zuko_ms = _median_ms(lambda: theirs().sample((1024,)))
            line += f", zuko {zuko_ms:.2f} ms, ratio {zuko_ms / ours_ms:.1f}x"
        except ImportError:
            line += ", zuko not installed"
        print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-timing", action="store_true", help="checks only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a machine with a GPU)")
        return 1
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    failed = 0
    for label, check in checks():
        try:
            check()
            print(f"  ok    {label}", flush=True)
        except Exception:
            failed += 1
            print(f"  FAIL  {label}\n" + "".join("        " + line for line in traceback.format_exc().splitlines(True)))
    print(f"{len(checks()) - failed} of {len(checks())} checks pass")
    if not args.no_timing:
        timing()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
