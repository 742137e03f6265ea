"""Config: round trips, declarations and every error kind."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from stagetune.config import (
    Config,
    SECTIONS,
    apply_overrides,
    field_info,
    flatten,
    from_dict,
    iter_fields,
    load_config,
    parse_ini_text,
    read_ini,
    to_dict,
    write_ini,
)
from stagetune.errors import ConfigError
from stagetune.space import Ref, When


def test_written_ini_reads_back_equal(tmp_path):
    config = load_config(
        [],
        [
            "training.learning_rate=0.000123456789",
            "model.recurrent_type=lstm",
            "model.recurrent_bidirectional=false",
            "data.batch_size=7",
        ],
    )
    path = tmp_path / "c.ini"
    path.write_text(write_ini(config))
    assert read_ini(path) == config
    assert from_dict(to_dict(config)) == config


def test_written_ini_documents_every_field():
    text = write_ini(Config())
    for info in iter_fields():
        assert f"\n{info.key} = " in text
        assert info.spec.doc.split()[0] in text
    assert "search [16, 512] log" in text
    assert "only if model.recurrent_layers > 0" in text


def test_later_ini_wins_and_set_wins_over_ini(tmp_path):
    a = tmp_path / "a.ini"
    b = tmp_path / "b.ini"
    a.write_text("[training]\nnum_epochs = 3\nlearning_rate = 0.1\n")
    b.write_text("[training]\nnum_epochs = 4\n")
    config = load_config([a, b], ["training.learning_rate=0.5"])
    assert config.training.num_epochs == 4
    assert config.training.learning_rate == 0.5


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("[modle]\nx = 1\n", ["c.ini", "unknown section [modle]", "[model]"]),
        ("[model]\nrecurent_size = 3\n", ["c.ini [model]", "'recurent_size'", "recurrent_size"]),
        ("[training]\nnum_epochs = many\n", ["c.ini [training] num_epochs", "integer", "'many'"]),
        ("[training]\nlearning_rate = nan\n", ["learning_rate", "finite number"]),
        ("[data]\nbatch_size = 0\n", ["[data] batch_size", "got 0", ">= 1"]),
        ("[training]\noptimizer = rmsprop\n", ["optimizer", "'rmsprop'", "adam, adamw, sgd"]),
        ("[model]\nrecurrent_bidirectional = maybe\n", ["true or false", "'maybe'"]),
        (
            "[model]\nconvolutional_layers = 1\nconvolutional_factor_sched = 3\n",
            ["convolutional_factor_sched", "got 3", "model.convolutional_layers + 1 = 2"],
        ),
        ("no section here\n", ["c.ini", "not a valid INI"]),
    ],
)
def test_errors_name_file_section_key_value_and_what_is_allowed(tmp_path, text, fragments):
    path = tmp_path / "c.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_ini(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


def test_set_errors():
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        apply_overrides(Config(), ["training.num_epochs"])
    with pytest.raises(ConfigError, match=r"--set training.num_epochs: got -1; must be >= 1"):
        apply_overrides(Config(), ["training.num_epochs=-1"])
    with pytest.raises(ConfigError, match="unknown parameter 'training.epochs'"):
        apply_overrides(Config(), ["training.epochs=3"])


def test_missing_ini_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        read_ini(tmp_path / "absent.ini")


def test_inactive_field_is_not_checked_against_dependent_bound():
    # factor_sched only matters with convolutions; with none its bound is moot.
    config = apply_overrides(Config(), ["model.convolutional_factor_sched=3"])
    config = apply_overrides(config, ["model.convolutional_layers=0"])
    assert config.model.convolutional_factor_sched == 3


def test_declarations_are_consistent():
    names = {info.name for info in iter_fields()}
    for info in iter_fields():
        space = info.search_space()
        refs = [b for b in (info.spec.min, info.spec.max) if isinstance(b, Ref)]
        if space is not None:
            refs += [b for b in (space.low, space.high) if isinstance(b, Ref)]
            if space.choices is None:
                assert space.low is not None and space.high is not None, info.name
            else:
                valid = info.valid_choices()
                assert valid is None or set(space.choices) <= set(valid), info.name
        for ref in refs:
            assert ref.name in names, info.name
        for cond in info.spec.when:
            assert cond.name in names and cond.name != info.name, info.name
    # Conditions and dependent bounds only refer to earlier fields, so one
    # pass in declaration order can sample and check everything.
    seen: set[str] = set()
    for info in iter_fields():
        deps = {c.name for c in info.spec.when}
        space = info.search_space()
        for b in (info.spec.min, info.spec.max, *(space and (space.low, space.high) or ())):
            if isinstance(b, Ref):
                deps.add(b.name)
        assert deps <= seen, (info.name, deps - seen)
        seen.add(info.name)


def test_default_config_is_valid_and_flat_names_are_dotted():
    flat = flatten(Config())
    assert "model.recurrent_size" in flat and "training.num_epochs" in flat
    assert len(flat) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())
    assert field_info("training.max_time_mask").spec.when == (
        When("training.num_time_mask", ">", 0),
    )


def test_cnn_mellin_names_are_kept():
    for name in [
        "training.num_epochs",
        "training.max_time_mask",
        "training.num_freq_mask",
        "training.dropout_prob",
        "training.early_stopping_threshold",
        "training.early_stopping_patience",
        "training.early_stopping_burnin",
        "model.convolutional_layers",
        "model.recurrent_size",
        "model.recurrent_type",
        "data.batch_size",
    ]:
        field_info(name)


def test_inline_comments_and_case_sensitive_keys():
    config = parse_ini_text("[training]\nnum_epochs = 5  # short run\n", "x.ini")
    assert config.training.num_epochs == 5
    with pytest.raises(ConfigError, match="unknown key 'Num_Epochs'"):
        parse_ini_text("[training]\nNum_Epochs = 5\n", "x.ini")


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "windows.ini"
    path.write_bytes("[model]\r\nrecurrent_size = 3\r\n".encode("utf-8-sig"))
    assert read_ini(path).model.recurrent_size == 3
    assert parse_ini_text("\ufeff[model]\nrecurrent_size = 4\n", "x.ini").model.recurrent_size == 4


@pytest.mark.parametrize("text", ["[DEFAULT]\nrecurrent_size = 3\n", "[DEFAULT]\nfoo = 1\n[model]\n"])
def test_a_default_section_is_refused_not_spread_over_sections(text):
    # configparser would copy [DEFAULT] keys into every section: silently ignored
    # without other sections, blamed on [model] with them.
    with pytest.raises(ConfigError, match=r"x.ini: unknown section \[DEFAULT\]"):
        parse_ini_text(text, "x.ini")


def test_read_ini_refuses_devices_and_huge_files_but_reads_pipes(tmp_path):
    with pytest.raises(ConfigError, match="/dev/zero: not a regular file"):
        read_ini("/dev/zero")  # would never end
    with pytest.raises(ConfigError, match="a directory"):
        read_ini(tmp_path)
    huge = tmp_path / "huge.ini"
    huge.write_text("[model]\n" + "#" * (1 << 20))
    with pytest.raises(ConfigError, match="too large for a config file"):
        read_ini(huge)
    # --read-ini <(stagetune optim ... best -) is a pipe.
    fifo = tmp_path / "fifo.ini"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("[model]\nrecurrent_size = 5\n"))
    writer.start()
    try:
        assert read_ini(fifo).model.recurrent_size == 5
    finally:
        writer.join(timeout=10)


def test_search_spaces_lie_within_the_valid_bounds():
    for info in iter_fields():
        space = info.search_space()
        if space is None or space.choices is not None:
            continue
        low, high = info.spec.min, info.spec.max
        for bound in (space.low, space.high):
            if isinstance(bound, Ref):
                continue
            assert low is None or isinstance(low, Ref) or bound >= low, info.name
            assert high is None or isinstance(high, Ref) or bound <= high, info.name


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # A typo of 100000 hidden units would try to allocate ~120 GB at training.
        ("model.recurrent_size=8193", "must be <= 8192"),
        ("model.convolutional_initial_channels=4097", "must be <= 4096"),
        # torch.manual_seed overflows beyond a signed 64-bit integer.
        ("training.seed=9223372036854775808", "must be <= 9223372036854775807"),
    ],
)
def test_sanity_upper_bounds(setting, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [setting])


def test_the_largest_seed_is_one_torch_takes():
    import torch

    seed = field_info("training.seed").spec.max
    torch.manual_seed(seed)
    torch.Generator().manual_seed(seed)


def test_a_stored_config_without_a_later_field_keeps_its_old_meaning() -> None:
    # model files, checkpoints and study specs written before model.frame_norm existed
    stored = to_dict(Config())
    del stored["model"]["frame_norm"]
    assert from_dict(stored, "old model.pt", stored=True).model.frame_norm == "none"
    # a user's config without the key takes today's default
    assert from_dict(stored, "user.ini").model.frame_norm == Config().model.frame_norm
    # a stored value always wins
    stored["model"]["frame_norm"] = "layer"
    assert from_dict(stored, "new model.pt", stored=True).model.frame_norm == "layer"
