"""Plugin discovery shared by compiler backends and runtime adapters: a plugin is one module in a package.

Modules are imported to find their plugin class; the heavy libraries they wrap are imported inside
methods, so discovery stays fast and works where those libraries are not installed.
"""

import functools
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


@functools.cache
def installed(module: str) -> bool:
    """Whether a plugin's library can be imported here, without importing it. Asked once per process: the answer
    does not change while it runs, and each find_spec walks sys.path under the interpreter's import lock (an agent
    reports its runtimes with every state; in a 100-agent fleet process, 96 control threads waited on that lock)."""
    return importlib.util.find_spec(module) is not None
