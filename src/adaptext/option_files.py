"""Options from files: a YAML (or JSON) config file given to --config, and the shipped recipes and
option files given to --preset (``adaptext/presets/NAME.yaml``, or a tune study's ``best.yaml``)."""

from __future__ import annotations

import difflib
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from adaptext.errors import AdaptextError


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a mapping of option -> value."""
    path = Path(path)
    if not path.is_file():
        raise AdaptextError(f"config file {str(path)!r} not found; check the path given to --config")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0]
        raise AdaptextError(f"config file {str(path)!r} is not valid YAML ({first}); fix its syntax") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AdaptextError(f"config file {str(path)!r} must hold a mapping of option: value")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise AdaptextError(f"config file {str(path)!r}: option names must be words, not {bad[0]!r}; fix that key")
    return {k.replace("-", "_"): v for k, v in values.items()}


# Keys a preset or config file may carry besides the training options: used by `adaptext compare`.
STUDY_KEYS = ("methods", "seeds", "arms", "train_sizes")


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in files("adaptext").joinpath("presets").iterdir()
        if p.name.endswith(".yaml")
    )


def load_preset(name: str) -> dict[str, Any]:
    """A shipped recipe (``adaptext/presets/NAME.yaml``), or a YAML file of options such as a tune
    study's ``best.yaml``, as a mapping of options; ``description`` dropped."""
    if name.endswith((".yaml", ".yml", ".json")) or "/" in name or "\\" in name:
        if not Path(name).is_file():
            raise AdaptextError(
                f"preset file {name!r} not found; give a shipped preset ({', '.join(preset_names())}) or a .yaml file"
            )
        values = load_file(name)
        values.pop("description", None)
        return values
    if name not in preset_names():
        hint = difflib.get_close_matches(name, preset_names(), n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "choose from " + ", ".join(preset_names())
        raise AdaptextError(f"unknown preset {name!r}; {fix} (or give the path of a .yaml file of options)")
    values = yaml.safe_load(files("adaptext").joinpath("presets", f"{name}.yaml").read_text(encoding="utf-8"))
    values.pop("description", None)
    return values


def split_study(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate training options from study keys (methods, seeds, arms)."""
    study = {k: values[k] for k in STUDY_KEYS if k in values}
    return {k: v for k, v in values.items() if k not in STUDY_KEYS}, study
