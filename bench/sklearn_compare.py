"""gpubp.sklearn's MLPs against scikit-learn's: test score and fit time side by side, as a markdown table.

    python bench/sklearn_compare.py                          # every data set; gpubp on the CPU
    python bench/sklearn_compare.py --sets digits,wine --repeats 5
    python bench/sklearn_compare.py --device cuda            # gpubp on the GPU, scikit-learn on the CPU
    python bench/sklearn_compare.py --large-rows 50000 --json out.json

Data sets: the ones scikit-learn ships (digits, breast_cancer, wine: classification; diabetes:
regression) and ``large``, a ``make_classification`` problem of ``--large-rows`` training rows
(200,000 by default, 40 features, 5 classes; a third as many rows held out). Each is split
75/25 (stratified for classification) with a fixed seed and standardised on the training part (and the diabetes
target too). The same estimator settings go to ``sklearn.neural_network`` and to
``gpubp.sklearn`` (listed under the table): hidden_layer_sizes=(100,), adam, scikit-learn's
defaults otherwise, with the number of epochs fixed for ``large`` (tol=0, so both run the same
work). gpubp runs twice: in float64 (scikit-learn's rule for float64 X, the same maths) and in
float32 (``dtype="float32"``).

Scores are accuracy (classification) or R^2 (regression) on the held-out quarter. Fit times
are wall-clock seconds of ``fit`` alone, the median over ``--repeats`` runs with random_state
0, 1, ... (the score is the median too; ``large`` runs once each), after one untimed warm-up
fit per contender (gpubp's Numba kernels compile on first use). ``s/epoch`` divides by
``n_iter_``: the runs may stop after different numbers of epochs (the mini-batch orders
differ: the maths is the same, the shuffling is not). The header names the machine (CPU
model, cores, BLAS threads, GPU), the versions and the 1-minute load average before and after
the run: a load near the core count before it means other work shared the cores, which slows
both libraries (the small BLAS calls of digits most, up to tenfold on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

SETS = ("digits", "breast_cancer", "wine", "diabetes", "large")


def load(name: str, large_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """(X_train, X_test, y_train, y_test, is_classification), split 75/25 (``large``: ``large_rows`` to train,
    a third of that to test) and standardised on the training part."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if name == "large":
        test = large_rows // 3
        X, y = datasets.make_classification(n_samples=large_rows + test, n_features=40, n_informative=20,
                                            n_classes=5, n_clusters_per_class=2, flip_y=0.02, random_state=0)
        sizes = {"train_size": large_rows, "test_size": test}
    else:
        X, y = getattr(datasets, f"load_{name}")(return_X_y=True)
        sizes = {"test_size": 0.25}
    classify = name != "diabetes"
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0, stratify=y if classify else None, **sizes)
    scaler = StandardScaler().fit(Xtr)
    Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
    if not classify:
        mu, sd = ytr.mean(), ytr.std()
        ytr, yte = (ytr - mu) / sd, (yte - mu) / sd
    return Xtr, Xte, ytr, yte, classify


def settings(name: str) -> dict[str, Any]:
    """The estimator parameters both libraries get for data set ``name``."""
    common: dict[str, Any] = {"hidden_layer_sizes": (100,), "solver": "adam"}
    if name == "large":
        return {**common, "max_iter": 10, "tol": 0.0}  # a fixed 10 epochs: the same work for both
    if name == "diabetes":
        return {**common, "learning_rate_init": 0.01, "max_iter": 300, "early_stopping": True}
    return {**common, "max_iter": 300}


def contenders(device: str) -> dict[str, Callable[..., Any]]:
    """Name -> estimator factory (keyword parameters, classification flag)."""
    from sklearn.neural_network import MLPClassifier as SkC
    from sklearn.neural_network import MLPRegressor as SkR

    from gpubp.sklearn import MLPClassifier, MLPRegressor

    return {
        "scikit-learn": lambda classify, **kw: (SkC if classify else SkR)(**kw),
        "gpubp float64": lambda classify, **kw: (MLPClassifier if classify else MLPRegressor)(
            device=device, dtype="float64", **kw),
        "gpubp float32": lambda classify, **kw: (MLPClassifier if classify else MLPRegressor)(
            device=device, dtype="float32", **kw),
    }


def run_one(make: Callable[..., Any], classify: bool, kw: dict[str, Any], data: tuple, seed: int) -> dict[str, float]:
    from sklearn.exceptions import ConvergenceWarning

    Xtr, Xte, ytr, yte = data
    est = make(classify, random_state=seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        est.fit(Xtr, ytr)
        seconds = time.perf_counter() - t0
    return {"score": float(est.score(Xte, yte)), "seconds": seconds, "epochs": int(est.n_iter_)}


def machine(device: str) -> dict[str, Any]:
    """CPU model, cores, BLAS threads, GPU (or why none) and versions."""
    import sklearn
    from threadpoolctl import threadpool_info

    import gpubp
    from gpubp.device import cuda_status

    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), model)
    blas = next((p for p in threadpool_info() if p.get("user_api") == "blas"), {})
    n, why = cuda_status()
    gpu = f"none ({why.split(' (')[0]})" if n == 0 else __import__("cupy").cuda.runtime.getDeviceProperties(0)["name"]
    if isinstance(gpu, bytes):
        gpu = gpu.decode()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or platform.machine(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "blas": f"{blas.get('internal_api', 'unknown')} {blas.get('num_threads', '?')} threads",
            "gpu": gpu, "gpubp_device": device, "python": platform.python_version(), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "gpubp": gpubp.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs per small data set (median)")
    parser.add_argument("--large-rows", type=int, default=200_000, help="training rows of the generated set")
    parser.add_argument("--device", default="cpu", help="gpubp's device (cpu, cuda, cuda:N, auto)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETS]
    if unknown:
        parser.error(f"--sets: unknown {unknown}; expected some of {', '.join(SETS)}")
    if args.repeats < 1:
        parser.error("--repeats: expected an integer >= 1")

    env = machine(args.device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    makers = contenders(args.device)
    rows = []
    for name in names:
        Xtr, Xte, ytr, yte, classify = load(name, args.large_rows)
        data = (Xtr, Xte, ytr, yte)
        kw = settings(name)
        repeats = 1 if name == "large" else args.repeats
        result: dict[str, Any] = {"set": name, "rows": Xtr.shape[0], "features": Xtr.shape[1],
                                  "task": "classification" if classify else "regression", "settings": kw}
        for label, make in makers.items():
            warm = (Xtr[:256], Xte[:16], ytr[:256], yte[:16])
            run_one(make, classify, {**kw, "max_iter": 1}, warm, 0)  # compile / import outside the timing
            runs = [run_one(make, classify, kw, data, seed) for seed in range(repeats)]
            result[label] = {k: statistics.median(r[k] for r in runs) for k in ("score", "seconds", "epochs")}
            result[label]["runs"] = runs
            print(f"{name}: {label} score {result[label]['score']:.4f}, fit {result[label]['seconds']:.3f} s, "
                  f"{result[label]['epochs']} epochs", file=sys.stderr, flush=True)
        rows.append(result)

    env["load_average"] = [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")]
    print(f"Machine: {env['cpu']}, {env['usable_cpus']} usable cores of {env['logical_cpus']}, BLAS {env['blas']}; "
          f"GPU: {env['gpu']}; gpubp on {env['gpubp_device']}. Python {env['python']}, NumPy {env['numpy']}, "
          f"scikit-learn {env['scikit-learn']}, gpubp {env['gpubp']}. Load average (1 min): {env['load_average'][0]:.2f} "
          f"before the run, {env['load_average'][1]:.2f} after.\n")
    labels = list(makers)
    head = ["data set", "rows x features", "metric"]
    for label in labels:
        head += [f"{label} score", f"{label} fit s", "epochs", "s/epoch"]
    head.append("speed-up per epoch (f64 / f32)")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [r["set"], f"{r['rows']:,} x {r['features']}", "accuracy" if r["task"] == "classification" else "R^2"]
        for label in labels:
            m = r[label]
            cells += [f"{m['score']:.4f}", f"{m['seconds']:.3f}", f"{m['epochs']:g}",
                      f"{m['seconds'] / max(m['epochs'], 1):.4f}"]
        base = r["scikit-learn"]["seconds"] / max(r["scikit-learn"]["epochs"], 1)
        ups = [base / (r[label]["seconds"] / max(r[label]["epochs"], 1)) for label in labels[1:]]
        cells.append(" / ".join(f"{u:.2f}x" for u in ups))
        print("| " + " | ".join(cells) + " |")
    print("\nSettings (both libraries): " + "; ".join(
        f"{r['set']}: " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()) for r in rows)
        + ". Fit time: median of " + f"{args.repeats} runs (random_state 0..{args.repeats - 1}; large: 1 run) "
        "after a warm-up fit; the speed-up compares seconds per epoch with scikit-learn's.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": env, "results": rows, "argv": sys.argv}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
