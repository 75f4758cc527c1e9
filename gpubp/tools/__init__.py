"""Tooling around the CUDA C kernels, apart from the run-time code that loads and launches them.

    nvrtc_check      compile every kernel offline with NVRTC (no GPU, no driver), parse ptxas' report
    host_emulation   build kernels/*.cu as plain C++ (g++) and launch them on the CPU, for tests
    oracles          float64 references of what the kernels compute, and the error each may carry
    kernels_command  the ``gpubp kernels`` subcommand (check, list, bench)

Nothing here is imported by ``import gpubp``, nor by the backends at run time.
"""
