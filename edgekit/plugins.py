"""Plugin discovery shared by compiler backends and runtime adapters: a plugin is one module in a package.

Modules are imported to find their plugin class; the heavy libraries they wrap are imported inside
methods, so discovery stays fast and works where those libraries are not installed.
"""

import importlib
import importlib.util
import pkgutil
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")


def discover(package: ModuleType, base: type[T]) -> dict[str, type[T]]:
    """Map each plugin's `name` to its class, for every concrete subclass of `base` in the package's modules."""
    found: dict[str, type[T]] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        if module_info.name.startswith("_") or module_info.ispkg:
            continue
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, base) and value.__module__ == module.__name__:
                found[value.name] = value
    return found


def installed(module: str) -> bool:
    """Whether a plugin's library can be imported here, without importing it."""
    return importlib.util.find_spec(module) is not None
