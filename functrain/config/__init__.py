"""Runs from a config file: ``functrain run CONFIG [key=value ...]`` (``python -m functrain run``).

Built on Hydra and OmegaConf (``pip install 'functrain[config]'``; imported on first use, never by
``import functrain``): `load_config` composes a YAML file with Hydra's override grammar,
`build_run` instantiates its ``_target_`` entries into a `ConfiguredRun`, and `cli` is the command.

Why Hydra rather than jsonargparse (Lightning's CLI): a functrain run is a tree of factories
(presets, schedules, callbacks) rather than classes with typed ``__init__`` signatures, and Hydra's
``_target_`` + ``_partial_`` say that directly; its compose API, defaults lists and config groups
are what research code already uses; and its override grammar (``key=value``, ``+key=value``,
``~key``, group choices) is the one users type. jsonargparse builds its parser from type hints,
which a ``Schedule | float`` or a ``Callable`` loss cannot drive.
"""

from functrain.config.build import ConfiguredRun, build_run
from functrain.config.compose import load_config, register_resolvers

__all__ = ["ConfiguredRun", "build_run", "load_config", "register_resolvers"]
