"""Build plumbing: setup.find_cuda_home() sees through a wrapper nvcc, and the extension says what it is."""
import importlib.util
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module_():
    spec = importlib.util.spec_from_file_location("qrlora_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup.py only runs setup() under __main__
    return module


def fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (root / "lib64" / "libcudart.so.13").write_text("")
    return root


def no_standard_locations(module, monkeypatch):
    real = module._is_toolkit
    monkeypatch.setattr(module, "_is_toolkit",
                        lambda p: False if str(p).startswith("/usr/local/cuda") else real(p))


def test_cuda_home_env_is_used_when_it_is_a_toolkit(setup_module_, tmp_path, monkeypatch):
    toolkit = fake_toolkit(tmp_path / "cuda-x")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_module_.find_cuda_home() == str(toolkit)


def test_cuda_home_env_that_is_not_a_toolkit_is_an_error(setup_module_, tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")  # a wrapper's folder: nvcc but no runtime library
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="is not a CUDA toolkit"):
        setup_module_.find_cuda_home()


def test_wrapper_nvcc_is_resolved_to_the_real_toolkit(setup_module_, tmp_path, monkeypatch):
    real = fake_toolkit(tmp_path / "real-cuda")
    wrapper_dir = tmp_path / "wrapper-bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    # Like the wrapper on these machines: it execs the real nvcc, whose dry run names its TOP.
    wrapper.write_text(f"#!/bin/sh\necho '#$ TOP={real}' >&2\nexit 0\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    no_standard_locations(setup_module_, monkeypatch)
    found = setup_module_.find_cuda_home()
    assert found == str(real.resolve())
    # torch's own guess, dirname(dirname(nvcc)), would have been the wrapper's folder.
    assert Path(found) != wrapper_dir.parent


def test_no_nvcc_anywhere_means_no_toolkit(setup_module_, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    no_standard_locations(setup_module_, monkeypatch)
    assert setup_module_.find_cuda_home() is None


def test_toolkit_version_is_read_from_its_nvcc(setup_module_, tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-12")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    assert setup_module_.toolkit_version(str(toolkit)) == "12.4"
    nvcc.write_text("#!/bin/sh\necho 'something else'\n")
    assert setup_module_.toolkit_version(str(toolkit)) is None
    assert setup_module_.toolkit_version(str(tmp_path / "nowhere")) is None


def test_a_toolkit_of_another_cuda_major_than_torch_builds_cpu_only_and_says_why(setup_module_):
    """torch's cpp_extension refuses to build across CUDA majors (nvcc 13 against a torch built with 12.4 failed
    the install outright): the build falls back to CPU-only and names both versions and the way out."""
    why = setup_module_.cuda_mismatch("13.0", "12.4")
    assert "13.0" in why and "12.4" in why and "CUDA_HOME" in why and "12.x" in why
    assert setup_module_.cuda_mismatch("12.8", "12.4") is None  # a minor difference torch only warns about
    assert setup_module_.cuda_mismatch(None, "12.4") is None    # unreadable: torch's own check decides
    assert setup_module_.cuda_mismatch("13.0", None) is None


def fake_wheels(monkeypatch, root: Path) -> Path:
    """An ``nvidia`` namespace package like torch's CUDA wheels: ``cu13/include`` with a CUDA runtime header of
    another release (here one that refuses to compile) beside a library header that a minimal toolkit lacks."""
    include = root / "nvidia" / "cu13" / "include"
    include.mkdir(parents=True)
    for header in ("cuda_runtime.h", "cuda_runtime_api.h"):  # nvcc pre-includes the first from the search path
        (include / header).write_text('#error "the wheels\' runtime header was used"\n')
    (include / "wheel_only_library.h").write_text("#define WHEEL_ONLY_LIBRARY 1\n")
    package = type(os)("nvidia")
    package.__path__ = [str(root / "nvidia")]
    monkeypatch.setitem(sys.modules, "nvidia", package)
    return include


def test_the_toolkits_own_headers_come_before_the_wheels(setup_module_, tmp_path, monkeypatch):
    toolkit = fake_toolkit(tmp_path / "cuda")
    wheel_include = fake_wheels(monkeypatch, tmp_path / "site-packages")
    assert setup_module_.cuda_include_dirs(str(toolkit)) == [str(toolkit / "include"), str(wheel_include)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_nvcc_compiles_with_its_own_runtime_headers_when_the_wheels_carry_another_release(
        setup_module_, tmp_path, monkeypatch):
    """torch 2.15's wheels carry CUDA 13.2's runtime headers; with the wheels' folder first, nvcc 13.0's CCCL
    stopped the build ("CUDA compiler and CUDA toolkit headers are incompatible"). The real nvcc, a source that
    includes both the runtime and a wheel-only header, and the include order setup.py passes."""
    import subprocess
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = setup_module_.find_cuda_home()
    fake_wheels(monkeypatch, tmp_path / "site-packages")
    source = tmp_path / "probe.cu"
    source.write_text("#include <cuda_runtime.h>\n#include <wheel_only_library.h>\n"
                      "__global__ void probe(int* out) { *out = WHEEL_ONLY_LIBRARY; }\n")
    flags = [f"-I{d}" for d in setup_module_.cuda_include_dirs(home)]
    nvcc = str(Path(home) / "bin" / "nvcc")
    out = subprocess.run([nvcc, *flags, "-c", str(source), "-o", str(tmp_path / "probe.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # The probe can fail: with the wheels' folder first the refusing header is the one found.
    reversed_flags = list(reversed(flags))
    out = subprocess.run([nvcc, *reversed_flags, "-c", str(source), "-o", str(tmp_path / "probe.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "the wheels' runtime header was used" in out.stderr


def test_a_build_without_torch_says_to_turn_off_build_isolation(setup_module_, monkeypatch):
    """`pip install .` builds in an isolated environment without torch: the build says why it stops and the
    command that works, instead of "No module named 'torch'"."""
    monkeypatch.setenv("QRLORA_FORCE_CPU", "1")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(SystemExit, match="compiles its extension against the installed torch.*"
                                         "pip install --no-build-isolation"):
        setup_module_.make_extension()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_real_toolkit_on_this_machine(setup_module_, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = setup_module_.find_cuda_home()
    assert home is not None
    assert (Path(home) / "bin" / "nvcc").is_file()
    assert any((Path(home) / lib).glob("libcudart.so*") for lib in ("lib64", "lib"))


def test_build_info_reports_a_kind():
    import torch
    from qrlora_kernels import build_info

    info = build_info()
    assert info["kind"] in ("cpu", "cuda")
    assert isinstance(info["archs"], list)
    if info["kind"] == "cuda":
        assert info["archs"] and all(a.startswith("sm_") for a in info["archs"])
    else:
        assert info["archs"] == []
    assert hasattr(torch.ops.qrlora, "qrcp")


def test_star_import_needs_no_optional_package():
    """``from qrlora_kernels import *`` loads every public name; none may need transformers (not a dependency of
    the package: only QRLoraCheckpointCallback does, and it is left out of __all__ but importable by name)."""
    import subprocess
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from qrlora_kernels import *\n"
            "import qrlora_kernels; assert 'QRLoraCheckpointCallback' in dir(qrlora_kernels)\n"
            "print(sorted(n for n in qrlora_kernels.__all__ if n not in globals()))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
