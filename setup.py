"""dlm: discrete diffusion language models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="dlm",
    version="0.1.0",
    description="Masked, block and energy-based discrete diffusion language models in JAX.",
    packages=setuptools.find_packages(
        include=["dlm", "dlm.*", "experiments", "configs", "pallas_kernels"]),
    package_data={"dlm.data": ["corpora/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "jaxlib>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.7,<0.9",
        "grain>=0.2.12,<0.3",
        "chex>=0.1.90,<0.2",
        "absl-py>=2.1,<3",
        "ml-collections>=1.0,<2",
        "tokenizers>=0.21,<1",
        # Pretrained folders: their safetensors weights and their Jinja chat templates.
        "safetensors>=0.4,<1",
        "jinja2>=3.1,<4",
        "numpy>=1.26,<3",
        "tensorboardX>=2.6,<3",
    ],
    extras_require={
        "dev": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",
            "ruff>=0.9,<1",
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "matplotlib>=3.8,<4",
        ],
        "torch": ["torch==2.13.0", "safetensors>=0.4,<1", "transformers>=5,<6"],
        # The lm-evaluation-harness adapter (experiments/lm_eval_harness.py).
        "harness": ["lm_eval>=0.4.5,<0.5"],
    },
)
