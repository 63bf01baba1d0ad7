"""Maps the top-level folders grids/ and backends/ to qexport.grids and qexport.backends."""
from setuptools import find_packages, setup

ROOTS = {"qexport": "qexport", "qexport.grids": "grids", "qexport.backends": "backends"}
packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]
setup(packages=packages, package_dir=ROOTS)
