"""Distribution ``spatext``: the folders pipeline/, model/ and eval/ install as spatext.pipeline/.model/.eval.

setup.py (not only pyproject) exists so that Dataflow workers can receive the code via ``--setup_file ./setup.py``.
"""

from setuptools import setup

PACKAGES = {
    "spatext": "spatext",
    "spatext.pipeline": "pipeline",
    "spatext.pipeline.segmenters": "pipeline/segmenters",
    "spatext.model": "model",
    "spatext.eval": "eval",
}

setup(
    name="spatext",
    version="0.1.0",
    description="Spatio-textual training data, models and evaluation for SpaText-style text-to-image generation",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={
        "spatext.pipeline": ["configs/*.json", "configs/open_clip/*.json"],
        "spatext.model": ["configs/*.json"],
    },
    install_requires=[
        "apache-beam>=2.60",
        "torch>=2.4",
        "torchvision",
        "open_clip_torch>=2.24",
        "transformers>=4.40",
        "diffusers>=0.30",
        "accelerate",
        "safetensors",
        "torchmetrics>=1.4",
        "scipy",
        "pyarrow>=14",
        "fsspec",
        "numpy",
        "pillow>=9.4",  # ImageOps.exif_transpose(in_place=True)
        "tqdm",
    ],
    extras_require={
        "fid": ["torch-fidelity"],
        "test": ["pytest", "pytest-timeout", "ruff", "duckdb", "datasets"],
    },
    entry_points={"console_scripts": ["spatext = spatext.cli:main"]},
)
