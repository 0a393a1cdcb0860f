r"""Quality of the flow autoguides against Pyro's guides, over several models
and a grid of ordinary training settings.

Run from the repository root::

    python benchmarks/svi_grid.py --jobs 2                 # the grid: 5 models x 12 guides x 4 settings x 3 seeds
    python benchmarks/svi_grid.py --quick                  # smoke run: 2 models, 3 guides, 1 short setting (~1 minute)
    python benchmarks/svi_grid.py --models banana funnel --guides AutoIAF AutoIAFNormal --seeds 1 2 3
    python benchmarks/svi_grid.py --out grid.jsonl         # keep each run's result; a rerun skips the runs it holds
    python benchmarks/svi_grid.py --median                 # Pyro's test_median with our Monte Carlo medians
    python benchmarks/svi_grid.py --list                   # the models, guides and settings

**Models** (:mod:`pyro_nflows.models`): Neal's funnel (10-D) and the NeuTra
banana (2-D), whose log-normalisers are 0, so that :math:`\mathrm{ELBO} =
-\mathrm{KL}(q \| p)` (0 is a perfect posterior); centered eight schools,
against the NUTS moments stored in ``tests/data/eight_schools_nuts.json``; a
logistic regression with a correlated posterior and a centered hierarchical
regression (scored by the ELBO alone until NUTS references for them are
stored in ``REFERENCES``).

This is the grid of issue 19, the successor of ``benchmarks/svi.py`` (whose
funnel and eight-schools table benchmarks/README.md#svi reports); its
results are not reported yet.

**Guides**, each with its defaults (``--guides``; ``--list`` names them):
Pyro's ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal`` and
``AutoNormalizingFlow`` with Pyro's planar, Sylvester and spline flows, and
ours, each against its counterpart (``Guide.rival``): ``AutoIAF`` against
``AutoIAFNormal``; ``AutoHouseholder`` and ``AutoConvexTriangular``
(full-covariance Gaussians) against ``AutoMultivariateNormal``;
``AutoPlanar``, ``AutoSylvester`` and ``AutoFlow("spline_autoregressive:2")``
against ``AutoNormalizingFlow`` with the same flow of Pyro's; and
``AutoPlanar(scale after)`` and ``AutoSylvester(scale after)``, the two with
``scale_position="after"`` (benchmarks/README.md#guide-scale-position). Pyro's
Sylvester log-determinant is not exact once its parameters move
(benchmarks/README.md#pyro-sylvester-log-det), so that row's ELBO is its
own estimate, not a KL.

**Settings** (``--settings``): ``adam-0.01-2000-p1`` is Pyro's
``examples/neutra.py`` (Adam at 1e-2, 2000 steps, one particle); the others
vary the optimiser (Adam; Pyro's ``ClippedAdam``, clip norm 10, its learning
rate decaying geometrically to a tenth), the learning rate (1e-3 to 1e-2),
the steps (1000 to 10,000) and the vectorised particles (1 to 16).

**Scores**, from ``--eval-samples`` (10,000) draws of the trained guide: the
ELBO (with its standard error); the KL where the truth is known; where a
NUTS reference exists, ``mean err``, the largest ``|mean - ref mean| / ref
sd`` over the latent coordinates (in the model's constrained space), and
``sd err``, the largest ``|log(sd / ref sd)|``. The verdict lines check every
one of our guides against its rival and against ``AutoNormal`` (mean ELBO
over the seeds, within twice the standard error of the difference of the
seed means) and ``AutoIAF`` against ``AutoIAFNormal`` on the banana and the
funnel. The table is a report: the exit status is 0 unless a run raises.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

# Benchmark the checkout this file lives in, installed or not.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "pyro_nflows")) and _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pyro  # noqa: E402
import pyro.distributions.transforms as pyro_transforms  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import (  # noqa: E402
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.importance import vectorized_importance_weights  # noqa: E402

from benchmarks.common import library_versions  # noqa: E402
from benchmarks.eight_schools_reference import OUTPUT as SCHOOLS_REFERENCE  # noqa: E402
from pyro_nflows import models  # noqa: E402
from pyro_nflows.autoguides import (  # noqa: E402
    AutoConvexTriangular,
    AutoFlow,
    AutoHouseholder,
    AutoIAF,
    AutoPlanar,
    AutoSylvester,
)

# NUTS moments of the models without a stored file, in their constrained space
# ({site: {"mean": [...], "sd": [...]}}); none are stored yet.
REFERENCES: dict[str, dict] = {}


# ---------------------------------------------------------------------------
# Models, guides, settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """A model to fit: its arguments, ``max_plate_nesting``, its log-normaliser
    where it is known, and the name of its NUTS reference (if any)."""

    name: str
    model: Callable
    args: Callable[[], tuple]
    max_plate_nesting: int
    log_z: float | None = None
    reference: str | None = None


MODELS = [
    Model("funnel", models.funnel, tuple, 0, log_z=0.0),
    Model("banana", models.banana, tuple, 0, log_z=0.0),
    Model("eight_schools", models.eight_schools, models.eight_schools_data, 1, reference="eight_schools"),
    Model("logistic", models.logistic_regression, models.logistic_regression_data, 1, reference="logistic"),
    Model("hierarchical", models.hierarchical, models.hierarchical_data, 1, reference="hierarchical"),
]


@dataclass(frozen=True)
class Guide:
    """A guide with its defaults: ``make(model)`` builds it; ``ours`` marks
    this package's; ``rival`` names the Pyro guide it must at least match."""

    name: str
    make: Callable
    ours: bool
    rival: str | None = None


def _pyro_flow(helper: str, count: int) -> Callable:
    """``AutoNormalizingFlow`` with ``count`` layers of Pyro's ``helper``."""
    return lambda model: AutoNormalizingFlow(
        model, functools.partial(pyro_transforms.iterated, count, getattr(pyro_transforms, helper))
    )


PYRO_PLANAR = "AutoNormalizingFlow(planar x 8)"
PYRO_SYLVESTER = "AutoNormalizingFlow(sylvester x 4)"
PYRO_SPLINE = "AutoNormalizingFlow(spline_autoregressive x 2)"
GUIDES = [
    Guide("AutoNormal", AutoNormal, False),
    Guide("AutoMultivariateNormal", AutoMultivariateNormal, False),
    Guide("AutoIAFNormal", AutoIAFNormal, False),
    Guide(PYRO_PLANAR, _pyro_flow("planar", 8), False),
    Guide(PYRO_SYLVESTER, _pyro_flow("sylvester", 4), False),
    Guide(PYRO_SPLINE, _pyro_flow("spline_autoregressive", 2), False),
    Guide("AutoHouseholder", AutoHouseholder, True, "AutoMultivariateNormal"),
    Guide("AutoConvexTriangular", AutoConvexTriangular, True, "AutoMultivariateNormal"),
    Guide("AutoIAF", AutoIAF, True, "AutoIAFNormal"),
    Guide("AutoPlanar", AutoPlanar, True, PYRO_PLANAR),
    Guide("AutoSylvester", AutoSylvester, True, PYRO_SYLVESTER),
    Guide("AutoFlow(spline_autoregressive:2)", lambda m: AutoFlow(m, "spline_autoregressive:2"), True, PYRO_SPLINE),
    # The scale after the flow (benchmarks/README.md#guide-scale-position): not yet a default.
    Guide("AutoPlanar(scale after)", lambda m: AutoPlanar(m, scale_position="after"), True, PYRO_PLANAR),
    Guide("AutoSylvester(scale after)", lambda m: AutoSylvester(m, scale_position="after"), True, PYRO_SYLVESTER),
]


@dataclass(frozen=True)
class Setting:
    """One way to train: ``optimizer`` ``"adam"`` or ``"clipped"`` (ClippedAdam,
    learning rate decaying to ``lr / 10``), for ``steps`` steps of
    ``Trace_ELBO`` with ``particles`` vectorised particles."""

    optimizer: str
    lr: float
    steps: int
    particles: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.lr:g}-{self.steps}-p{self.particles}"

    def make_optimizer(self):
        if self.optimizer == "adam":
            return pyro.optim.Adam({"lr": self.lr})
        return pyro.optim.ClippedAdam({"lr": self.lr, "lrd": 0.1 ** (1.0 / self.steps)})


SETTINGS = [
    Setting("adam", 1e-2, 2000, 1),
    Setting("adam", 1e-3, 10000, 1),
    Setting("clipped", 1e-2, 1000, 16),
    Setting("clipped", 5e-3, 5000, 4),
]
QUICK_SETTING = Setting("adam", 1e-2, 300, 4)


def parse_setting(name: str) -> Setting:
    """``"adam-0.01-2000-p1"`` as a :class:`Setting`."""
    try:
        optimizer, lr, steps, particles = name.split("-")
        if optimizer not in ("adam", "clipped") or not particles.startswith("p"):
            raise ValueError
        return Setting(optimizer, float(lr), int(steps), int(particles[1:]))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a setting is OPTIMIZER-LR-STEPS-pPARTICLES with OPTIMIZER adam or clipped, e.g. adam-0.01-2000-p1; "
            f"got {name!r}"
        ) from None


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


def load_reference(name: str) -> dict | None:
    """NUTS moments ``{"mean": {site: ...}, "sd": {site: ...}}`` of a model, or None."""
    if name == "eight_schools":
        with open(SCHOOLS_REFERENCE) as handle:
            return json.load(handle)
    return REFERENCES.get(name)


def fit(entry: Model, guide_entry: Guide, setting: Setting, seed: int):
    """A freshly built guide trained as ``setting`` says, from ``seed``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    args = entry.args()
    guide = guide_entry.make(entry.model)
    elbo = Trace_ELBO(
        num_particles=setting.particles, vectorize_particles=True, max_plate_nesting=entry.max_plate_nesting
    )
    svi = SVI(entry.model, guide, setting.make_optimizer(), elbo)
    for _ in range(setting.steps):
        svi.step(*args)
    return guide, args


@torch.no_grad()
def score(entry: Model, guide, args: tuple, num_samples: int, seed: int) -> dict:
    """ELBO (and its standard error) and, with a reference, the moment errors."""
    pyro.set_rng_seed(seed + 10_000)
    log_weights, _, guide_trace = vectorized_importance_weights(
        entry.model, guide, *args, num_samples=num_samples, max_plate_nesting=entry.max_plate_nesting
    )
    log_weights = log_weights.double()
    result = {
        "elbo": log_weights.mean().item(),
        "elbo_se": log_weights.std().item() / math.sqrt(num_samples),
    }
    if entry.log_z is not None:
        result["kl"] = entry.log_z - result["elbo"]
    reference = load_reference(entry.reference) if entry.reference else None
    if reference is not None:
        values = {
            name: site["value"].reshape(num_samples, -1).double()
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["infer"].get("is_auxiliary") and name in reference["mean"]
        }
        result.update(moment_errors(values, reference))
    return result


def moment_errors(values: dict[str, torch.Tensor], reference: dict) -> dict:
    """The largest standardised error of a posterior mean, and of a log sd, over all coordinates."""
    mean_errors, sd_errors = [], []
    for name, draws in values.items():
        ref_mean = torch.tensor(reference["mean"][name], dtype=torch.float64).reshape(-1)
        ref_sd = torch.tensor(reference["sd"][name], dtype=torch.float64).reshape(-1)
        mean_errors.append(((draws.mean(0) - ref_mean).abs() / ref_sd).max())
        sd_errors.append((draws.std(0) / ref_sd).log().abs().max())
    return {"mean_err": max(mean_errors).item(), "sd_err": max(sd_errors).item()}


def run_one(job: tuple) -> dict:
    """Train and score one (model, guide, setting, seed); a failure is recorded, not raised."""
    model_name, guide_name, setting_name, seed, eval_samples, threads = job
    torch.set_num_threads(threads)
    entry = next(m for m in MODELS if m.name == model_name)
    guide_entry = next(g for g in GUIDES if g.name == guide_name)
    setting = parse_setting(setting_name)
    row = {"model": model_name, "guide": guide_name, "setting": setting_name, "seed": seed}
    start = time.perf_counter()
    try:
        guide, args = fit(entry, guide_entry, setting, seed)
        row.update(score(entry, guide, args, eval_samples, seed))
    except (ValueError, RuntimeError, ArithmeticError, NotImplementedError) as error:
        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def job_key(row: dict) -> tuple:
    return row["model"], row["guide"], row["setting"], row["seed"]


def run_jobs(jobs: list[tuple], workers: int, out: str | None) -> list[dict]:
    """Run the jobs (``workers`` processes), each result appended to ``out`` as it comes."""
    rows = []
    handle = open(out, "a") if out else None
    try:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for row in pool.map(run_one, jobs):
                    rows.append(_record(row, handle))
        else:
            for job in jobs:
                rows.append(_record(run_one(job), handle))
    finally:
        if handle:
            handle.close()
    return rows


def _record(row: dict, handle) -> dict:
    cells = {key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}
    print("#", json.dumps(cells), flush=True)
    if handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
    return row


def read_rows(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------
# The table and the verdicts
# ---------------------------------------------------------------------------


def summarise(rows: Iterable[dict]) -> dict[tuple, dict]:
    """``{(model, guide, setting): {"elbo": [per seed], ...}}`` over the rows without errors."""
    cells: dict[tuple, dict] = {}
    for row in rows:
        cell = cells.setdefault((row["model"], row["guide"], row["setting"]), {"errors": 0})
        if "error" in row:
            cell["errors"] += 1
            continue
        for key in ("elbo", "kl", "mean_err", "sd_err"):
            if key in row:
                cell.setdefault(key, []).append(row[key])
    return cells


def _cell_text(cell: dict | None, key: str) -> str:
    if not cell or key not in cell:
        return "failed" if cell and cell["errors"] else "—"
    values = cell[key]
    text = f"{statistics.fmean(values):.3f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"
    return text + ("!" if cell["errors"] else "")


def print_table(cells: dict[tuple, dict], model_names: list[str], guide_names: list[str], settings: list[str]):
    """One block per model: a row per guide, a column per setting (mean ± se over seeds)."""
    width = max(len(name) for name in guide_names) + 2
    for model_name in model_names:
        entry = next(m for m in MODELS if m.name == model_name)
        keys = ["elbo"] + (["mean_err", "sd_err"] if entry.reference and load_reference(entry.reference) else [])
        for key in keys:
            label = {"elbo": "ELBO (= -KL)" if entry.log_z == 0 else "ELBO"}.get(key, key)
            print(f"\n{model_name}: {label}, mean ± se over seeds")
            print(f"{'guide':<{width}}" + "".join(f"{name:>24}" for name in settings))
            for guide_name in guide_names:
                texts = [_cell_text(cells.get((model_name, guide_name, s)), key) for s in settings]
                print(f"{guide_name:<{width}}" + "".join(f"{text:>24}" for text in texts))


def _difference(ours: dict | None, theirs: dict | None) -> tuple[float, float] | None:
    """Mean ELBO difference over the seeds and its standard error."""
    if not ours or not theirs or "elbo" not in ours or "elbo" not in theirs:
        return None
    a, b = ours["elbo"], theirs["elbo"]
    variance = sum(statistics.variance(v) / len(v) for v in (a, b) if len(v) > 1)
    return statistics.fmean(a) - statistics.fmean(b), math.sqrt(variance)


def verdicts(cells: dict[tuple, dict], model_names: list[str], guide_names: list[str], settings: list[str]):
    """The checks of the module docstring, one line each; returns the number that failed."""
    failures = 0
    ours = [g for g in GUIDES if g.ours and g.name in guide_names]
    checks = []
    for guide in ours:
        for rival in [guide.rival, "AutoNormal"]:
            if rival in guide_names:
                checks.append((guide.name, rival, "matches", -2.0))
    if "AutoIAF" in guide_names and "AutoIAFNormal" in guide_names:
        checks.append(("AutoIAF", "AutoIAFNormal", "beats", 0.0))
    print()
    for name, rival, verb, factor in checks:
        scope = ["banana", "funnel"] if verb == "beats" else model_names
        misses = []
        for model_name in (m for m in model_names if m in scope):
            for setting in settings:
                found = _difference(cells.get((model_name, name, setting)), cells.get((model_name, rival, setting)))
                if found is None:
                    continue
                difference, se = found
                if difference < factor * se if verb == "matches" else difference <= 0:
                    misses.append(f"{model_name}/{setting} {difference:+.3f} ± {se:.3f}")
        failures += bool(misses)
        print(f"{'FAIL' if misses else 'PASS'}: {name} {verb} {rival}" + (": " + "; ".join(misses) if misses else ""))
    return failures


def median_model() -> None:
    """The model of Pyro's ``tests/infer/test_autoguide.py::test_median``: medians 0, 1 and 0.5."""
    pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))
    pyro.sample("y", pyro.distributions.LogNormal(0.0, 1.0))
    pyro.sample("z", pyro.distributions.Beta(2.0, 2.0))


MEDIAN_TRUTH = {"x": 0.0, "y": 1.0, "z": 0.5}


def run_median(options) -> int:
    """Pyro's test_median with our guides whose median is Monte Carlo: 100 steps
    of Adam (lr 0.02, betas 0.8 / 0.99), 500 vectorised particles. Prints,
    per seed, the largest error of ``median()`` against the truth (Pyro's
    tolerance: 0.1), and the error of the estimate itself at its default
    count against one from 2**18 points, for quasi-Monte Carlo (what
    ``median()`` does) and for plain Monte Carlo of the same count."""
    makers = {name: entry.make for name, entry in ((g.name, g) for g in GUIDES) if name in (options.guides or [
        "AutoIAF", "AutoPlanar", "AutoSylvester", "AutoFlow(spline_autoregressive:2)"])}
    print(f"{'guide':<36} {'seed':>4} {'|median - truth|':>17} {'QMC error':>10} {'MC error':>10}")
    for name, make in makers.items():
        for seed in options.seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            guide = make(median_model)
            elbo = Trace_ELBO(num_particles=500, vectorize_particles=True)
            svi = SVI(median_model, guide, pyro.optim.Adam({"lr": 0.02, "betas": (0.8, 0.99)}), elbo)
            for _ in range(100):
                svi.step()
            median = guide.median()
            truth_error = max(abs(median[site].item() - value) for site, value in MEDIAN_TRUTH.items())
            with torch.no_grad():
                exact = torch.quantile(guide.get_transform()(guide._quasi_normal(2**18)), 0.5, dim=0)
                qmc = torch.quantile(guide.get_transform()(guide._quasi_normal(4096)), 0.5, dim=0)
                mc = torch.quantile(guide.get_posterior().sample((4096,)), 0.5, dim=0)
            print(f"{name:<36} {seed:>4} {truth_error:>17.3f} {(qmc - exact).abs().max().item():>10.4f} "
                  f"{(mc - exact).abs().max().item():>10.4f}", flush=True)
    return 0


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="model names (see --list); default all")
    parser.add_argument("--guides", nargs="+", help="guide names (see --list); default all")
    parser.add_argument("--settings", nargs="+", type=parse_setting, help="e.g. adam-0.01-2000-p1; default the grid")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--eval-samples", type=int, default=10000)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", help="JSON-lines file: results are appended, and runs it holds are not rerun")
    parser.add_argument("--report", action="store_true", help="print the table of --out without running anything")
    parser.add_argument("--quick", action="store_true", help="funnel and banana, 3 guides, 300 steps, 1 seed")
    parser.add_argument("--median", action="store_true", help="Pyro's test_median with our guides (see run_median)")
    parser.add_argument("--list", action="store_true", help="print the models, guides and settings and exit")
    options = parser.parse_args(argv)
    if options.quick:
        options.models = options.models or ["funnel", "banana"]
        options.guides = options.guides or ["AutoNormal", "AutoIAFNormal", "AutoIAF"]
        options.settings = options.settings or [QUICK_SETTING]
        options.seeds, options.eval_samples = [1], 5000
    for kind, known in (("models", MODELS), ("guides", GUIDES)):
        unknown = sorted(set(getattr(options, kind) or []) - {entry.name for entry in known})
        if unknown:
            parser.error(f"unknown {kind} {unknown}; see --list")
    return options


def main(argv=None) -> int:
    options = parse(argv)
    if options.list:
        for kind, entries in (("models", MODELS), ("guides", GUIDES), ("settings", SETTINGS)):
            print(f"{kind}:\n  " + "\n  ".join(entry.name for entry in entries))
        return 0
    if options.median:
        return run_median(options)
    model_names = options.models or [m.name for m in MODELS]
    guide_names = options.guides or [g.name for g in GUIDES]
    settings = [s.name for s in (options.settings or SETTINGS)]
    rows = read_rows(options.out)
    done = {job_key(row) for row in rows}
    jobs = [
        (m, g, s, seed, options.eval_samples, options.threads)
        for s in settings
        for m in model_names
        for g in guide_names
        for seed in options.seeds
        if (m, g, s, seed) not in done
    ]
    print(f"# {library_versions({'pyro': 'pyro-ppl'})}; load average {os.getloadavg()[0]:.1f}; "
          f"{len(jobs)} runs to do, {len(done)} read from {options.out}; seeds {options.seeds}; "
          f"{options.eval_samples} evaluation draws")
    if not options.report:
        rows += run_jobs(jobs, options.jobs, options.out)
    wanted = [row for row in rows if row["seed"] in options.seeds]
    cells = summarise(wanted)
    print_table(cells, model_names, guide_names, settings)
    verdicts(cells, model_names, guide_names, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
