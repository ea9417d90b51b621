"""Package discovery only; metadata lives in pyproject.toml.

The top-level folders install under one import name, `edgefleet` (`edgefleet.cloud` is `cloud/`), so the
distribution claims no generic top-level name such as `cloud` in a user's site-packages. `edgefleet` itself is a
namespace package: no folder named `edgefleet` exists in the tree to shadow the installed one. Works for normal and
editable installs (checked with pip 24+ and setuptools 69+).
"""

from setuptools import find_packages, setup

ROOTS = ("common", "cloud", "edge_agent", "fleet", "protos", "sdk")

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ROOTS:
    packages += ["edgefleet." + p for p in find_packages(include=[root, root + ".*"])]
    package_dir["edgefleet." + root] = root

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "edgefleet.cloud": ["catalog/*.toml", "migrations/*.ini", "migrations/script.py.mako"],
        "edgefleet.protos": ["*.proto", "*.pyi"],
    },
    include_package_data=False,
)
