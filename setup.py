"""Builds every top-level .pyx into a C extension (language_level=3).

python setup.py build_ext --inplace
"""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
MODULES = sorted(p.stem for p in HERE.glob("*.pyx"))

setup(
    name="azaion-loader",
    version="1.0.0",
    ext_modules=cythonize(
        [Extension(name, [f"{name}.pyx"]) for name in MODULES],
        compiler_directives={"language_level": "3", "embedsignature": True},
        nthreads=2,
    ),
    zip_safe=False,
)
