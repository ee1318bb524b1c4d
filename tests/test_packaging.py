"""megakv installs and imports cleanly: a non-editable wheel holds every package and serves a request, and the
repository root, on sys.path under `python -m pytest` or `python -c`, shadows no package of PyPI."""
from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``argv`` with the repository root as the working directory, which Python puts first on sys.path."""
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_repository_root_does_not_shadow_hugging_face_kernels():
    # transformers imports Hugging Face's `kernels` package; megakv's top-level kernels/ folder must not stand in
    # for it. The folder is no regular package (megakv.kernels links to it), so an installed one wins.
    proc = run_in_root([sys.executable, "-c", "import importlib.util, transformers.activations; "
                                              "print(importlib.util.find_spec('kernels').origin)"])
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.strip().startswith(str(ROOT / "kernels")), proc.stdout
    proc = run_in_root([sys.executable, "-c", "import megakv.kernels.ops"])
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_python_m_pytest_and_pytest_collect_the_same_tests():
    collected = []
    for argv in ([sys.executable, "-m", "pytest"], [str(Path(sys.executable).with_name("pytest"))]):
        proc = run_in_root([*argv, "--collect-only", "-q", "-p", "no:cacheprovider"])
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        collected.append(sorted(line for line in proc.stdout.splitlines() if "::" in line))
    assert collected[0] == collected[1] and len(collected[0]) > 1000


@pytest.mark.slow
def test_wheel_in_a_clean_venv_generates(tmp_path, megakv_checkpoint):
    checkpoint = megakv_checkpoint("gqa", 1)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(ROOT),
                    "--wheel-dir", str(tmp_path / "wheels")], check=True, cwd=ROOT, timeout=600)
    (wheel,) = (tmp_path / "wheels").glob("megakv-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The clean venv reuses this environment's torch and other dependencies through a path entry; the
    # editable install of megakv there is a .pth hook, which a plain path entry does not run.
    venv_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=600)
    where = subprocess.run([str(python), "-c", "import megakv.kvcache, megakv.kernels; print(megakv.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)
    proc = subprocess.run([str(venv / "bin" / "megakv"), "generate", "--model", str(checkpoint), "--prompt-ids",
                           "1,2,3", "--max-new-tokens", "4", "--json"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (output,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert output["prompt_ids"] == [1, 2, 3] and len(output["token_ids"]) == 4
