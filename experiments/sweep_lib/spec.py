"""spec: a sweep spec (INI) read into points, each with a name and the merged
moesim config it runs (base-config, then [base], then the point's own values).
Every way a spec can be wrong is a SpecError whose message names the problem
and the fix, raised before anything runs."""
from __future__ import annotations

import configparser
import difflib
import itertools
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .launch import clean_env

SWEEP_SETTINGS = ("world-size", "mode", "base-config", "timeout")
MODES = ("product", "zip")
DEFAULT_TIMEOUT_S = 3600.0
# Keys the runner sets itself on every point's command line.
RUNNER_KEYS = ("out", "config")
POINT_SECTION = "point "
POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
NOT_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9._+-]+")
HELP_KEY = re.compile(r"^\s+--([a-z0-9][a-z0-9-]*)\s")


class SpecError(Exception):
    """A malformed spec, or a moesim that cannot say its keys."""


@dataclass
class Point:
    name: str
    values: dict      # the point's own keys: its grid values or its [point] section
    world_size: int   # MPI ranks
    config: dict      # moesim key -> value: base-config, then [base], then values


@dataclass
class Sweep:
    path: Path
    points: list
    grid_keys: list   # [grid] keys in spec order, world-size included if listed
    timeout_s: float
    base_config: Path | None


def normalize_key(key: str) -> str:
    """moesim accepts '-' or '_' in INI keys; the runner uses '-' throughout."""
    return key.strip().replace("_", "-")


def _parser(strict: bool) -> configparser.ConfigParser:
    # Comments as libinih reads them: whole-line ';' or '#', inline ' ;'.
    # No [DEFAULT] magic: a section of that name is just an unknown section.
    parser = configparser.ConfigParser(
        interpolation=None, strict=strict, comment_prefixes=(";", "#"),
        inline_comment_prefixes=(";",), default_section="\0none", empty_lines_in_values=False)
    parser.optionxform = str
    return parser


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def read_moesim_ini(path: Path) -> dict:
    """A moesim INI file as moesim reads it: sections ignored, later keys win,
    keys normalized to '-'."""
    parser = _parser(strict=False)
    try:
        parser.read_string("[\0top]\n" + Path(path).read_text(), source=str(path))
    except OSError as error:
        raise SpecError(f"cannot read {path}: {error.strerror}; check the path") from None
    except configparser.Error as error:
        raise SpecError(f"cannot parse {path} ({_one_line(error)}); each line must be "
                        "'key = value', a [section] or a ; comment") from None
    config = {}
    for section in parser.sections():
        for key, value in parser.items(section):
            config[normalize_key(key)] = value
    return config


def moesim_keys(moesim: Path) -> set:
    """Every key `moesim --help` lists (without --config)."""
    try:
        result = subprocess.run([str(moesim), "--help"], env=clean_env(), capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SpecError(f"cannot run {moesim} --help ({_one_line(error)}); build it with "
                        "`make build/moesim` or pass --moesim PATH") from None
    keys = {m.group(1) for line in result.stdout.splitlines() if (m := HELP_KEY.match(line))}
    keys.discard("config")
    if result.returncode != 0 or not keys:
        raise SpecError(f"{moesim} --help exited {result.returncode} and listed no keys; "
                        "rebuild it with `make build/moesim` or pass --moesim PATH")
    return keys


def load_spec(path, known_keys: set | None = None) -> Sweep:
    """Reads and checks a spec; known_keys (from moesim_keys) checks every
    moesim key, None skips that check."""
    path = Path(path)
    parser = _parser(strict=True)
    try:
        parser.read_string(path.read_text(), source=str(path))
    except OSError as error:
        raise SpecError(f"cannot read the spec: {error.strerror}; check the path") from None
    except configparser.MissingSectionHeaderError as error:
        raise SpecError(f"line {error.lineno}: a key outside any section; put it under "
                        "[sweep], [base], [grid] or [point NAME]") from None
    except configparser.Error as error:
        raise SpecError(f"{_one_line(error)}; fix that line of the spec") from None

    sections = {}
    for section in parser.sections():
        if section not in ("sweep", "base", "grid") and not section.startswith(POINT_SECTION):
            raise SpecError(f"unknown section [{section}]; a spec has [sweep], [base], [grid] "
                            "and [point NAME] sections")
        sections[section] = _section_keys(parser, section)

    settings = sections.get("sweep", {})
    for key in settings:
        if key not in SWEEP_SETTINGS:
            raise SpecError(f"[sweep] {key} is not a sweep setting; [sweep] takes "
                            f"{', '.join(SWEEP_SETTINGS)} (moesim keys go in [base] or [grid])")
    mode = settings.get("mode", "product")
    if mode not in MODES:
        raise SpecError(f"[sweep] mode = {mode}: use mode = product (every combination) or "
                        "mode = zip (the i-th values of every [grid] key together)")
    timeout_s = _positive_number(settings.get("timeout", str(DEFAULT_TIMEOUT_S)),
                                 "[sweep] timeout", "seconds per point")

    base_config_path = None
    config = {}
    if "base-config" in settings:
        base_config_path = (path.parent / settings["base-config"]).resolve()
        if not base_config_path.is_file():
            raise SpecError(f"[sweep] base-config = {settings['base-config']}: no such file "
                            f"({base_config_path}); base-config is relative to the spec file")
        config = read_moesim_ini(base_config_path)
        for key in RUNNER_KEYS:
            config.pop(key, None)
        _check_keys(config, known_keys, f"base-config {base_config_path}")

    base = sections.get("base", {})
    grid = {key: _grid_values(key, value) for key, value in sections.get("grid", {}).items()}
    named = {}
    for section, keys in sections.items():
        if section.startswith(POINT_SECTION):
            name = section[len(POINT_SECTION):].strip()
            if name in named:
                raise SpecError(f"two [point {name}] sections; give each point its own name")
            named[name] = keys
    for section, keys in (("[base]", base), ("[grid]", grid),
                          *((f"[point {name}]", keys) for name, keys in named.items())):
        for key in RUNNER_KEYS:
            if key in keys:
                raise SpecError(f"{section} sets {key}, which the runner sets for every point "
                                "(--config DIR/<point>.ini --out DIR/<point>.h5); remove it")
        _check_keys({k: v for k, v in keys.items() if k != "world-size"}, known_keys, section)
    for name in named:
        if not POINT_NAME.fullmatch(name):
            raise SpecError(f"[point {name}]: a point name becomes a file name; use letters, "
                            "digits, '.', '_', '+' and '-', starting with a letter or digit")

    # Points run in spec order, the grid's where [grid] stands.
    combos = _combinations(grid, mode)
    names = grid_point_names(list(grid), combos)
    points = []
    for section in sections:
        if section == "grid":
            points += [_point(name, dict(zip(grid, combo)), config, base, settings, "[grid]")
                       for name, combo in zip(names, combos)]
        elif section.startswith(POINT_SECTION):
            name = section[len(POINT_SECTION):].strip()
            if name in names:
                raise SpecError(f"[point {name}] has the name of a grid point; rename the "
                                "section")
            points.append(_point(name, named[name], config, base, settings, f"[{section}]"))
    if not points:
        raise SpecError("no points: list comma-separated values in [grid] or add a "
                        "[point NAME] section")
    return Sweep(path=path, points=points, grid_keys=list(grid), timeout_s=timeout_s,
                 base_config=base_config_path)


def _section_keys(parser, section: str) -> dict:
    keys = {}
    for key, value in parser.items(section):
        name = normalize_key(key)
        if name in keys:
            raise SpecError(f"[{section}] sets {name} twice (as '-' and '_' spellings of the "
                            "same key); keep one")
        keys[name] = value.strip()
    return keys


def _check_keys(keys: dict, known_keys: set | None, where: str):
    if known_keys is None:
        return
    for key in keys:
        if key not in known_keys:
            close = difflib.get_close_matches(key, sorted(known_keys), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SpecError(f"{where}: {key} is not a moesim key{hint}; `moesim --help` "
                            "lists every key")


def _positive_number(text: str, what: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise SpecError(f"{what} = {text}: give a positive number of {unit}")
    return value


def _grid_values(key: str, text: str) -> list:
    values = [value.strip() for value in text.split(",")]
    if any(not value for value in values):
        raise SpecError(f"[grid] {key} = {text}: an empty value; list values separated by "
                        f"commas, e.g. {key} = 1, 2")
    repeated = [value for value, count in Counter(values).items() if count > 1]
    if repeated:
        raise SpecError(f"[grid] {key} lists {repeated[0]} twice; list each value once")
    return values


def _combinations(grid: dict, mode: str) -> list:
    if not grid:
        return []
    if mode == "product":
        return list(itertools.product(*grid.values()))
    lengths = {key: len(values) for key, values in grid.items()}
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise SpecError(f"mode = zip needs [grid] lists of equal length, but {counts} values; "
                        "give every [grid] key the same number of values, or use "
                        "mode = product")
    return list(zip(*grid.values()))


def _point(name, values, config, base, settings, where) -> Point:
    merged = dict(config)
    merged.update({k: v for k, v in base.items() if k != "world-size"})
    merged.update({k: v for k, v in values.items() if k != "world-size"})
    for source, keys in ((where, values), ("[base]", base), ("[sweep]", settings)):
        if "world-size" in keys:
            text = keys["world-size"]
            if not text.isdigit() or int(text) < 1:
                raise SpecError(f"{source} world-size = {text}: give a positive whole number "
                                "of MPI ranks")
            return Point(name=name, values=values, world_size=int(text), config=merged)
    raise SpecError("no world-size: set world-size = N (MPI ranks per point) in [sweep], "
                    "or list several in [grid]")


def key_label(key: str) -> str:
    """A grid key's short label: the key without 'moe-', as the initials of
    its words when it has several (moe-expert-capacity-factor -> ecf,
    train-iters -> ti, world-size -> ws, lr -> lr)."""
    words = key.removeprefix("moe-").split("-")
    return words[0] if len(words) == 1 else "".join(word[:1] for word in words)


def _file_safe(text: str) -> str:
    return NOT_IN_FILE_NAMES.sub("-", text).strip("-.")


def grid_point_names(keys: list, combos: list) -> list:
    """Point names of the grid, one part per key joined by '_': a number is
    the key's label and the value (ecf0.5), anything else the value alone
    (switch). Keys whose labels coincide use the key without 'moe-' instead
    (router-topk2). If that still gives two points one name, every part is
    '<key>-<value>' joined by '__'."""
    labels = {key: key_label(key) for key in keys}
    shared = {label for label, count in Counter(labels.values()).items() if count > 1}
    labels = {key: key.removeprefix("moe-") if label in shared else label
              for key, label in labels.items()}

    def part(key, value):
        if NUMBER.fullmatch(value):
            return labels[key] + value
        return _file_safe(value) or labels[key]

    names = ["_".join(part(key, value) for key, value in zip(keys, combo)) for combo in combos]
    if len(set(names)) == len(names):
        return names
    names = ["__".join(f"{key}-{_file_safe(value)}" for key, value in zip(keys, combo))
             for combo in combos]
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise SpecError(f"two grid points get the name {repeated[0]} (their values differ "
                        "only in characters a file name cannot hold); list one of them as a "
                        "[point NAME] section instead")
    return names


def config_text(point: Point, sweep: Sweep) -> str:
    """DIR/<point>.ini: the merged config as moesim reads it, with a header
    saying where it came from."""
    sources = (f"base-config {sweep.base_config}, then " if sweep.base_config else "")
    lines = [f"; moesim config of point {point.name} ({point.world_size} ranks) of the sweep",
             f"; {sweep.path}, written by experiments/sweep: {sources}[base], then",
             "; the point's own values:",
             *(f";   {key} = {value}" for key, value in point.values.items()),
             "; Edit the spec rather than this file; the runner rewrites it.",
             "[moesim]",
             *(f"{key} = {value}" for key, value in point.config.items())]
    return "\n".join(lines) + "\n"
