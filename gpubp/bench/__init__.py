"""gpubp.bench: the benchmark behind ``gpubp bench``, in one-way layers (each module imports only those before
it): timing, cases, contenders, run, cli. ``import gpubp`` imports none of it; CuPy, PyTorch and matplotlib load
only when a run needs them. See bench/README.md for how to read a run.
"""
