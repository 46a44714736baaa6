"""Built-in merge methods, one small module each. Importing this package imports (and so registers) every
module in it: adding a method is adding a file."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
