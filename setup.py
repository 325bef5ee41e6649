"""Build qrlora-kernels and its one extension, ``qrlora_kernels._C``.

The extension is built with the CUDA sources when nvcc and a CUDA build of
torch are both present and share a CUDA major version (torch refuses to build
across majors), and CPU-only otherwise, saying why. Environment variables:

* ``QRLORA_CUDA_ARCHS``  -- semicolon list of compute capabilities (default ``80;90``).
* ``QRLORA_FORCE_CPU=1`` -- skip the CUDA sources even where they could build.
* ``CUDA_HOME``          -- the CUDA toolkit to use (found automatically otherwise).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90"


def _is_toolkit(path: str | os.PathLike | None) -> bool:
    if not path:
        return False
    p = Path(path)
    # A wrapper script's folder (/usr/local/bin) has nvcc but no runtime to link.
    # any() of the glob iterator itself: a generator object is always truthy.
    has_runtime = any(any((p / lib).glob("libcudart.so*")) for lib in ("lib64", "lib"))
    return (p / "bin" / "nvcc").is_file() and has_runtime


def find_cuda_home() -> str | None:
    """CUDA_HOME when set, else the standard install location, else ask nvcc.

    torch guesses the toolkit from ``dirname(dirname(which nvcc))``; on machines
    where ``nvcc`` on PATH is a wrapper script that guess is wrong and linking
    fails with "cannot find -lcudart", so we resolve the real toolkit ourselves.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if not _is_toolkit(env):
            raise RuntimeError(f"CUDA_HOME={env!r} is not a CUDA toolkit (no bin/nvcc or lib64/libcudart)")
        return env
    for cand in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if _is_toolkit(cand):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # the real nvcc reports its own location in a dry run, even behind a wrapper
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    if m and _is_toolkit(Path(m.group(1).strip()).resolve()):
        return str(Path(m.group(1).strip()).resolve())
    return None


def toolkit_version(cuda_home: str) -> str | None:
    """The toolkit's CUDA release ("13.0") from its nvcc, as torch's own check reads it; None if unreadable."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_mismatch(toolkit: str | None, torch_cuda: str | None) -> str | None:
    """Why the toolkit cannot build against this torch (their CUDA major versions differ, which torch's
    cpp_extension refuses), or None. An unreadable toolkit version is left to torch's own check."""
    if toolkit is None or torch_cuda is None or toolkit.split(".")[0] == torch_cuda.split(".")[0]:
        return None
    return (f"the CUDA toolkit is {toolkit} but torch was built with CUDA {torch_cuda} (their major versions must "
            f"match); set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit to build the CUDA sources")


def _pip_cuda_include_dirs() -> list[str]:
    """Headers of the CUDA libraries that pip wheels install (nvidia/*/include): a minimal
    toolkit (nvcc + cudart only) lacks cuBLAS/cuSPARSE headers that ATen's CUDA headers include."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(str(p) for root in nvidia.__path__ for p in Path(root).glob("*/include") if p.is_dir())


def cuda_include_dirs(cuda_home: str) -> list[str]:
    """The toolkit's own headers first, then the pip wheels' for what the toolkit lacks.

    The wheels also carry the CUDA runtime's headers of the release torch was built with (torch 2.15's: 13.2),
    and nvcc's CCCL headers refuse a runtime header of another release ("CUDA compiler and CUDA toolkit headers
    are incompatible"), so nvcc must find its own toolkit's runtime headers before the wheels' copies.
    """
    own = str(Path(cuda_home) / "include")
    return [own, *(d for d in _pip_cuda_include_dirs() if d != own)]


def make_extension():
    cuda_home = None if os.environ.get("QRLORA_FORCE_CPU") == "1" else find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads it once.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
    except ImportError:
        # pip's default build isolation builds in a bare environment, without the torch the extension must be
        # compiled against (a torch installed there would be another build, whose ABI the runtime's may not share).
        raise SystemExit(
            "qrlora-kernels compiles its extension against the installed torch, which this build environment "
            "lacks (pip builds in an isolated environment by default): install torch first, then "
            "`pip install --no-build-isolation .` (or `-e .`); `make test` / `make bench` do both") from None
    from torch.utils import cpp_extension

    if cuda_home:
        # cpp_extension reads CUDA_HOME once, at its first import, which may already have happened.
        cpp_extension.CUDA_HOME = cuda_home

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    use_cuda = bool(cuda_home) and torch.version.cuda is not None and bool(cu_sources)
    mismatch = cuda_mismatch(toolkit_version(cuda_home), torch.version.cuda) if use_cuda else None
    use_cuda = use_cuda and mismatch is None
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17, or C++20
    # from torch 2.10 on), and a fixed one breaks one of the two supported stacks.
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # The CPU panel's parallel region (csrc/qrcp/panel_cpu.cpp) and ATen's inline
        # at::parallel_for need OpenMP at compile time; without it both silently run on one
        # thread. libgomp.so.1 resolves to the copy torch has already loaded (same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not use_cuda:
        print("qrlora_kernels: building the CPU-only extension "
              f"(nvcc found: {bool(cuda_home)}, CUDA build of torch: {torch.version.cuda is not None}"
              + (f"; {mismatch}" if mismatch else "") + ")")
        return cpp_extension.CppExtension(
            "qrlora_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    archs = [a.strip() for a in os.environ.get("QRLORA_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
    gencode = []
    for a in archs:
        a = a.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    print(f"qrlora_kernels: building the CUDA extension for sm_{', sm_'.join(archs)} "
          f"with the toolkit at {cuda_home}")
    return cpp_extension.CUDAExtension(
        "qrlora_kernels._C", sources + cu_sources,
        include_dirs=cuda_include_dirs(cuda_home),
        # Archs joined by "_": ';' and ',' do not survive the compiler command line intact.
        define_macros=[("QRLORA_WITH_CUDA", "1"),
                       ("QRLORA_CUDA_ARCHS", "_".join(a.replace(".", "") for a in archs))],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *gencode]},
        extra_link_args=link_flags,
    )


def main():
    extension = make_extension()  # first: it decides CUDA_HOME before cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="qrlora-kernels",
        version="0.1.0",
        description="QR-LoRA (arXiv 2508.21810): pivoted-QR adapters with fused Triton kernels",
        packages=find_packages(include=["qrlora_kernels", "qrlora_kernels.*"]),
        python_requires=">=3.10",
        install_requires=["torch>=2.6", "numpy", "safetensors", "tqdm"],
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
