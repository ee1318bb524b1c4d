"""Building the C++ CPU op: variants by instruction set, a cache keyed by what the build depends on, and a
build lock that survives a killed builder and never makes anyone wait silently or without bound."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from megakv.kernels import cpu_build

# Loads the op the way the engine does and says which build it got.
LOAD = ("import sys; from megakv.kernels import cpu_attention, cpu_build; "
        "module = cpu_attention.load_extension(); print('loaded' if module is not None else 'fallback', "
        "cpu_build.selected_isa(), flush=True)")


def loader(cache: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MEGAKV_CACHE_DIR": str(cache), "MEGAKV_CPU_ISA": "generic", **env},
                            start_new_session=True)


def build_folder(cache: Path, isa: str = "generic") -> Path:
    return cache / "cpu_ops" / cpu_build.build_name(cpu_build.VARIANTS_BY_ISA[isa])


def test_cpu_build_runnable_isas_follow_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", "sse2"}))
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    cpu_build.runnable_isas.cache_clear()
    try:
        assert cpu_build.runnable_isas() == ("avx2", "generic")
        monkeypatch.setenv("MEGAKV_CPU_ISA", "avx512")
        with pytest.raises(ValueError, match="MEGAKV_CPU_ISA='avx512': this CPU can run only avx2, generic"):
            cpu_build.selected_isa()
        monkeypatch.setenv("MEGAKV_CPU_ISA", "sse9")
        with pytest.raises(ValueError, match="MEGAKV_CPU_ISA='sse9' is not one of avx512_bf16, avx512, avx2, generic"):
            cpu_build.selected_isa()
        monkeypatch.delenv("MEGAKV_CPU_ISA")
        assert cpu_build.selected_isa() == "avx2"
    finally:
        cpu_build.runnable_isas.cache_clear()


def test_cpu_build_name_is_keyed_by_what_the_build_depends_on(monkeypatch):
    names = {variant.isa: cpu_build.build_name(variant) for variant in cpu_build.VARIANTS}
    assert len(set(names.values())) == len(names) and all(names[isa].startswith(f"megakv_cpu_attention_{isa}_")
                                                          for isa in names)
    monkeypatch.setattr(torch, "__version__", "0.0.0-another-torch")
    assert cpu_build.build_name(cpu_build.VARIANTS_BY_ISA["avx2"]) != names["avx2"]


@pytest.mark.parametrize("text", ["soon", "-1", "inf"])
def test_cpu_build_timeout_rejects_a_bad_value(monkeypatch, text):
    monkeypatch.setenv("MEGAKV_CPU_BUILD_TIMEOUT", text)
    with pytest.raises(ValueError, match=f"MEGAKV_CPU_BUILD_TIMEOUT='{text}'"):
        cpu_build.build_timeout()


def test_cpu_build_lock_held_elsewhere_waits_with_a_message_then_falls_back(tmp_path):
    folder = build_folder(tmp_path)
    folder.parent.mkdir(parents=True)
    with FileLock(str(folder) + ".lock"):
        start = time.monotonic()
        proc = loader(tmp_path, MEGAKV_CPU_BUILD_TIMEOUT="4")
        out, err = proc.communicate(timeout=120)
        waited = time.monotonic() - start
    assert proc.returncode == 0, err
    assert out.split() == ["fallback", "generic"]
    assert "waiting up to 4 s for another process building the CPU attention op" in err
    assert "held the build lock" in err and "using the slower torch path" in err
    assert 4 <= waited < 60


@pytest.mark.slow
def test_cpu_build_killed_mid_build_then_one_of_two_processes_builds(tmp_path):
    folder = build_folder(tmp_path)
    victim = loader(tmp_path)
    # torch's build baton appears when the compile starts; kill the builder and its compiler then.
    deadline = time.monotonic() + 120
    while not (folder / "lock").exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.stderr.read()
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert (folder / "lock").exists() and not (folder / "complete").exists()
    # Two processes of one job start together: one builds, the other waits and says so, both load the op.
    procs = [loader(tmp_path), loader(tmp_path)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    assert [out.split() for out, _ in results] == [["loaded", "generic"]] * 2
    assert sum("waiting up to" in err for _, err in results) == 1
    assert (folder / "complete").exists() and not (folder / "lock").exists()
    # Later processes load the cached build without compiling.
    start = time.monotonic()
    out, err = loader(tmp_path).communicate(timeout=120)
    assert out.split() == ["loaded", "generic"] and time.monotonic() - start < 20, err


def test_cpu_build_without_a_compiler_falls_back_with_one_warning(tmp_path):
    script = LOAD + "; cpu_attention.load_extension()"
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MEGAKV_CACHE_DIR": str(tmp_path), "CXX": "/nonexistent/c++",
                                            "MEGAKV_CPU_ISA": "generic"})
    assert proc.returncode == 0 and proc.stdout.split() == ["fallback", "generic"], proc.stderr
    assert proc.stderr.count("UserWarning: megakv: CPU paged-attention op") == 1
    assert "no C++ compiler: '/nonexistent/c++' is not on PATH" in proc.stderr
