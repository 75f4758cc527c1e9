"""gpubp.bench: the benchmark suite behind ``gpubp bench``.

    harness   timing (CUDA events / perf_counter), statistics, the correctness gate,
              ceilings (copy bandwidth, matmul FLOP/s), environment capture, the runner
    cases     the cases (dense layers, training steps, optimizers, loss) and the
              contenders (gpubp fused and unfused, NumPy, PyTorch eager / compiled)
    report    the text table, results.json, summary.md and PNG plots
    cli       ``add_parser(subparsers)`` and ``run(args)`` for ``gpubp bench``

Nothing here is imported by ``import gpubp``; CuPy, PyTorch and matplotlib are
imported only when a run needs them. See bench/README.md for how to read a run.
"""
