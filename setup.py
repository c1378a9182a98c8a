"""One distribution, import namespace `baton`: the top-level folders are its subpackages
(backends/ -> baton.backends, kernels/ -> baton.kernels), as laid out in DESIGN.md."""

from setuptools import find_packages, setup

ROOTS = {"baton": "baton", "baton.backends": "backends", "baton.kernels": "kernels", "baton.clients": "clients"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=ROOTS)
