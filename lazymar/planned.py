"""Presets chosen by measurement: the acceleration planner's picks, read from ``lazymar/planned_presets.json``.

The paper presets (:data:`lazymar.config.PRESETS`) are code. A planned preset (``fast``, ``balanced``)
is data: the cheapest configuration the planner (``python -m demo.plan_search``) measured within a
quality bound on the demo model, written to :data:`PLANNED_FILE` with the sampling settings and the
held-out measurements behind the choice. :func:`lazymar.preset` looks a name up here when it is not a
paper preset; a planned name with no entry in the file is refused with the command that produces it.

Configs are stored as plain dicts of their fields (:func:`config_to_dict`) and rebuilt field by field
from the dataclasses' own types (:func:`config_from_dict`), so a file that no longer matches the
configs (a field removed since it was written, or a non-technique field added) is refused, naming the
field, rather than read into a different configuration; a technique added since is off in it.

A planned preset is a measurement on one model (the file's ``about``: its name and weights' digest) at
the steps and guidance of its entry; on another model the techniques' savings and losses differ (token
count, size), so the scripts refuse it there (:func:`check_planned_model`) unless the user opts in.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from lazymar.config import PRESETS, AccelConfig
from util.checkpoint import atomic_path

PLANNED_FILE = Path(__file__).resolve().with_name("planned_presets.json")
# The names the planner exports by default, with their bound: demo FID at most (1 + bound) x plain MAR's.
DEFAULT_TARGETS: dict[str, float] = {"balanced": 0.05, "fast": 0.25}
PLAN_COMMAND = "python -m demo.plan_search --model demo --budget_s 1200 --out output/plan_demo"


def config_to_dict(config: Any) -> dict[str, Any]:
    """The fields of a (nested) config dataclass as JSON-ready values (tuples become lists in JSON)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild ``cls`` from :func:`config_to_dict`'s output: nested configs by their field types,
    lists as tuples (every sequence field of the configs is a tuple); a technique field the stored config
    lacks is off. Raises ``ValueError`` naming another field that is missing, or one that is unknown."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    # A technique added after the config was stored was not in it: it is off there.
    data = {f.name: None for f in dataclasses.fields(cls) if "technique" in f.metadata} | data
    missing, unknown = sorted(set(names) - set(data)), sorted(set(data) - set(names))
    if missing or unknown:
        raise ValueError(f"{cls.__name__}: the stored config does not match the code (missing fields {missing}, "
                         f"unknown fields {unknown})")
    values = {}
    for name in names:
        value = data[name]
        nested = [t for t in typing.get_args(hints[name]) or (hints[name],) if dataclasses.is_dataclass(t)]
        values[name] = config_from_dict(nested[0], value) if nested and isinstance(value, dict) else _tuples(value)
    return cls(**values)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_planned(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The entries of the planned presets file (name -> entry with ``accel``, ``num_iter``, ``cfg`` and
    the measurements); empty when there is no file."""
    path = PLANNED_FILE if path is None else Path(path)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["presets"]


def planned_names(path: Path | None = None) -> list[str]:
    """Every planned name: the default targets and those in the file."""
    return sorted(set(DEFAULT_TARGETS) | set(read_planned(path)))


def planned_preset(name: str, path: Path | None = None) -> AccelConfig:
    """The :class:`lazymar.AccelConfig` of planned preset ``name``.

    Raises ``ValueError``: for a planned name the file has no entry for, with the command that measures
    it; for any other name, as an unknown preset.
    """
    path = PLANNED_FILE if path is None else Path(path)
    entries = read_planned(path)
    if name in entries:
        try:
            return config_from_dict(AccelConfig, entries[name]["accel"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"planned preset {name!r} in {path} cannot be read ({e}); rerun the planner "
                             f"(`{PLAN_COMMAND}`) or delete the file") from None
    if name in DEFAULT_TARGETS:
        held = f"it holds {sorted(entries)}" if entries else "there is no such file"
        raise ValueError(f"acceleration preset {name!r} is chosen by measurement and {path} has no entry for it "
                         f"({held}); produce it with `{PLAN_COMMAND}` (see README, 'Planning an acceleration')")
    raise ValueError(f"unknown acceleration preset {name!r}; choose one of {sorted(PRESETS) + planned_names(path)}")


def plan_origin(name: str, path: Path | None = None) -> dict[str, Any] | None:
    """What planned preset ``name`` was chosen on: ``model``, ``mar_sha256``, ``num_iter``, ``cfg`` and the
    configuration's ``label``; None when ``name`` has no entry in the file (a paper preset, or unmeasured)."""
    path = PLANNED_FILE if path is None else Path(path)
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if name not in stored["presets"]:
        return None
    about, e = stored.get("about", {}), stored["presets"][name]
    return {"model": about.get("model"), "mar_sha256": about.get("mar_sha256"), "num_iter": e.get("num_iter"),
            "cfg": e.get("cfg"), "label": e.get("label")}


def check_planned_model(name: str | None, model: str, *, other_model: bool = False,
                        path: Path | None = None) -> dict[str, Any] | None:
    """Refuse planned preset ``name`` on ``model`` when it was chosen on another model, unless
    ``other_model`` (the scripts' ``--plan_from_other_model``); returns its origin (None for any other
    name) for the run's record.

    Raises ``ValueError`` saying what it was chosen on, how to plan for ``model``, and the two ways on.
    """
    origin = None if name is None else plan_origin(name, path)
    if origin is None or origin["model"] == model or other_model:
        return origin
    chosen_on = f"the {origin['model']} model" if origin["model"] else "a model the file does not record"
    techniques = origin["label"].split(" @ ")[0] if origin["label"] else ""
    named = f", or name the techniques yourself (--accel {techniques})" if techniques in PRESETS else ""
    raise ValueError(
        f"--accel {name} is the planner's choice for {chosen_on} ({origin['label']}), measured there, not on "
        f"{model}: a technique's savings and losses depend on the model's token count and size. The planner "
        f"measures the demo model only so far (`{PLAN_COMMAND}`). To sample {model} with that choice anyway add "
        f"--plan_from_other_model (recorded with the run){named}")


def write_planned(path: Path, entries: dict[str, dict[str, Any]], about: dict[str, Any]) -> Path:
    """Write ``entries`` (name -> entry with an ``accel`` config object) to ``path``, atomically, and check
    that every entry reads back as the config it was written from."""
    clash = sorted(set(entries) & set(PRESETS))
    if clash:
        raise ValueError(f"planned preset names {clash} are paper presets; choose other names")
    out = {name: {**e, "accel": config_to_dict(e["accel"])} for name, e in entries.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"about": about, "presets": out}, indent=2) + "\n")
    for name, e in entries.items():
        if config_from_dict(AccelConfig, out[name]["accel"]) != e["accel"]:
            raise AssertionError(f"planned preset {name!r} does not read back as written")
    return path
