"""Typed configuration: one dataclass per INI section, every field documented.

Each field declares its type, default, documentation, valid bounds and search
space once (see :mod:`stagetune.space`).  This module reads and writes INI
files, applies ``--set section.key=value`` overrides and validates values,
naming the source (file, section, key) of anything wrong.
"""

from __future__ import annotations

import configparser
import dataclasses
import io
import math
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from stagetune.errors import ConfigError
from stagetune.space import ParamSpec, Ref, Space, When, param, spec_of

__all__ = [
    "TASKS",
    "NONLINEARITIES",
    "RECURRENT_TYPES",
    "OPTIMIZERS",
    "NORMALIZATIONS",
    "ModelConfig",
    "TrainingConfig",
    "DataConfig",
    "Config",
    "FieldInfo",
    "SECTIONS",
    "ENCODERS",
    "register_section",
    "extend_choices",
    "iter_fields",
    "field_info",
    "flatten",
    "with_values",
    "read_ini",
    "parse_ini_text",
    "apply_overrides",
    "load_config",
    "write_ini",
    "to_dict",
    "from_dict",
    "active",
    "SUBTASKS",
    "subtasks",
    "task_weights",
    "main_task",
]

#: Tasks (see :mod:`stagetune.tasks`).
TASKS = ("ctc", "frame", "utt", "regress", "multi")
#: Tasks a multitask model (``model.task = multi``) combines (see :mod:`stagetune.tasks.multitask`).
SUBTASKS = ("frame", "regress")
#: ``model.pooling`` values (task ``utt``; see :mod:`stagetune.tasks.utterance`).
POOLINGS = ("mean", "max", "meanstd", "attentive")
#: Built-in encoders (``model.encoder``); plugins add theirs (see :mod:`stagetune.plugins`).
ENCODERS = ("crnn",)
#: Nonlinearities of the convolutional front-end (see :mod:`stagetune.model`).
NONLINEARITIES = ("relu", "gelu", "tanh", "sigmoid")
#: Recurrent cell types (see :mod:`stagetune.model`).
RECURRENT_TYPES = ("lstm", "gru", "rnn")
#: ``model.bidirectional_mode`` values.
BIDIRECTIONAL_MODES = ("layer", "stack")
#: ``model.frame_norm`` values.
FRAME_NORMS = ("none", "layer")
#: Optimizers (see :mod:`stagetune.training`).
OPTIMIZERS = ("adam", "adamw", "sgd")
#: Feature normalisations (see :mod:`stagetune.normalize`).
NORMALIZATIONS = ("auto", "none", "global", "speaker", "utterance")

_CRNN = When("model.encoder", "==", "crnn")
_CONV_ON = (When("model.convolutional_layers", ">", 0), _CRNN)
_RNN_ON = (When("model.recurrent_layers", ">", 0), _CRNN)
_UTT = When("model.task", "==", "utt")
_MULTI = When("model.task", "==", "multi")


@dataclass
class ModelConfig:
    """[model]: conv front-end over (time x frequency) -> recurrent stack -> linear head."""

    task: str = param(
        "ctc",
        "What the model outputs: 'ctc' (token sequences from text, CTC loss), 'frame' "
        "(one class per frame from utt2label, cross-entropy) or 'utt' (one class per "
        "utterance from utt2class, pooled over time), 'regress' (continuous values per frame "
        "from targets.scp or utt2value, MSE loss, CCC) or 'multi' (several of frame and regress "
        "over one encoder, see multitask).",
        choices=TASKS,
    )
    encoder: str = param(
        "crnn",
        "What turns features into the states the task's head reads: 'crnn' (the conv "
        "front-end and recurrent stack of this section) or an encoder an installed plugin "
        "provides, configured in its own section (see stagetune.plugins).",
        choices=ENCODERS,
    )
    convolutional_layers: int = param(
        2,
        "Number of 2D convolutional layers over time x frequency (0 = none).",
        min=0,
        max=12,
        search=Space(0, 4),
        when=_CRNN,
    )
    convolutional_initial_channels: int = param(
        32,
        "Output channels of the first convolutional layer. At most 4096, a sanity bound "
        "(later layers multiply it by convolutional_channel_factor): a typo such as 40960 "
        "is an error here, not an allocation of many gigabytes at training.",
        min=1,
        max=4096,
        search=Space(4, 128, log=True),
        when=_CONV_ON,
    )
    convolutional_kernel_time: int = param(
        3,
        "Kernel width along time of every convolutional layer (odd keeps frames centred).",
        min=1,
        max=15,
        search=Space(1, 7),
        when=_CONV_ON,
    )
    convolutional_kernel_freq: int = param(
        3,
        "Kernel width along frequency of every convolutional layer.",
        min=1,
        max=15,
        search=Space(1, 7),
        when=_CONV_ON,
    )
    convolutional_factor_sched: int = param(
        1,
        "Every this many convolutional layers, strides apply and channels grow; "
        "a value above convolutional_layers means no downsampling.",
        min=1,
        max=Ref("model.convolutional_layers", 1),
        search=Space(1, Ref("model.convolutional_layers", 1)),
        when=_CONV_ON,
    )
    convolutional_time_factor: int = param(
        2,
        "Stride along time at each scheduled layer (output frames shrink by this factor).",
        min=1,
        max=4,
        search=Space(1, 3),
        when=_CONV_ON,
    )
    convolutional_freq_factor: int = param(
        2,
        "Stride along frequency at each scheduled layer.",
        min=1,
        max=4,
        search=Space(1, 3),
        when=_CONV_ON,
    )
    convolutional_channel_factor: int = param(
        2,
        "Channels are multiplied by this at each scheduled layer.",
        min=1,
        max=4,
        search=Space(1, 2),
        when=_CONV_ON,
    )
    convolutional_nonlinearity: str = param(
        "relu",
        "Nonlinearity after each convolution.",
        choices=NONLINEARITIES,
        search=Space(choices=("relu", "gelu", "tanh")),
        when=_CONV_ON,
    )
    frame_norm: str = param(
        "none",
        "Normalisation of each frame the recurrent stack (or, without one, the output layer) "
        "reads: 'none', or 'layer' (LayerNorm over the flattened conv output or features).",
        choices=FRAME_NORMS,
        search=Space(choices=FRAME_NORMS),
        when=_CRNN,
    )
    recurrent_layers: int = param(
        2,
        "Number of stacked recurrent layers (0 = none).",
        min=0,
        max=8,
        search=Space(0, 4),
        when=_CRNN,
    )
    recurrent_size: int = param(
        128,
        "Hidden units per recurrent layer and direction. At most 8192, a sanity bound: two "
        "bidirectional GRU layers of 8192 already hold 1.6 billion weights.",
        min=1,
        max=8192,
        search=Space(16, 512, log=True),
        when=_RNN_ON,
    )
    recurrent_type: str = param(
        "gru",
        "Recurrent cell type.",
        choices=RECURRENT_TYPES,
        search=Space(choices=("lstm", "gru")),
        when=_RNN_ON,
    )
    recurrent_bidirectional: bool = param(
        True,
        "Whether recurrent layers read the utterance in both directions.",
        search=Space(),
        when=_RNN_ON,
    )
    bidirectional_mode: str = param(
        "layer",
        "How a bidirectional recurrent stack is built: 'layer' (every layer reads both "
        "directions of the layer below) or 'stack' (a deep forward stack and a separate deep "
        "backward stack of recurrent_layers each, merged at the top).",
        choices=BIDIRECTIONAL_MODES,
        search=Space(choices=BIDIRECTIONAL_MODES),
        when=(*_RNN_ON, When("model.recurrent_bidirectional", "==", True)),
    )
    pooling: str = param(
        "meanstd",
        "Task 'utt': how frames are pooled into one vector per utterance: 'mean', 'max', "
        "'meanstd' (mean and standard deviation) or 'attentive' (attention-weighted "
        "mean and standard deviation).",
        choices=POOLINGS,
        search=Space(choices=POOLINGS),
        when=_UTT,
    )
    embedding_size: int = param(
        128,
        "Task 'utt': units of the utterance embedding between pooling and the classes "
        "(what `stagetune extract` writes).",
        min=1,
        max=8192,
        search=Space(32, 512, log=True),
        when=_UTT,
    )
    multitask: str = param(
        "frame,regress",
        "Task 'multi': the sub-tasks, comma-separated, each with its own head, targets and "
        "loss over one encoder: 'frame' (utt2label) and 'regress' (targets.scp or utt2value).",
        when=_MULTI,
    )


@dataclass
class TrainingConfig:
    """[training]: optimisation, regularisation, schedule and stopping."""

    num_epochs: int = param(
        40, "Maximum number of training epochs.", min=1, search=Space(5, 40)
    )
    optimizer: str = param("adam", "Optimizer.", choices=OPTIMIZERS, search=Space(choices=("adam", "adamw")))
    learning_rate: float = param(
        4e-3,
        "Peak learning rate (reached after the warm-up).",
        min=1e-12,
        max=10.0,
        search=Space(3e-4, 3e-2, log=True),
    )
    warmup_updates: int = param(
        100,
        "The learning rate rises linearly to learning_rate over this many optimizer "
        "updates (0: no warm-up).",
        min=0,
        search=Space(0, 300),
    )
    momentum: float = param(
        0.9,
        "Momentum of SGD.",
        min=0.0,
        max=0.999,
        search=Space(0.0, 0.99),
        when=When("training.optimizer", "==", "sgd"),
    )
    weight_decay: float = param(
        0.0,
        "Weight decay (L2 for adam/sgd, decoupled for adamw); 0 disables.",
        min=0.0,
        max=1.0,
        search=Space(1e-6, 1e-2, log=True),
    )
    margin: float = param(
        0.0,
        "Task 'utt': additive angular margin (radians) of the target class; 0 = a linear "
        "output layer and plain cross-entropy, > 0 = cosine scores and the angular margin "
        "softmax (ArcFace; 0.2 is common for speaker embeddings).",
        min=0.0,
        max=1.0,
        search=Space(0.0, 0.4),
        when=_UTT,
    )
    margin_scale: float = param(
        30.0,
        "Task 'utt' with margin > 0: scale of the cosine scores.",
        min=1.0,
        max=100.0,
        search=Space(10.0, 64.0, log=True),
        when=When("training.margin", ">", 0.0),
    )
    task_weights: str = param(
        "",
        "Task 'multi': loss weight of each sub-task of model.multitask, comma-separated in "
        "its order (e.g. '1.0,0.5'; the loss is the weighted sum); empty = 1 each.",
        when=_MULTI,
    )
    main_task: str = param(
        "",
        "Task 'multi': the sub-task whose dev error selects the best epoch and drives the "
        "learning-rate schedule, early stopping and optim (regress: 1 - CCC); empty = the "
        "first of model.multitask.",
        when=_MULTI,
    )
    clip_grad_norm: float = param(
        5.0,
        "Clip the global gradient norm to this value; 0 disables.",
        min=0.0,
        search=Space(0.5, 20.0, log=True),
    )
    dropout_prob: float = param(
        0.1,
        "Dropout probability between layers.",
        min=0.0,
        max=0.9,
        search=Space(0.0, 0.4),
    )
    num_time_mask: int = param(
        2, "SpecAugment: number of time masks per utterance.", min=0, max=20, search=Space(0, 4)
    )
    max_time_mask: int = param(
        10,
        "SpecAugment: maximum width of a time mask in frames.",
        min=1,
        search=Space(1, 30),
        when=When("training.num_time_mask", ">", 0),
    )
    num_freq_mask: int = param(
        2,
        "SpecAugment: number of frequency masks per utterance.",
        min=0,
        max=20,
        search=Space(0, 4),
    )
    max_freq_mask: int = param(
        5,
        "SpecAugment: maximum width of a frequency mask in bins.",
        min=1,
        search=Space(1, 15),
        when=When("training.num_freq_mask", ">", 0),
    )
    freq_warp: float = param(
        0.0,
        "Frequency warping: each training utterance's feature axis is stretched by a random "
        "factor in [1 - freq_warp, 1 + freq_warp] (linear interpolation between bins), a "
        "stand-in for vocal tract length perturbation that helps on unseen speakers. Meant for "
        "filterbank features (bins ordered by frequency); leave 0 for cepstra (MFCC).",
        min=0.0,
        max=0.5,
        search=Space(0.0, 0.1),
    )
    noise_eps: float = param(
        0.0,
        "Standard deviation of Gaussian noise added to (normalised) training features.",
        min=0.0,
        search=Space(0.0, 0.3),
    )
    reduce_lr_factor: float = param(
        0.5,
        "Multiply the learning rate by this when the dev error plateaus; 1 disables. "
        "Never while the model still emits only blanks on the dev set.",
        min=0.01,
        max=1.0,
        search=Space(0.1, 0.9),
    )
    reduce_lr_patience: int = param(
        2,
        "Validations (epochs) without improvement before the learning rate is reduced.",
        min=0,
        search=Space(0, 5),
        when=When("training.reduce_lr_factor", "<", 1.0),
    )
    reduce_lr_patience_updates: int = param(
        300,
        "Also needed before a reduction: this many optimizer updates since the dev error "
        "last improved (on a small corpus an epoch is a handful of updates).",
        min=0,
        search=Space(0, 2000),
        when=When("training.reduce_lr_factor", "<", 1.0),
    )
    reduce_lr_threshold: float = param(
        0.0,
        "Relative improvement of the dev error below which an epoch does not count as better.",
        min=0.0,
        max=1.0,
        search=Space(0.0, 0.1),
        when=When("training.reduce_lr_factor", "<", 1.0),
    )
    reduce_lr_burnin_updates: int = param(
        0,
        "Optimizer updates before the learning rate may be reduced (it is never reduced "
        "while a CTC model emits only blanks, whatever this says).",
        min=0,
        search=Space(0, 2000),
        when=When("training.reduce_lr_factor", "<", 1.0),
    )
    early_stopping_threshold: float = param(
        0.0,
        "Relative dev-error improvement needed to reset early-stopping patience; "
        "0 disables early stopping.",
        min=0.0,
        max=1.0,
        search=Space(0.0, 0.1),
    )
    early_stopping_patience: int = param(
        5,
        "Epochs without sufficient improvement before training stops early.",
        min=1,
        search=Space(1, 10),
        when=When("training.early_stopping_threshold", ">", 0.0),
    )
    early_stopping_burnin: int = param(
        0,
        "Epochs before early stopping may trigger.",
        min=0,
        search=Space(0, 10),
        when=When("training.early_stopping_threshold", ">", 0.0),
    )
    adapt_rho: float = param(
        0.0,
        "Only with a base model (`stagetune train --adapt-from BASE.pt`; no effect without one): "
        "the loss is (1 - adapt_rho) x the task loss + adapt_rho x the divergence of the model's "
        "outputs from the base model's (KL(base || model) of the output distributions, MSE for "
        "regression; task 'multi': adapt_rho x w_t per sub-task), keeping the adapted model close "
        "to the base; 0 = plain fine-tuning from the base.",
        min=0.0,
        max=0.99,
        search=Space(0.0, 0.9),
    )
    seed: int = param(
        0,
        "Seed for weight initialisation, shuffling and augmentation (a signed 64-bit "
        "integer, as torch.manual_seed takes).",
        min=0,
        max=2**63 - 1,
    )
    autocast: bool = param(
        True, "Mixed precision (bfloat16/float16 autocast) when training on CUDA.", choices=None
    )


@dataclass
class DataConfig:
    """[data]: batching and normalisation."""

    batch_size: int = param(
        16,
        "Utterances per batch (at most; see min_batches_per_epoch).",
        min=1,
        max=4096,
        search=Space(4, 64, log=True),
    )
    min_batches_per_epoch: int = param(
        64,
        "On a corpus too small for this many batches of batch_size, batches shrink "
        "(to no fewer than 1 utterance) so an epoch still has this many optimizer updates.",
        min=1,
    )
    length_jitter: float = param(
        0.1,
        "Batches group utterances of similar length after multiplying lengths by a "
        "random factor in [1, 1 + length_jitter], so batches vary between epochs.",
        min=0.0,
        max=10.0,
    )
    normalization: str = param(
        "auto",
        "Feature mean/variance normalisation: 'speaker' (per speaker from cmvn.scp), "
        "'global' (per dimension over the training utterances, stored in model.pt), "
        "'utterance' (each utterance by its own statistics), 'none', or 'auto' "
        "('speaker' when the training dir has cmvn.scp, else 'global').",
        choices=NORMALIZATIONS,
    )
    drop_last: bool = param(False, "Drop the last incomplete batch of each epoch.")
    sortagrad_epochs: int = param(
        0,
        "SortaGrad: the first this many epochs take their batches shortest utterances "
        "first (batch composition still varies); later epochs in random order.",
        min=0,
    )
    subset: float = param(
        0.0,
        "A debug subset: train and validate on only this many utterances of each of the "
        "training and dev sets (a number >= 1), or this fraction of each (below 1); 0 = "
        "all. Chosen by a hash of the utterance ids, so the same ids every time, and "
        "nested: a larger subset holds every utterance of a smaller one.",
        min=0.0,
    )

    def batch_size_for(self, num_utterances: int) -> int:
        """The batch size training uses on ``num_utterances`` training utterances.

        ``batch_size``, shrunk so an epoch has at least ``min_batches_per_epoch``
        batches: a 31-utterance corpus at the defaults gets batches of 1 and 31
        updates per epoch instead of 2 updates.
        """
        return max(1, min(self.batch_size, num_utterances // self.min_batches_per_epoch))


def _plugin_section_defaults() -> dict[str, Any]:
    return {name: cls() for name, cls in SECTIONS.items() if name not in _BUILTIN_SECTIONS}


@dataclass
class Config:
    """The whole configuration, one attribute per INI section.

    A section a plugin registered (:func:`register_section`) is an attribute too
    (``config.tdnn``), held in :attr:`plugins`.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    #: Plugin section name -> its dataclass instance.
    plugins: dict[str, Any] = field(default_factory=_plugin_section_defaults)

    def __getattr__(self, name: str) -> Any:
        # Only reached when ordinary lookup fails: a plugin's section (its defaults
        # in a config built before the plugin registered it).
        cls = SECTIONS.get(name)
        if cls is None or name in _BUILTIN_SECTIONS or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.__dict__.setdefault("plugins", {}).setdefault(name, cls())


#: INI section name -> dataclass.
SECTIONS: dict[str, type] = {"model": ModelConfig, "training": TrainingConfig, "data": DataConfig}
_BUILTIN_SECTIONS = frozenset(SECTIONS)
#: Conditions added to every field of a plugin's section (its encoder or task is chosen).
_SECTION_WHEN: dict[str, tuple[When, ...]] = {}
#: Values plugins add to a categorical field's choices (``model.encoder``, ``model.task``).
_EXTRA_CHOICES: dict[str, tuple[Any, ...]] = {}
_TYPES = (bool, int, float, str)


@dataclass(frozen=True)
class FieldInfo:
    """One config field: its dotted name, type, default and declaration."""

    section: str
    key: str
    type: type
    default: Any
    spec: ParamSpec

    @property
    def name(self) -> str:
        """The dotted name, e.g. ``model.recurrent_size``."""
        return f"{self.section}.{self.key}"

    def valid_choices(self) -> tuple[Any, ...] | None:
        """Valid values of a categorical (or bool) field, else ``None``."""
        if self.type is bool:
            return (False, True)
        return self.spec.choices

    def search_space(self) -> Space | None:
        """The declared search space with categorical choices filled in."""
        space = self.spec.search
        if space is not None and space.choices is None and space.low is None:
            return dataclasses.replace(space, choices=self.valid_choices())
        return space


def _build_fields() -> tuple[FieldInfo, ...]:
    infos = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            spec = spec_of(f)
            name = f"{section}.{f.name}"
            if name in _EXTRA_CHOICES and spec.choices is not None:
                spec = dataclasses.replace(spec, choices=spec.choices + _EXTRA_CHOICES[name])
            if section in _SECTION_WHEN:
                spec = dataclasses.replace(spec, when=_SECTION_WHEN[section] + spec.when)
            infos.append(FieldInfo(section, f.name, hints[f.name], f.default, spec))
    return tuple(infos)


_FIELDS = _build_fields()
_BY_NAME = {info.name: info for info in _FIELDS}


def _rebuild_fields() -> None:
    global _FIELDS, _BY_NAME
    _FIELDS = _build_fields()
    _BY_NAME = {info.name: info for info in _FIELDS}


def register_section(name: str, cls: type, *, when: When | None = None) -> None:
    """Add a plugin's INI section: ``[name]``, fields declared with :func:`~stagetune.space.param`.

    From then on ``--set name.key=...``, INI files, :func:`to_dict`/:func:`from_dict`,
    ``--print-ini`` and the search space see its fields, and ``config.<name>`` is
    its dataclass instance.

    Args:
        name: The section name (a Python identifier, no existing section).
        cls: A dataclass whose every field is a :func:`param` of type bool, int,
            float or str with a valid default.
        when: A condition added to every field (e.g. ``model.encoder == 'tdnn'``),
            so a search only samples them when the plugin is in use.

    Raises:
        ConfigError: On an invalid name or class.
    """
    if not name.isidentifier() or name.startswith("_") or name in SECTIONS or hasattr(Config, name):
        taken = name in SECTIONS or hasattr(Config, name)
        raise ConfigError(
            f"section [{name}] " + ("already exists" if taken else "is not a valid section name")
        )
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise ConfigError(f"section [{name}]: {cls!r} is not a dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # a plugin's annotations may name anything
        raise ConfigError(f"section [{name}]: cannot read its field types: {exc}") from None
    for f in dataclasses.fields(cls):
        if "stagetune" not in f.metadata:
            raise ConfigError(f"section [{name}]: field {f.name!r} is not declared with param()")
        if hints[f.name] not in _TYPES:
            raise ConfigError(f"section [{name}]: field {f.name!r} must be bool, int, float or str")
    SECTIONS[name] = cls
    if when is not None:
        _SECTION_WHEN[name] = (when,)
    try:
        _rebuild_fields()
        for info in _FIELDS:
            if info.section == name:
                _check_static(info, info.default, f"[{name}] {info.key} (default)")
    except ConfigError:
        del SECTIONS[name]
        _SECTION_WHEN.pop(name, None)
        _rebuild_fields()
        raise


def _ensure_plugins() -> None:
    """Register the installed plugins' sections and names before a config is read."""
    from stagetune.plugins import load_plugins

    load_plugins()


def extend_choices(name: str, values: Sequence[Any]) -> None:
    """Add ``values`` (a plugin's encoder or task names) to the choices of field ``name``."""
    info = field_info(name)
    new = tuple(v for v in values if v not in (info.spec.choices or ()))
    _EXTRA_CHOICES[name] = _EXTRA_CHOICES.get(name, ()) + new
    _rebuild_fields()


def iter_fields() -> Iterator[FieldInfo]:
    """Every field in declaration order (sections model, training, data)."""
    return iter(_FIELDS)


def field_info(name: str) -> FieldInfo:
    """The field with this dotted name; :class:`ConfigError` if there is none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown parameter {name!r}; {_suggest(name)}") from None


def _suggest(name: str) -> str:
    section = name.split(".", 1)[0]
    if section not in SECTIONS:
        return f"sections are {', '.join(SECTIONS)}"
    keys = [i.key for i in _FIELDS if i.section == section]
    return f"[{section}] has {', '.join(keys)}"


def _apply_cmvn_to_normalization(raw: Any, where: str) -> str:
    # apply_cmvn = true used cmvn.scp where present, which 'auto' still does.
    old = FieldInfo("data", "apply_cmvn", bool, True, ParamSpec(doc=""))
    return "auto" if _convert(old, raw, where) else "none"


def _burnin_epochs_to_updates(raw: Any, where: str) -> int:
    # Epochs cannot be turned into updates without the corpus; only 0 carries over.
    old = FieldInfo("training", "reduce_lr_burnin", int, 0, ParamSpec(doc=""))
    if _convert(old, raw, where) != 0:
        raise ConfigError(
            f"{where}: reduce_lr_burnin (epochs) is now reduce_lr_burnin_updates "
            f"(optimizer updates, and never while a CTC model emits only blanks); "
            f"replace it with training.reduce_lr_burnin_updates=N"
        )
    return 0


#: Renamed fields still read from old INI files, model files and stored studies:
#: old dotted name -> (new dotted name, ``(old value, where) -> new value``).
_RENAMED: dict[str, tuple[str, Any]] = {
    "data.apply_cmvn": ("data.normalization", _apply_cmvn_to_normalization),
    "training.reduce_lr_burnin": ("training.reduce_lr_burnin_updates", _burnin_epochs_to_updates),
}


def _upgrade(name: str, raw: Any, where: str) -> tuple[str, Any]:
    """``(name, raw)`` with a renamed field's new name and value."""
    if name not in _RENAMED:
        return name, raw
    new_name, convert = _RENAMED[name]
    return new_name, convert(raw, where)


def flatten(config: Config) -> dict[str, Any]:
    """Dotted name -> value for every field."""
    return {i.name: getattr(getattr(config, i.section), i.key) for i in _FIELDS}


def active(info: FieldInfo, values: Mapping[str, Any]) -> bool:
    """Whether every declared condition of the field holds for ``values``."""
    return all(w.holds(values) for w in info.spec.when)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _convert(info: FieldInfo, raw: Any, where: str) -> Any:
    """Convert ``raw`` (a string from INI/--set, or a JSON value) to the field's type."""
    typ = info.type
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
        if typ is float:
            value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        return str(raw).strip()
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a finite number"}.get(
            typ, "a string"
        )
        raise ConfigError(f"{where}: expected {kind}, got {raw!r}") from None


def _check_static(info: FieldInfo, value: Any, where: str) -> None:
    """Bounds and choices that do not depend on other fields."""
    choices = info.spec.choices
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: got {value!r}; allowed: {', '.join(map(str, choices))}")
    for bound, cmp, word in ((info.spec.min, "<", ">="), (info.spec.max, ">", "<=")):
        if bound is None or isinstance(bound, Ref):
            continue
        if (value < bound) if cmp == "<" else (value > bound):
            raise ConfigError(f"{where}: got {_fmt(value)}; must be {word} {_fmt(bound)}")


def _check_relations(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Bounds that refer to other fields; only checked where the field is active."""
    for info in _FIELDS:
        if not active(info, values):
            continue
        value = values[info.name]
        for bound, word in ((info.spec.min, ">="), (info.spec.max, "<=")):
            if not isinstance(bound, Ref):
                continue
            limit = bound.resolve(values)
            if (value < limit) if word == ">=" else (value > limit):
                raise ConfigError(
                    f"{sources.get(info.name, info.name)}: got {_fmt(value)}; must be {word} "
                    f"{bound} = {_fmt(limit)} (from {sources.get(bound.name, bound.name)}); "
                    f"change one of them"
                )


def _parse_subtasks(text: str, where: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in SUBTASKS]
    if unknown:
        raise ConfigError(
            f"{where}: unknown sub-task {unknown[0]!r} in {text!r}; allowed: {', '.join(SUBTASKS)}, "
            "comma-separated (e.g. 'frame,regress')"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: {text!r} names a sub-task twice; name each once")
    if len(names) < 2:
        raise ConfigError(f"{where}: got {text!r}; a multitask model needs at least two sub-tasks, e.g. 'frame,regress'")
    return names


def _parse_weights(text: str, names: Sequence[str], where: str) -> tuple[float, ...]:
    if not text.strip():
        return (1.0,) * len(names)
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{where}: expected comma-separated numbers, got {text!r}") from None
    if len(weights) != len(names):
        raise ConfigError(
            f"{where}: {len(weights)} weights for the {len(names)} sub-tasks {','.join(names)}; "
            "give one per sub-task"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(f"{where}: got {text!r}; weights must be finite, >= 0, and not all 0")
    return weights


def _multitask_where(name: str, sources: Mapping[str, str]) -> str:
    section, key = name.split(".")
    return sources.get(name, f"[{section}] {key}")


def _check_multitask(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """``model.multitask``, ``training.task_weights`` and ``training.main_task`` of a multitask model."""
    if values["model.task"] != "multi":
        return
    names = _parse_subtasks(values["model.multitask"], _multitask_where("model.multitask", sources))
    _parse_weights(values["training.task_weights"], names, _multitask_where("training.task_weights", sources))
    main = values["training.main_task"].strip()
    if main and main not in names:
        raise ConfigError(
            f"{_multitask_where('training.main_task', sources)}: got {main!r}; it must be one of "
            f"model.multitask's sub-tasks ({', '.join(names)})"
        )


def subtasks(config: Config) -> tuple[str, ...]:
    """The sub-tasks of a multitask config (``model.multitask``), in order."""
    return _parse_subtasks(config.model.multitask, "[model] multitask")


def task_weights(config: Config) -> tuple[float, ...]:
    """One loss weight per sub-task (``training.task_weights``, default 1 each)."""
    return _parse_weights(config.training.task_weights, subtasks(config), "[training] task_weights")


def main_task(config: Config) -> str:
    """The sub-task driving selection (``training.main_task``, default the first)."""
    return config.training.main_task.strip() or subtasks(config)[0]


def with_values(
    config: Config,
    values: Mapping[str, Any],
    *,
    sources: Mapping[str, str] | None = None,
) -> Config:
    """A validated copy of ``config`` with dotted-name values replaced.

    Values may be strings (as in INI files) or typed values.  ``sources`` maps
    dotted names to where each value came from, for error messages.
    """
    _ensure_plugins()
    sources = dict(sources or {})
    flat = flatten(config)
    for name, raw in values.items():
        info = field_info(name)
        where = sources.get(name, f"[{info.section}] {info.key}")
        value = _convert(info, raw, where)
        _check_static(info, value, where)
        flat[name] = value
    _check_relations(flat, sources)
    _check_multitask(flat, sources)
    sections = {
        section: cls(**{i.key: flat[i.name] for i in _FIELDS if i.section == section})
        for section, cls in SECTIONS.items()
    }
    plugins = {name: sections.pop(name) for name in list(sections) if name not in _BUILTIN_SECTIONS}
    return Config(**sections, plugins=plugins)


def parse_ini_text(text: str, source: str, base: Config | None = None) -> Config:
    """Parse INI text (``source`` names it in errors) over ``base``.

    A leading UTF-8 byte order mark (Windows editors write one) is ignored, and
    ``[DEFAULT]`` is an ordinary, hence unknown, section: configparser would copy
    its keys into every section and blame the first of them.
    """
    _ensure_plugins()
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=("#", ";"),
        strict=True,
        default_section="\0no default section",  # no INI header can name it
    )
    parser.optionxform = str  # keys are case sensitive, like the dataclass fields
    try:
        parser.read_string(text.removeprefix("\ufeff"), source=source)
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{source}: not a valid INI file: {message}") from None
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for section in parser.sections():
        if section not in SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed: "
                + ", ".join(f"[{s}]" for s in SECTIONS)
                + ("; there are no defaults shared by sections" if section == "DEFAULT" else "")
            )
        for key, raw in parser.items(section):
            where = f"{source} [{section}] {key}"
            name, raw = _upgrade(f"{section}.{key}", raw, where)
            if name not in _BY_NAME:
                raise ConfigError(f"{source} [{section}]: unknown key {key!r}; {_suggest(name)}")
            values[name] = raw
            sources[name] = where
    return with_values(base or Config(), values, sources=sources)


def read_ini(path: str | Path, base: Config | None = None) -> Config:
    """Read an INI (or, by extension, JSON/YAML) file over ``base`` (defaults when ``None``).

    ``@NAME`` reads a packaged config (:func:`stagetune.packaged.resolve`).
    """
    from stagetune.packaged import resolve

    path = resolve(path)
    try:
        text = _read_config_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return _read_structured(text, path, base)
    return parse_ini_text(text, str(path), base)


#: A config file larger than this is refused (a full ``--print-ini`` is ~15 KB).
MAX_CONFIG_BYTES = 1 << 20


def _read_config_text(path: Path) -> str:
    """The file's text, refusing what cannot be a config file before reading it.

    Regular files and pipes (``--read-ini <(...)``) are read, at most
    :data:`MAX_CONFIG_BYTES`; a directory or device (``/dev/zero`` would never
    end) is refused. A UTF-8 byte order mark is dropped.
    """
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError(f"{path}: {kind}; --read-ini takes an INI, JSON or YAML file")
    with path.open("rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES} bytes, too large for a config file"
        )
    return data.decode("utf-8-sig")


def _read_structured(text: str, path: Path, base: Config | None) -> Config:
    """JSON or YAML ``{section: {key: value}}`` (what ``optim best`` writes)."""
    import yaml  # JSON is YAML too

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid JSON/YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: expected a mapping of sections to mappings of keys to values")
    merged = to_dict(base or Config())
    for section, items in data.items():
        merged.setdefault(section, {}).update(items)
    return from_dict(merged, str(path))


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (from ``--set``) in order."""
    _ensure_plugins()
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or "." not in name:
            raise ConfigError(
                f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. training.num_epochs=60"
            )
        name, raw = _upgrade(name, raw, f"--set {name}")
        field_info(name)
        values[name] = raw
        sources[name] = f"--set {name}"
    return with_values(config, values, sources=sources)


def load_config(ini_files: Iterable[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults, then each INI file in order, then ``--set`` overrides."""
    config = Config()
    for path in ini_files:
        config = read_ini(path, config)
    return apply_overrides(config, overrides)


def _wrap(text: str, width: int = 86) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


def _describe(info: FieldInfo) -> str:
    parts = [info.type.__name__]
    choices = info.valid_choices()
    if choices is not None and info.type is not bool:
        parts.append("one of " + ", ".join(map(str, choices)))
    if info.spec.min is not None:
        parts.append(f">= {info.spec.min}")
    if info.spec.max is not None:
        parts.append(f"<= {info.spec.max}")
    parts.append(f"default {_fmt(info.default)}")
    space = info.search_space()
    if space is not None:
        parts.append(f"search {space.describe()}")
    if info.spec.when:
        parts.append("only if " + " and ".join(map(str, info.spec.when)))
    return "; ".join(parts)


def write_ini(config: Config, *, documented: bool = True) -> str:
    """The whole configuration as INI text that :func:`parse_ini_text` reads back equal."""
    out = io.StringIO()
    for section, cls in _sections_in_use(config).items():
        if documented:
            out.write(f"# {cls.__doc__.strip()}\n")
        out.write(f"[{section}]\n")
        for info in _FIELDS:
            if info.section != section:
                continue
            if documented:
                for line in _wrap(info.spec.doc):
                    out.write(f"# {line}\n")
                out.write(f"# ({_describe(info)})\n")
            out.write(f"{info.key} = {_fmt(getattr(getattr(config, section), info.key))}\n")
        out.write("\n")
    return out.getvalue()


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}``, JSON/YAML serialisable."""
    return {section: dataclasses.asdict(getattr(config, section)) for section in _sections_in_use(config)}


def _sections_in_use(config: Config) -> dict[str, type]:
    """The built-in sections, and a plugin's only while it is chosen: a model file or study
    of the built-in encoder stays readable where the plugin is not installed."""
    values = flatten(config)
    return {
        section: cls for section, cls in SECTIONS.items()
        if section in _BUILTIN_SECTIONS
        or any(active(info, values) for info in _FIELDS if info.section == section)
    }


#: Fields added after models and studies were first stored, with the value that
#: reproduces what a stored config without them meant (its model was built so).
_STORED_BEFORE: dict[str, Any] = {"model.frame_norm": "none", "model.encoder": "crnn"}


def from_dict(
    data: Mapping[str, Mapping[str, Any]], source: str = "config", *, stored: bool = False
) -> Config:
    """Inverse of :func:`to_dict`, validated; unknown sections or keys are errors.

    Args:
        data: ``{section: {key: value}}``.
        source: Named in errors.
        stored: ``data`` is a whole config written by an earlier run (a model file,
            checkpoint or study spec): a field it lacks takes the value it had
            before the field existed, not today's default.
    """
    _ensure_plugins()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if stored:
        for name, value in _STORED_BEFORE.items():
            section, key = name.split(".")
            if key not in data.get(section, {}):
                values[name] = value
    for section, items in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        for key, value in items.items():
            name, value = _upgrade(f"{section}.{key}", value, f"{source} {section}.{key}")
            if name not in _BY_NAME:
                raise ConfigError(f"{source}: unknown key {name!r}; {_suggest(name)}")
            values[name] = value
            sources[name] = f"{source} {name}"
    return with_values(Config(), values, sources=sources)
