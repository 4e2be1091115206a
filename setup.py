"""Install metadata of partialfc and the build of its compiled extension ``partialfc._C``.

    python setup.py build_ext --inplace     # build partialfc/_C*.so next to the sources
    pip install --no-build-isolation -e .  # editable install against the installed torch (builds _C too)

The CPU kernels are always built. The CUDA kernels are built when this torch has CUDA and nvcc is found;
``PARTIALFC_FORCE_CUDA=1`` builds them regardless of the torch build (nvcc must exist),
``PARTIALFC_NO_CUDA=1`` skips them. GPU architectures default to the data-center and workstation generations
this nvcc can target (Turing sm_75 to Blackwell), the build machine's own GPUs, and PTX of the newest, which
the driver compiles for any later GPU; ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;8.6;9.0+PTX") overrides them. The
list built goes to ``partialfc/_build_info.py``, so the package can tell a GPU it has no kernels for.
``MAX_JOBS`` caps parallel compile jobs.
"""
import glob
import os
import re
import subprocess

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# sm_75 T4, sm_80 A100, sm_86 A10/RTX 30, sm_89 L4/L40, sm_90 H100/H200, sm_100 B200, sm_120 RTX 50 / RTX PRO.
CANDIDATE_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def nvcc_archs(nvcc):
    """The real architectures ``nvcc`` can compile for, as "8.0"-style strings (empty when it cannot say)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [f"{m[:-1]}.{m[-1]}" for m in re.findall(r"sm_(\d+)", out)]


def default_arch_list(supported, local=()):
    """``TORCH_CUDA_ARCH_LIST`` for a build: the candidates and the local GPUs' capabilities that nvcc
    supports (all candidates when it cannot say), in order, the newest also as PTX."""
    wanted = sorted(set(CANDIDATE_ARCHS) | set(local), key=lambda a: tuple(int(x) for x in a.split(".")))
    archs = [a for a in wanted if not supported or a in supported]
    if not archs:
        raise RuntimeError(f"nvcc supports none of the architectures {wanted} (it lists {supported})")
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def write_build_info(arch_list):
    with open(os.path.join(HERE, "partialfc", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CUDA_ARCH_LIST = {arch_list!r}\n")


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        # pip's isolated build environments have no torch: build with `pip install --no-build-isolation -e .`
        print("partialfc: torch is not importable in this build environment, so partialfc._C is NOT built "
              "(the package falls back to its pure-PyTorch ops); use `pip install --no-build-isolation -e .`")
        return [], {}

    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "ops", "*.cpp"))
                     + glob.glob(os.path.join(csrc, "ops", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "ops", "cuda", "*.cu")))

    if _flag("PARTIALFC_NO_CUDA"):
        with_cuda = False
    elif _flag("PARTIALFC_FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("PARTIALFC_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
        with_cuda = True
    else:
        with_cuda = torch.version.cuda is not None and CUDA_HOME is not None

    cxx = ["-O3", "-fopenmp"]
    define_macros = []
    kwargs = dict(include_dirs=[os.path.join(HERE, csrc)], extra_link_args=["-fopenmp"])
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            local = [f"{major}.{minor}" for major, minor in (torch.cuda.get_device_capability(i) for i in
                                                              range(torch.cuda.device_count()))]
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(
                nvcc_archs(os.path.join(CUDA_HOME, "bin", "nvcc")), local)
        write_build_info(os.environ["TORCH_CUDA_ARCH_LIST"])
        define_macros.append(("PARTIALFC_WITH_CUDA", None))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("partialfc._C", sources + cuda_sources, define_macros=define_macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        write_build_info(None)
        ext = CppExtension("partialfc._C", sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx}, **kwargs)
    # Ninja compiles the sources in parallel; at most four jobs unless MAX_JOBS says otherwise.
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":  # (setuptools runs this file as __main__; tests import it for its helpers)
    ext_modules, cmdclass = _extensions()

    setup(
        name="partialfc",
        version="0.1.0",
        description="Partial FC: margin-softmax face-recognition training over millions of identities",
        long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
        long_description_content_type="text/markdown",
        packages=find_packages(include=["partialfc*"]),
        python_requires=">=3.9",
        # torch is deliberately absent: the user's torch build (CPU or a given CUDA) is never replaced.
        install_requires=["numpy"],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
