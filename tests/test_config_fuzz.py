"""Property tests (hypothesis) of the two text parsers users feed by hand: ``--set``
overrides and split CSVs. Any input either parses or raises the package's one-line
error; nothing else escapes (no YAML, csv, Unicode or type errors, no traceback)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from metatransfer.config import RunConfig, apply_override, validate
from metatransfer.data.miniimagenet import read_split_csv
from metatransfer.errors import ConfigError, DataError


def dotted_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{prefix}{f.name}", *dotted_keys(value, f"{prefix}{f.name}.")]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


KEYS = dotted_keys(RunConfig())
YAMLISH = ["[1,2]", "{a: 1}", "{width: 8}", "[", "{", "]", "'", '"', "!!python/object:os.system",
           "&a [*a]", ".nan", "-.inf", "1e-3", "1e400", "-0", "null", "~", "true", "yes", "0x1F",
           "[[[[]]]]", "a,b", 'a,"b', "1,2,", ",", "- 1\n- 2", "!!binary aGk=", "2024-01-01",
           "18446744073709551617", "stop", "skip", "cpu", "5", "-5", "0", "0.0"]
values = st.one_of(st.sampled_from(YAMLISH), st.text(max_size=30), st.integers().map(str),
                   st.floats().map(str),
                   st.lists(st.sampled_from(YAMLISH), max_size=3).map(",".join))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=20),
                 st.sampled_from(KEYS).map(lambda k: k + "x"),
                 st.sampled_from(KEYS).map(lambda k: k.upper()))


@settings(max_examples=400, deadline=None)
@given(key=keys, value=values)
def test_override_parser_parses_or_raises_config_error(key, value):
    try:
        cfg = apply_override(RunConfig(), f"{key}={value}")
        validate(cfg)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, RunConfig)


def leaf_values(obj, prefix: str = ""):
    """``(dotted key, value)`` of every non-section field, nested sections included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_values(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def as_override(key: str, value) -> str:
    """``key=value`` with the value written as YAML, the way a user types it."""
    text = yaml.safe_dump(value, default_flow_style=True).replace("\n...", "").strip()
    return f"{key}={text}"


DEFAULTS = [as_override(k, v) for k, v in leaf_values(RunConfig())]


@settings(max_examples=100, deadline=None)
@given(items=st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4))
def test_override_sequences(items):
    """Each override of a sequence applies or fails alone, with a one-line ConfigError that
    leaves the config as it was; one that applies sets a value the item decides alone
    (applying it again changes nothing)."""
    cfg = RunConfig()
    for key, value in items:
        item = f"{key}={value}"
        try:
            new = apply_override(cfg, item)
        except ConfigError as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        assert repr(apply_override(new, item)) == repr(new), item  # repr: NaN equals NaN
        cfg = new
    try:
        validate(cfg)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=50, deadline=None)
@given(items=st.lists(st.sampled_from(DEFAULTS), max_size=6))
def test_valid_override_sequences_apply(items):
    """Overrides that restate a default (any key, its value as YAML) never fail and leave
    the defaults: the parser does not reject what it must accept."""
    cfg = RunConfig()
    for item in items:
        cfg = apply_override(cfg, item)
    validate(cfg)
    assert cfg == RunConfig()


_DIR = Path(tempfile.mkdtemp(prefix="mtl-csv-fuzz-"))
rows = st.lists(st.lists(st.text(alphabet=st.characters(), max_size=12), max_size=4),
                max_size=6)


def check_csv(data: bytes) -> None:
    path = _DIR / "split.csv"
    path.write_bytes(data)
    try:
        files, labels, lines = read_split_csv(path)
    except DataError as exc:
        assert str(exc)
        return
    assert len(files) == len(labels) == len(lines) > 0
    assert all(f and f == f.strip() for f in files)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_csv_parser_on_arbitrary_bytes(data):
    check_csv(data)


@settings(max_examples=300, deadline=None)
@given(header=st.sampled_from(["filename,label", "filename,class", "FILENAME, Label", "file,x",
                               ""]),
       body=rows, sep=st.sampled_from([",", ";", "\t", '","']),
       newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_csv_parser_on_csv_like_text(header, body, sep, newline):
    text = newline.join([header, *(sep.join(r) for r in body)])
    check_csv(text.encode("utf-8", "surrogatepass"))
