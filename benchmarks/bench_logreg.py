"""The logreg head against its optimum and against scikit-learn, on fc7-shaped generated features.

    python -m benchmarks.bench_logreg                       # 40 classes, 4,000 x 4,096, the default path
    python -m benchmarks.bench_logreg --rows 1000 --dim 512 --no-sklearn     # a quick look
    python -m benchmarks.bench_logreg --threads 1           # ours and scikit-learn on one thread each

scikit-learn is not a project dependency: install it for the benchmark only, in a throwaway place, e.g.
``pip install --target /tmp/skl scikit-learn`` (then delete /tmp/skl/numpy*, so the project's numpy is
used) and run with ``PYTHONPATH=/tmp/skl``.

The features are clustered and sparse like a random backbone's post-ReLU fc7: each class has a Gaussian
prototype, a row is ReLU(signal x prototype + noise - offset), and ``--dead`` of the units never fire
(their column is all zero). They are standardized as the head does. Then, over the default penalty path
(strongest first, warm-started):

- the default run (pipeline.heads.logreg.fit_logreg with its default tolerance and budget), timed;
- a tightly converged solve of each penalty (torch's L-BFGS in float64, to max |grad| <= 1e-7 or 300 iterations, warm-started
  from the default run's result: one convex optimum), the reference objective;
- scikit-learn's LogisticRegression (lbfgs, C = 1 / (N x weight_decay), its default tol, warm-started along the
  same path), timed, in this process, only here: scikit-learn is not a project dependency.

Target: every penalty's objective within 1e-4 relative of the reference, in at most 1/3 of scikit-learn's
time (CPU time: ``time.process_time``, and wall). ``--threads`` caps both sides' threads (torch's intra-op
threads for ours, threadpoolctl's BLAS and OpenMP limit for scikit-learn); on a machine shared with other
work, threads waiting on descheduled siblings inflate both. Writes benchmarks/results/logreg-<cpu>[-<tag>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.synthetic_cache import add_shape_args
from pipeline.common.config import LOGREG_WEIGHT_DECAY
from pipeline.common.hardware import cpu_kind, cpu_tag
from pipeline.heads.solvers.path import TOLERANCE_GRAD, fit_logreg, objective, solve, train_state
from pipeline.heads.solvers.softmax import InMemorySoftmax

RESULTS = Path(__file__).resolve().parent / "results"


def generate(rows: int, classes: int, dim: int, dead: float, signal: float, seed: int):
    """(rows, dim) float32 clustered ReLU features with ``dead`` of the columns all zero, balanced labels."""
    generator = torch.Generator().manual_seed(1234)
    prototypes = torch.randn(classes, dim, generator=generator)
    alive = torch.rand(dim, generator=generator) >= dead
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(-(-rows // classes))[:rows]
    features = (signal * prototypes[labels] + torch.randn(rows, dim, generator=generator) - 0.5).clamp_(min=0)
    return features * alive, labels


def standardize(train: torch.Tensor, val: torch.Tensor):
    mean, std = train.mean(0), train.std(0)
    inv_std = torch.where(std > 1e-6, 1.0 / std, torch.ones_like(std))
    return (train - mean) * inv_std, (val - mean) * inv_std


def tight_solve(x, y, weight, bias, weight_decay: float) -> tuple[float, float]:
    """The float64 optimum from (weight, bias) by torch's autograd L-BFGS: an independent implementation."""
    w = weight.double().clone().requires_grad_(True)
    b = bias.double().clone().requires_grad_(True)
    x = x.double()
    solver = torch.optim.LBFGS([w, b], max_iter=300, tolerance_grad=1e-7, tolerance_change=1e-15,
                               history_size=20, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + 0.5 * weight_decay * w.square().sum()
        loss.backward()
        return loss

    solver.step(closure)
    state = train_state(x, y, w.detach(), b.detach(), weight_decay)  # float64 throughout
    return state["objective"], state["grad_max"]


def time_evaluations(x, y, classes: int, repeats: int = 5) -> dict:
    """CPU seconds of one objective + gradient: autograd (the old closure), fused by hand, and one in-memory
    line-search trial (no matmul), at a random point."""
    from pipeline.heads.solvers.softmax import chunked_loss_and_grad

    weight = torch.randn(classes, x.shape[1], generator=torch.Generator().manual_seed(0)) * 0.01
    bias = torch.zeros(classes)
    problem = InMemorySoftmax(x, y, classes, 0.01)
    theta = torch.cat([weight.flatten(), bias])
    problem.start(theta)
    phi = problem.line(torch.randn(theta.shape, generator=torch.Generator().manual_seed(1)) * 1e-3)

    def autograd():
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        objective(x, y, w, b, 0.01).backward()

    timings = {}
    for name, run in (("autograd", autograd), ("fused", lambda: chunked_loss_and_grad([(x, y)], weight, bias, 0.01)),
                      ("line_trial", lambda: phi(0.5))):
        run()
        cpu = time.process_time()
        for _ in range(repeats):
            run()
        timings[name] = (time.process_time() - cpu) / repeats
    print("CPU seconds per evaluation: " + "  ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()), flush=True)
    return timings


def sklearn_at_optimum(x, y, weight_decays, reference: list[dict], tols: list[float]) -> dict:
    """scikit-learn's path at each ``tol`` until every objective is within 1e-4 relative of the reference:
    its time for the same objective as ours."""
    runs = []
    for tol in tols:
        run = sklearn_path(x, y, weight_decays, tol)
        run["relative_gaps"] = [(f["objective"] - r["objective"]) / abs(r["objective"])
                                for f, r in zip(run["fits"], reference)]
        runs.append(run)
        if all(gap <= 1e-4 for gap in run["relative_gaps"]):
            return {"runs": runs, "at_optimum": run}
    return {"runs": runs, "at_optimum": None}


def sklearn_path(x, y, weight_decays, tol: float = 1e-4) -> dict:
    from sklearn.linear_model import LogisticRegression  # benchmark only
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(torch.get_num_threads())  # the same cap as ours
    x64, labels = x.double().numpy(), y.numpy()
    model = LogisticRegression(solver="lbfgs", max_iter=10_000, warm_start=True, tol=tol)
    fits, total, total_cpu = [], 0.0, 0.0
    for weight_decay in weight_decays:
        model.set_params(C=1.0 / (len(labels) * weight_decay))
        start, cpu = time.perf_counter(), time.process_time()
        model.fit(x64, labels)
        seconds = time.perf_counter() - start
        total += seconds
        total_cpu += time.process_time() - cpu
        with torch.no_grad():
            value = objective(x.double(), y, torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_),
                              weight_decay).item()
        fits.append({"weight_decay": weight_decay, "objective": value, "seconds": seconds,
                     "iterations": int(model.n_iter_.max())})
        print(f"sklearn tol={tol:g} wd={weight_decay:g}: objective {value:.7f}  {int(model.n_iter_.max())} it  {seconds:.1f}s", flush=True)
    limits.restore_original_limits()
    return {"tol": tol, "seconds": total, "cpu_seconds": total_cpu, "fits": fits}


def measure_ours(args, train_x, train_y, val_x, val_y, weight_decays) -> tuple[dict, list[dict]]:
    """Our default path, then each penalty tightly re-solved from our result (the reference optimum)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fit_logreg(train_x, train_y, val_x, val_y, num_classes=args.classes, weight_decays=weight_decays,
                        tolerance_grad=args.tolerance_grad)
    ours = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "tolerance_grad": args.tolerance_grad, "fits": [vars(f) for f in result.fits]}
    print(f"ours: {ours['seconds']:.1f}s ({ours['cpu_seconds']:.1f} CPU-s)", flush=True)

    # the reference: each penalty tightly re-solved from our result for it (the same warm-started path again)
    weight, bias = torch.zeros(args.classes, args.dim), torch.zeros(args.classes)
    reference = []
    for fit in result.fits:
        solve(InMemorySoftmax(train_x, train_y, args.classes, fit.weight_decay), weight, bias,
              tolerance_grad=args.tolerance_grad)
        best, grad_max = tight_solve(train_x, train_y, weight, bias, fit.weight_decay)
        gap = (fit.objective - best) / abs(best)
        reference.append({"weight_decay": fit.weight_decay, "objective": best, "grad_max": grad_max,
                          "relative_gap": gap})
        print(f"wd={fit.weight_decay:g}: ours {fit.objective:.7f} ({fit.iterations} it, {fit.evaluations} passes, "
              f"{fit.seconds:.1f}s, {fit.stopped})  optimum {best:.7f}  relative gap {gap:.1e}", flush=True)
    return ours, reference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, rows_flag="--rows", rows=4000, val_rows=1000, classes=40, signal=0.5)
    p.add_argument("--dead", type=float, default=0.6, help="share of units that never fire")
    p.add_argument("--weight-decays", default=",".join(map(str, LOGREG_WEIGHT_DECAY)))
    p.add_argument("--tolerance-grad", type=float, default=TOLERANCE_GRAD, help="ours: stop at this max |grad|")
    p.add_argument("--no-sklearn", action="store_true")
    p.add_argument("--sklearn-tols", default="1e-4,1e-6,1e-8", help="tried loosest first until at the optimum")
    p.add_argument("--reuse", type=Path, help="a record of this benchmark: keep its own runs, redo scikit-learn")
    p.add_argument("--evaluations-only", action="store_true", help="only time one evaluation each way")
    p.add_argument("--threads", type=int, help="torch and BLAS threads for both sides (default: torch's)")
    p.add_argument("--tag", default="", help="appended to the result file's name")
    p.add_argument("--out", type=Path)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    weight_decays = sorted((float(v) for v in args.weight_decays.split(",")), reverse=True)
    train_x, train_y = generate(args.rows, args.classes, args.dim, args.dead, args.signal, seed=1)
    val_x, val_y = generate(args.val_rows, args.classes, args.dim, args.dead, args.signal, seed=2)
    train_x, val_x = standardize(train_x, val_x)
    if args.evaluations_only:
        time_evaluations(train_x, train_y, args.classes)
        return 0

    if args.reuse:
        record = json.loads(args.reuse.read_text())
        ours, reference = record["ours"], record["reference"]
    else:
        ours, reference = measure_ours(args, train_x, train_y, val_x, val_y, weight_decays)
        record = {"cpu": cpu_kind(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "shape": vars(args) | {"out": None}, "ours": ours, "reference": reference}
    if not args.no_sklearn:
        tols = [float(v) for v in args.sklearn_tols.split(",")]
        record["sklearn"] = sklearn_at_optimum(train_x, train_y, weight_decays, reference, tols)
        same = record["sklearn"]["at_optimum"]
        for key in ("time_ratio_vs_sklearn", "cpu_time_ratio_vs_sklearn"):
            record.pop(key, None)
        if same:
            record["time_ratio_vs_sklearn"] = ours["seconds"] / same["seconds"]
            record["cpu_time_ratio_vs_sklearn"] = ours["cpu_seconds"] / same["cpu_seconds"]
    record["load_average"] = {"before": load_before, "after": os.getloadavg()}
    record["threads"] = torch.get_num_threads()
    record["target_met"] = (all(abs(r["relative_gap"]) <= 1e-4 for r in reference)
                            and record.get("time_ratio_vs_sklearn", float("inf")) <= 1 / 3)
    print(json.dumps({k: record.get(k) for k in ("time_ratio_vs_sklearn", "cpu_time_ratio_vs_sklearn", "target_met")}),
          flush=True)
    out = args.out or RESULTS / f"logreg-{cpu_tag(record['cpu'])}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
