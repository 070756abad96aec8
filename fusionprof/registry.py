"""A name → class registry whose members are the modules of one package (timm-style).

Each module registers its class with ``@REGISTRY.register("name")``; the package's modules are imported on
first use, so adding a member is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from fusionprof.errors import UserError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._members: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str):
        def add(cls: T) -> T:
            if name in self._members:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._members[name] = cls
            cls.registered_name = name
            return cls
        return add

    def _discover(self) -> None:
        if not self._discovered:
            self._discovered = True
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._members)

    def get(self, name: str) -> T:
        if name not in self.names():
            raise UserError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
        return self._members[name]
