"""gpubp.bench: the benchmark suite behind ``gpubp bench``. Modules, each importing only those above it:

    timing       statistics, host timing, GPU timing (cupyx.profiler.benchmark), ceilings
    env          the environment of a run (GPU, CPU, BLAS threads via threadpoolctl, versions, commit)
    report       the text table, results.json, summary.md and PNG plots
    cases        cases, their work, float64 references and correctness gates
    contenders   gpubp fused and unfused, NumPy, PyTorch eager / compiled, on the GPU and the CPU
    run          the runner: gate, timing, ratios, headline
    cli          ``add_parser(subparsers)`` and ``run(args)`` for ``gpubp bench``

``import gpubp`` imports none of it; CuPy, PyTorch and matplotlib load only when a run needs them.
See bench/README.md for how to read a run.
"""
