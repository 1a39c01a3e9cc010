"""Maps the repository's top-level code folders onto subpackages of ``flowlane``.

The folders ``api/``, ``runtime/``, ``trainer/`` and ``operator/`` show the architecture at the top
of the repository; they import as ``flowlane.api`` and so on. Subpackages are discovered here so a
new folder needs no edit to packaging metadata. Everything else lives in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

CODE_FOLDERS = {"flowlane": "flowlane", "api": "flowlane.api", "runtime": "flowlane.runtime",
                "trainer": "flowlane.trainer", "operator": "flowlane.operator"}

package_dir: dict[str, str] = {}
packages: list[str] = []
for folder, package in CODE_FOLDERS.items():
    package_dir[package] = folder
    packages.append(package)
    for sub in find_packages(folder):
        packages.append(f"{package}.{sub}")
        package_dir[f"{package}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
