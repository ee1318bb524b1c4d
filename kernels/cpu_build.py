"""Building the C++ CPU attention op: one variant per instruction set, cached per build, built once per machine.

The op's vector code is written for the width of the instruction set it is compiled for (16 fp32 lanes on
AVX-512, 8 on AVX2), so a binary built with ``-march=native`` on one host is slow or illegal on another.
Each variant is compiled with explicit ISA flags and the best one the CPU reports is loaded;
``MEGAKV_CPU_ISA`` forces one (for example ``avx2`` on an AVX-512 host, which is how tests cover both).

Builds are cached in ``$MEGAKV_CACHE_DIR`` (default ``~/.cache/megakv``) in a folder named by a hash of
everything the binary depends on (source, flags, compiler, torch and Python), so two environments of one
machine never rebuild over each other. An exclusive file lock (``fcntl``: the kernel drops it when its
holder dies, even by SIGKILL) makes one process build while the others of a job wait, for at most
``MEGAKV_CPU_BUILD_TIMEOUT`` seconds and with a message; the builder first removes the ``lock`` file that
torch's own build leaves behind when its process is killed, on which torch would otherwise wait forever.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock, Timeout

# One translation unit, in this order: the KV server's loop calls the attention and store ops, and the
# decode layer's ops use the attention op's vector loads.
SOURCES = tuple(Path(__file__).with_name(name) for name in (
    "paged_attention_cpu.cpp", "kv_server_cpu.cpp", "linear_cpu.cpp", "norm_rotary_cpu.cpp"))
FUNCTIONS = ["paged_attention", "merge_partials", "store_kv", "kv_serve", "kv_merge_answers",
             "kv_send_query", "linear", "rms_norm", "rotary_embedding"]
COMMON_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]
# A waiting process says why it waits after this long (a build takes 30-60 s on two cores).
WAIT_MESSAGE_AFTER_S = 2.0
DEFAULT_BUILD_TIMEOUT_S = 600.0


@dataclasses.dataclass(frozen=True)
class Variant:
    """One build of the op: its instruction set, the CPU flags it needs and the compiler flags it uses."""

    isa: str
    cpu_flags: tuple[str, ...]
    cflags: tuple[str, ...]


# Best first. The generic build is plain C++ vectors that the compiler lowers to whatever the target has.
VARIANTS = (
    # AVX-512 with bf16 dot products (vdpbf16ps), which the linear op uses for bf16 weights.
    Variant("avx512_bf16", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "f16c"),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c",
             "-DMEGAKV_VEC_WIDTH=16")),
    Variant("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DMEGAKV_VEC_WIDTH=16")),
    Variant("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c", "-DMEGAKV_VEC_WIDTH=8")),
    Variant("generic", (), ("-DMEGAKV_VEC_WIDTH=8",)),
)
VARIANTS_BY_ISA = {variant.isa: variant for variant in VARIANTS}


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the CPU reports (Linux /proc/cpuinfo); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo, or None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (for benchmark reports)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``), empty where the OS does not say."""
    return _cpuinfo_field("vendor_id") or ""


@functools.cache
def runnable_isas() -> tuple[str, ...]:
    """The variants this CPU can execute, best first."""
    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return tuple(variant.isa for variant in VARIANTS
                 if variant.isa == "generic" or (x86 and set(variant.cpu_flags) <= flags))


def selected_isa() -> str:
    """``MEGAKV_CPU_ISA`` when set (checked against the CPU), else the best variant the CPU can run."""
    runnable = runnable_isas()
    forced = os.environ.get("MEGAKV_CPU_ISA", "").strip().lower()
    if not forced:
        return runnable[0]
    if forced not in VARIANTS_BY_ISA:
        raise ValueError(f"MEGAKV_CPU_ISA={forced!r} is not one of {', '.join(VARIANTS_BY_ISA)}")
    if forced not in runnable:
        raise ValueError(f"MEGAKV_CPU_ISA={forced!r}: this CPU can run only {', '.join(runnable)}")
    return forced


def _compiler_version() -> str:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return compiler
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return compiler  # the build itself will say what is wrong with it


def cache_root() -> Path:
    """Where builds are kept: ``$MEGAKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/megakv`` or ``~/.cache/megakv``."""
    if os.environ.get("MEGAKV_CACHE_DIR"):
        return Path(os.environ["MEGAKV_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megakv"


def build_name(variant: Variant) -> str:
    """The module name of a variant's build: its ISA and a hash of everything the binary depends on."""
    key = hashlib.sha256()
    flags = " ".join(COMMON_FLAGS + list(variant.cflags))
    for part in (*(source.read_text() for source in SOURCES), flags, _compiler_version(), torch.__version__,
                 str(torch.version.git_version), sys.version, platform.machine()):
        key.update(part.encode())
        key.update(b"\0")
    return f"megakv_cpu_attention_{variant.isa}_{key.hexdigest()[:16]}"


def _import_built(name: str, folder: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, folder: Path, variant: Variant) -> ModuleType:
    from torch.utils.cpp_extension import load_inline

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    # Only a dead builder leaves torch's baton behind: this process holds the lock every builder takes.
    (folder / "lock").unlink(missing_ok=True)
    try:
        module = load_inline(name, cpp_sources=[source.read_text() for source in SOURCES], functions=FUNCTIONS,
                             extra_cflags=COMMON_FLAGS + list(variant.cflags), extra_ldflags=["-fopenmp"],
                             build_directory=str(folder))
    except RuntimeError as error:
        # torch's message is the whole compiler log; the first error line is what a user can act on.
        lines = str(error).splitlines()
        first_error = next((line for line in lines[1:] if "error" in line.lower()), lines[-1] if lines else "")
        raise RuntimeError(f"the build in {folder} failed: {first_error.strip()}") from None
    (folder / "complete").touch()
    return module


def build_timeout() -> float:
    """Seconds a process waits for another one's build: ``MEGAKV_CPU_BUILD_TIMEOUT``, default 600."""
    text = os.environ.get("MEGAKV_CPU_BUILD_TIMEOUT", "")
    if not text:
        return DEFAULT_BUILD_TIMEOUT_S
    try:
        timeout = float(text)
    except ValueError:
        timeout = float("nan")
    if not 0 <= timeout < float("inf"):
        raise ValueError(f"MEGAKV_CPU_BUILD_TIMEOUT={text!r} is not a number of seconds >= 0")
    return timeout


def load_variant(isa: str) -> ModuleType:
    """The op built for ``isa``: loaded from the cache, or built now (one process at a time per build).

    Raises RuntimeError when another process holds the build lock past the timeout, and whatever the
    compiler's failure raises; the caller falls back to the torch path.
    """
    variant = VARIANTS_BY_ISA[isa]
    name = build_name(variant)
    folder = cache_root() / "cpu_ops" / name
    if (folder / "complete").exists():
        return _import_built(name, folder)
    folder.mkdir(parents=True, exist_ok=True)
    timeout = build_timeout()
    lock = FileLock(str(folder) + ".lock")
    start = time.monotonic()
    try:
        lock.acquire(timeout=min(WAIT_MESSAGE_AFTER_S, timeout))
    except Timeout:
        print(f"megakv: waiting up to {timeout:.0f} s for another process building the CPU attention op in "
              f"{folder}", file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=max(0.0, timeout - (time.monotonic() - start)))
        except Timeout:
            raise RuntimeError(f"another process held the build lock {lock.lock_file} for over {timeout:.0f} s "
                               "(MEGAKV_CPU_BUILD_TIMEOUT)") from None
    try:
        if (folder / "complete").exists():
            return _import_built(name, folder)
        return _build(name, folder, variant)
    finally:
        lock.release()
