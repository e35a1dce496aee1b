"""megappo: a Megatron-core RL trainer for LLMs (PPO/GAE, GRPO, LitePPO; SGLang rollout)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "megappo" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="megappo",
    version=VERSION,
    description="A Megatron-core reinforcement-learning trainer for LLMs: PPO/GAE, GRPO, LitePPO; SGLang rollout",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*"]),
    # SGLang-on-CPU stand-ins (megappo/parallel/sglang_cpu/shims): not a package, shipped as data.
    package_data={"megappo.parallel.sglang_cpu": ["shims/*.py", "shims/*/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        # Unpinned range here; `make` pins the CPU wheel through constraints.txt (PIP_CONSTRAINT).
        "torch>=2.6",
        # On Python < 3.12 pip offers only 0.16.1 (later releases declare Requires-Python >= 3.12).
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
        "pyyaml>=6.0",
        "tensorboard>=2.14",
        "transformers>=4.56",  # `dtype=` keyword; SGLang 0.5.18-0.5.21 pin a 5.x release
        "safetensors>=0.4",
        "tqdm",
        "psutil",  # megatron-core's checkpointing imports it without declaring it
        "pyarrow",  # parquet prompt files
        "math-verify>=0.8",  # reward.fn: math_verify
        "matplotlib",  # metrics plots (the demo)
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "pytest-timeout>=2", "math-verify>=0.8", "matplotlib", "pyarrow", "wandb>=0.20"],
        "wandb": ["wandb>=0.20"],  # logging.wandb
        "math": ["math-verify>=0.8"],
        # GPU only (sglang-kernel ships CUDA wheels); these releases pin torch==2.13.0.
        "sglang": ["sglang>=0.5.18,<=0.5.23"],
        # GPU only: never install Transformer Engine in a CPU environment (it breaks `import megatron.core`).
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megappo-train = megappo.train:main", "megappo-train-rm = megappo.train_rm:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
