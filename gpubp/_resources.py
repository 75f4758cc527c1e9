"""Where the CUDA C sources are: inside the installed package or in a source checkout."""

from __future__ import annotations

from pathlib import Path


def kernel_dir() -> Path:
    """The folder of kernels/*.cu and *.cuh.

    An installed wheel carries them as ``gpubp/_kernels``; a source checkout
    (or an editable install) has them at ``<repo>/kernels``.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_kernels", here.parent / "kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"kernel sources not found in {here / '_kernels'} nor {here.parent / 'kernels'}")
