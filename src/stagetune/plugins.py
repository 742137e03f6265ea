"""Plugins: encoders and tasks that installed packages provide through entry points.

A distribution declares, in its ``pyproject.toml``::

    [project.entry-points."stagetune.encoders"]
    tdnn = "stagetune_tdnn:plugin"

    [project.entry-points."stagetune.tasks"]
    mytask = "my_package:task_plugin"

The entry point's name is the encoder's (``model.encoder = tdnn``) or the task's
(``model.task = mytask``) and its section's (``[tdnn]``); it loads a
:class:`Plugin`, which must import without torch (``stagetune --help`` and the
config layer never import torch): the dataclass of its section, whose fields
are declared with :func:`~stagetune.space.param` like the built-in ones, and
the ``"module:attribute"`` of what builds the model part, imported only when a
model is built:

* an encoder: ``(section_config, feat_dim, config) -> nn.Module`` (a class or a
  function) whose module has ``encode(feats (B, T, F), feat_lens (B,)) ->
  (states (B, T', H), out_lens (B,))`` and ``state_dim`` (``H``), and should
  have ``time_stride`` (its total time subsampling) and
  ``output_lengths(feat_lens) -> out_lens`` (exact output frames of an int,
  array or tensor; see :class:`stagetune.model.AcousticModel`).  CTC's
  feasibility check (:mod:`stagetune.feasibility`) reads them from the encoder
  built on the meta device; an encoder without them is measured by running it
  on zeros of a few lengths (:func:`stagetune.model.measure_output_lengths`),
  which ``encode`` must then allow;
* a task: a :class:`~stagetune.tasks.base.Task` subclass (or instance).

:func:`load_plugins` finds them once (every config read calls it): each
section joins :data:`stagetune.config.SECTIONS`, so ``--set tdnn.context=3``,
INI files, stored configs and the search space see its fields, which only
apply, and are only sampled, while the plugin is chosen; each name joins the
choices of ``model.encoder`` or ``model.task``.  A plugin that cannot load or
takes a name already used is a one-line :class:`ConfigError` naming its
distribution.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from stagetune.config import ENCODERS, TASKS, extend_choices, register_section
from stagetune.errors import ConfigError
from stagetune.space import When

__all__ = ["Plugin", "GROUPS", "load_plugins", "encoder_builder", "plugin_tasks", "plugin_names"]

#: Entry point group -> the config field whose choices its names join.
GROUPS = {"stagetune.encoders": "model.encoder", "stagetune.tasks": "model.task"}
#: What each group's names may not be: the built-in encoders and tasks.
_BUILTIN = {"stagetune.encoders": ENCODERS, "stagetune.tasks": TASKS}


@dataclass(frozen=True)
class Plugin:
    """What an entry point loads: a plugin's section and what builds its model part.

    Attributes:
        build: ``"module:attribute"`` of the encoder factory or the Task
            (sub)class, imported when first needed.
        section: The dataclass of the plugin's INI section (named like the entry
            point), or None for a plugin without settings.
        reads: A task plugin's targets: which built-in task's label files a data
            dir holds for it (``"ctc"``: ``text`` + ``tokens.txt``, ``"frame"``:
            ``utt2label``, ``"utt"``: ``utt2class``; see :func:`target_format`).
    """

    build: str
    section: type | None = None
    reads: str | None = None


@dataclass(frozen=True)
class _Loaded:
    name: str
    group: str
    plugin: Plugin
    where: str  # "plugin 'tdnn' (stagetune.encoders) of distribution 'stagetune-tdnn'"


_LOADED: dict[str, dict[str, _Loaded]] = {}
_BUILT: dict[tuple[str, str], Any] = {}
_ERROR: ConfigError | None = None


def _describe(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    owner = f"distribution {dist.name!r}" if dist is not None else "an unknown distribution"
    return f"plugin {ep.name!r} ({ep.group}) of {owner}"


def load_plugins() -> None:
    """Find and register every installed plugin, once.

    Raises:
        ConfigError: A plugin cannot be imported, is not a :class:`Plugin`, takes
            a name already used or declares an invalid section (again on every
            later call).
    """
    global _ERROR
    if _ERROR is not None:
        raise _ERROR
    if _LOADED:
        return
    loaded: dict[str, dict[str, _Loaded]] = {group: {} for group in GROUPS}
    _LOADED.update(loaded)  # marks loading begun: a config read while loading does not recurse
    try:
        for group, field in GROUPS.items():
            for ep in sorted(entry_points(group=group), key=lambda e: e.name):
                _register(ep, group, field, loaded[group])
    except ConfigError as exc:
        _ERROR = exc
        raise


def _register(ep: EntryPoint, group: str, field: str, loaded: dict[str, _Loaded]) -> None:
    where = _describe(ep)
    if ep.name in _BUILTIN[group]:
        raise ConfigError(f"{where}: {ep.name!r} is a built-in name; the plugin must use another")
    if ep.name in loaded:
        raise ConfigError(f"{where}: {ep.name!r} is also the name of {loaded[ep.name].where}; uninstall one")
    try:
        plugin = ep.load()
    except Exception as exc:  # whatever the plugin's import raises
        raise ConfigError(f"{where}: cannot load {ep.value!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(plugin, Plugin):
        raise ConfigError(f"{where}: {ep.value!r} is a {type(plugin).__name__}, not a stagetune.plugins.Plugin")
    if plugin.section is not None:
        try:
            register_section(ep.name, plugin.section, when=When(field, "==", ep.name))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if group == "stagetune.tasks" and plugin.reads not in _TARGET_FORMATS:
        raise ConfigError(
            f"{where}: a task plugin must say which targets it reads: Plugin(reads=...) one of "
            f"{', '.join(_TARGET_FORMATS)}, got {plugin.reads!r}"
        )
    extend_choices(field, [ep.name])
    loaded[ep.name] = _Loaded(ep.name, group, plugin, where)


#: The label formats a data dir can hold (:func:`stagetune.kaldi.load_data_dir`'s tasks).
_TARGET_FORMATS = ("ctc", "frame", "utt")


def target_format(task: str) -> str:
    """The label format a data dir holds for ``task``: a built-in task's own, a plugin's ``reads``.

    Unknown names are returned as they are (:func:`~stagetune.kaldi.load_data_dir` refuses them).
    """
    if task in TASKS:
        return task
    entry = _LOADED.get("stagetune.tasks", {}).get(task) if _loaded_ok() else None
    return entry.plugin.reads if entry is not None and entry.plugin.reads else task


def _loaded_ok() -> bool:
    try:
        load_plugins()
    except ConfigError:
        return False
    return True


def plugin_names(group: str) -> tuple[str, ...]:
    """Names of the loaded plugins of entry point ``group``."""
    load_plugins()
    return tuple(_LOADED.get(group, {}))


def _build(group: str, name: str) -> Any:
    """The object a plugin's :attr:`Plugin.build` names, imported once."""
    load_plugins()
    key = (group, name)
    if key not in _BUILT:
        entry = _LOADED[group][name]
        module, _, attr = entry.plugin.build.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split(".") if attr else ():
                obj = getattr(obj, part)
        except Exception as exc:  # whatever the plugin's import raises
            raise ConfigError(
                f"{entry.where}: cannot load {entry.plugin.build!r}: {type(exc).__name__}: {exc}"
            ) from None
        _BUILT[key] = obj
    return _BUILT[key]


def encoder_builder(name: str) -> Callable[..., Any]:
    """The factory ``(section_config, feat_dim, config) -> module`` of encoder plugin ``name``."""
    if name not in plugin_names("stagetune.encoders"):
        raise ConfigError(f"no encoder plugin {name!r} is installed")
    return _build("stagetune.encoders", name)


def plugin_tasks() -> dict[str, Any]:
    """Task plugin name -> its Task (instantiated when the plugin names a class)."""
    tasks = {}
    for name in plugin_names("stagetune.tasks"):
        task = _build("stagetune.tasks", name)
        task = task() if isinstance(task, type) else task
        if getattr(task, "name", "") not in ("", name):
            raise ConfigError(f"{_LOADED['stagetune.tasks'][name].where}: its task is named {task.name!r}")
        if not getattr(task, "name", ""):
            task.name = name
        tasks[name] = task
    return tasks
