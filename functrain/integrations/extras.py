"""The optional packages the integrations use.

Each is imported when a callback is built, or a clear error is raised.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from functrain.errors import ConfigError

__all__ = ["require"]


def require(package: str, user: str) -> ModuleType:
    """Import `package` (the extra of the same name installs it) for `user`, a class name.

    Raises:
        ConfigError: the package is not installed, naming the install line.

    Example:
        >>> require("json", "JsonThing").dumps([1])
        '[1]'
    """
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ConfigError(
            f"{user} needs the {package!r} package, which is not installed here: pip install "
            f"'functrain[{package}]'"
        ) from e
