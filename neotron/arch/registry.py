"""Name -> (config class, module class) registries for mixers, FFNs and linears.

A layer type is chosen in YAML by its `type:` field. Each registered config class declares
`type: Literal["name"]`, so the config schema (neotron.config) can build a pydantic
discriminated union from whatever is registered: adding a block is one file in arch/ with
one `@REGISTRY.register(...)` decorator, and its YAML validates with no other edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args

from pydantic import Field

from neotron.strict import StrictModel


class LayerConfig(StrictModel):
    """Base of every layer config; subclasses set `type: Literal["..."] = "..."`."""

    type: str


@dataclass(frozen=True)
class Entry:
    name: str
    config_cls: type[LayerConfig]
    module_cls: type


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, config_cls: type[LayerConfig]):
        """Class decorator: register a module class under its config's `type` literal."""
        (name,) = get_args(config_cls.model_fields["type"].annotation)

        def deco(module_cls: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.kind} type '{name}' registered twice")
            self._entries[name] = Entry(name, config_cls, module_cls)
            return module_cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} type '{name}' (allowed: {', '.join(self.names())})")
        return self._entries[name]

    def build(self, cfg: LayerConfig, *args: Any, **kwargs: Any) -> Any:
        return self.get(cfg.type).module_cls(*args, cfg=cfg, **kwargs)

    def config_union(self) -> Any:
        """The pydantic type that validates any registered config of this kind."""
        classes = [e.config_cls for e in self._entries.values()]
        if len(classes) == 1:
            return classes[0]
        return Annotated[Union[tuple(classes)], Field(discriminator="type")]


MIXERS = Registry("mixer")
FFNS = Registry("ffn")
LINEARS = Registry("linear")
