"""Which GPUs the built extension has kernels for.

setup.py writes the ``TORCH_CUDA_ARCH_LIST`` it built with to ``partialfc/_build_info.py``. A GPU of
compute capability X.Y runs machine code built for X.y with y <= Y (the same major generation), or PTX
built for any capability <= X.Y, which the driver compiles on first use. Anything else fails on the first
kernel launch with "no kernel image is available for execution on the device"; ``covers`` tells it in
advance so the package can fall back to the reference ops with a message instead.
"""


def parse_arch_list(text):
    """``"8.0;9.0+PTX"`` -> ``[(8, 0, False), (9, 0, True)]``; also accepts spaces and "sm_90"-free forms."""
    archs = []
    for item in (text or "").replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        version = item[:-4] if ptx else item
        major, _, minor = version.partition(".")
        try:
            archs.append((int(major), int(minor or 0), ptx))
        except ValueError:
            raise ValueError(f"bad CUDA architecture {item!r} in {text!r} (expected e.g. '8.0' or '9.0+PTX')")
    return archs


def covers(capability, arch_list):
    """True when a GPU of ``capability`` (major, minor) can run code built for ``arch_list``."""
    major, minor = capability
    for arch_major, arch_minor, ptx in parse_arch_list(arch_list):
        if arch_major == major and arch_minor <= minor:
            return True  # machine code of the same generation
        if ptx and (arch_major, arch_minor) <= (major, minor):
            return True  # PTX, compiled by the driver
    return False


def built_arch_list():
    """The ``TORCH_CUDA_ARCH_LIST`` the extension was built with; None when unknown or built without CUDA."""
    try:
        from .. import _build_info
    except ImportError:
        return None
    return _build_info.CUDA_ARCH_LIST
