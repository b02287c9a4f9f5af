"""Model configs: read once, validated, typed.

A model config (``ctclip_contract/configs/<name>.json``) names the encoders and their sizes *and* the input
contract its weights expect. :func:`load_model_config` reads it once into a :class:`ModelConfig`, checks every
contract value (types, ranges, required keys, axis codes) and raises one :class:`ModelConfigError` that names
the file, the key and what was expected. The object is then passed down: preprocessing, the transforms, the
model factory and the bundles read the same instance, never the file again.

Typed sections (the contract the stages share):

* ``input`` -> :class:`InputContract`: spacing, crop/pad size, padding HU, HU window and scaling, axis codes
  of the ``(D, H, W)`` model input;
* ``text`` -> :class:`TextContract`: tokenizer length, sentences per report, pooling, report sections;
* ``prompts`` -> :class:`PromptConfig`: zero-shot template pairs, scoring and ridge.

The architecture sections (``image_encoder`` or its older form ``ctvit``, ``text_encoder``, ``ctclip``) are the
model factory's; they stay plain mappings here (``config["ctclip"]``; :attr:`ModelConfig.image_encoder` gives the
image encoder's type and settings), and the factory checks them against the input contract. A
:class:`ModelConfig` is a read-only mapping of the whole JSON, so ``config["input"]["spacing_mm"]`` and
``json.dumps(config.to_dict())`` work as for the file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .ctrate_format import normalise_report_sections
from .files import read_json

__all__ = [
    "CONFIG_DIR", "ModelConfig", "ModelConfigError", "InputContract", "TextContract", "PromptConfig",
    "load_model_config", "list_model_configs", "merge_config", "image_input_shape",
    "TEXT_POOLINGS", "IMAGE_POOLINGS", "PROMPT_SCORINGS", "DEFAULT_TEMPLATES",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: How the text encoder's states become one embedding per report (``text.pooling``).
TEXT_POOLINGS = ("cls", "mean", "sentence_mean")
#: How the image encoder's tokens are pooled over depth (``ctclip.image_pooling``): the reference's mean, or max.
IMAGE_POOLINGS = ("depth_mean", "depth_max")
#: Zero-shot evidence per class (``prompts.scoring``): the reference's pairwise, or the ridge decomposition.
PROMPT_SCORINGS = ("pairwise", "decomposed")
#: CT-CLIP v2's prompt pair.
DEFAULT_TEMPLATES: tuple[tuple[str, str], ...] = (("{} is present.", "{} is not present."),)
_AXIS_PAIRS = ("LR", "AP", "SI")


class ModelConfigError(ValueError):
    """A model config is unusable; the message names the file, the key and what was expected."""


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Recursive merge into a new dict: mapping values merge into mapping values, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Checker:
    """Reads typed values out of one config file, raising :class:`ModelConfigError` naming file and key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, expected: str, got: Any) -> ModelConfigError:
        return ModelConfigError(f"model config {self.source}: {key}: expected {expected}, got {got!r}")

    def section(self, raw: Mapping, name: str, required: bool = True) -> Mapping:
        if name not in raw:
            if required:
                raise ModelConfigError(f"model config {self.source}: missing section {name!r}")
            return {}
        if not isinstance(raw[name], Mapping):
            raise self.fail(name, "an object", raw[name])
        return raw[name]

    def number(self, sec: Mapping, path: str, default: Any = None, positive: bool = False) -> float:
        key = path.rsplit(".", 1)[-1]
        if key not in sec:
            if default is None:
                raise ModelConfigError(f"model config {self.source}: missing key {path!r}")
            return float(default)
        v = sec[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise self.fail(path, "a number", v)
        if positive and v <= 0:
            raise self.fail(path, "a number > 0", v)
        return float(v)

    def integer(self, sec: Mapping, path: str, default: Optional[int] = None, minimum: int = 1) -> int:
        key = path.rsplit(".", 1)[-1]
        if key not in sec:
            if default is None:
                raise ModelConfigError(f"model config {self.source}: missing key {path!r}")
            return default
        v = sec[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.fail(path, f"an integer >= {minimum}", v)
        return v

    def triple(self, sec: Mapping, path: str, kind: type) -> tuple:
        key = path.rsplit(".", 1)[-1]
        if key not in sec:
            raise ModelConfigError(f"model config {self.source}: missing key {path!r}")
        v = sec[key]
        ok = (isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 3
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v)
              and (kind is float or all(isinstance(x, int) for x in v)))
        if not ok:
            noun = "integers" if kind is int else "numbers"
            raise self.fail(path, f"three positive {noun} (x, y, z)", v)
        return tuple(kind(x) for x in v)

    def choice(self, sec: Mapping, path: str, choices: Sequence[str], default: str) -> str:
        v = sec.get(path.rsplit(".", 1)[-1], default)
        if v not in choices:
            raise self.fail(path, f"one of {list(choices)}", v)
        return v


@dataclass(frozen=True)
class InputContract:
    """What the image encoder's weights expect of a volume (the ``input`` section).

    Attributes:
        spacing_mm: voxel spacing (x, y, z) of the preprocessed RAS volume, mm.
        spatial_size: centre crop/pad size (x, y, z) of the preprocessed RAS volume, voxels.
        pad_hu: HU of the padding (air).
        hu_window: (low, high) clip range applied when a volume is fed to the model.
        hu_offset, hu_scale: ``model value = (clip(HU, *hu_window) - hu_offset) / hu_scale``.
        axis_codes: anatomical codes of the model input's (D, H, W) axes, e.g. ``"SLP"``.
    """

    spacing_mm: tuple[float, float, float]
    spatial_size: tuple[int, int, int]
    pad_hu: float = -1000.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    hu_offset: float = 0.0
    hu_scale: float = 1000.0
    axis_codes: str = "SLP"

    @property
    def model_input_shape(self) -> tuple[int, int, int, int]:
        """``(1, D, H, W)``: ``spatial_size`` is (x, y, z) in RAS, permuted as ``axis_codes`` say (with ``"SLP"``
        D = z, H = x, W = y)."""
        size = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
        return (1,) + tuple(self.spatial_size[size[c]] for c in self.axis_codes)

    def hu_to_model(self, hu: float) -> float:
        """A HU value in model-input units (without the clip)."""
        return (float(hu) - self.hu_offset) / self.hu_scale

    @classmethod
    def parse(cls, sec: Mapping, check: _Checker) -> "InputContract":
        window = sec.get("hu_window", [-1000.0, 1000.0])
        if (not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in window)
                or window[0] >= window[1]):
            raise check.fail("input.hu_window", "[low, high] numbers with low < high", window)
        scale = check.number(sec, "input.hu_scale", 1000.0)
        if scale == 0:
            raise check.fail("input.hu_scale", "a non-zero number", scale)
        codes = sec.get("axis_codes", "SLP")
        pairs = sorted(next((i for i, p in enumerate(_AXIS_PAIRS) if c in p), -1) for c in str(codes).upper())
        if not isinstance(codes, str) or len(codes) != 3 or pairs != [0, 1, 2]:
            raise check.fail("input.axis_codes", "three letters, one each of L/R, A/P and S/I (e.g. 'SLP')", codes)
        return cls(spacing_mm=check.triple(sec, "input.spacing_mm", float),
                   spatial_size=check.triple(sec, "input.spatial_size", int),
                   pad_hu=check.number(sec, "input.pad_hu", -1000.0),
                   hu_window=(float(window[0]), float(window[1])),
                   hu_offset=check.number(sec, "input.hu_offset", 0.0), hu_scale=scale, axis_codes=codes.upper())


@dataclass(frozen=True)
class TextContract:
    """How reports become token ids (the ``text`` section).

    Attributes:
        max_length: tokens per sequence (padding and truncation).
        pooling: one of :data:`TEXT_POOLINGS`; ``"sentence_mean"`` tokenizes each sentence on its own.
        max_sentences: sentences kept per report with ``"sentence_mean"``.
        report_sections: datalist keys of the report sections used as training text, in order.
    """

    max_length: int = 512
    pooling: str = "cls"
    max_sentences: int = 16
    report_sections: tuple[str, ...] = ("findings",)

    @property
    def sentence_rows(self) -> Optional[int]:
        """Sentences per report row block when reports are tokenized sentence by sentence, else None."""
        return self.max_sentences if self.pooling == "sentence_mean" else None

    @classmethod
    def parse(cls, sec: Mapping, check: _Checker) -> "TextContract":
        sections = sec.get("report_sections", ["Findings_EN"])
        if not (isinstance(sections, str) or (isinstance(sections, Sequence) and sections
                                               and all(isinstance(s, str) for s in sections))):
            raise check.fail("text.report_sections", "a preset name or a non-empty list of section names", sections)
        return cls(max_length=check.integer(sec, "text.max_length", 512),
                   pooling=check.choice(sec, "text.pooling", TEXT_POOLINGS, "cls"),
                   max_sentences=check.integer(sec, "text.max_sentences", 16),
                   report_sections=normalise_report_sections(sections))


@dataclass(frozen=True)
class PromptConfig:
    """Zero-shot prompts (the ``prompts`` section).

    Attributes:
        templates: ``(present, absent)`` format-string pairs, each with one ``{}`` for the class name.
        scoring: one of :data:`PROMPT_SCORINGS`.
        ridge: regularisation of the decomposed scoring, relative to the mean squared direction length.
    """

    templates: tuple[tuple[str, str], ...] = DEFAULT_TEMPLATES
    scoring: str = "pairwise"
    ridge: float = 0.1

    @classmethod
    def parse(cls, sec: Mapping, check: _Checker) -> "PromptConfig":
        templates = sec.get("templates", DEFAULT_TEMPLATES)
        ok = (isinstance(templates, Sequence) and not isinstance(templates, str) and len(templates) > 0
              and all(isinstance(t, Sequence) and not isinstance(t, str) and len(t) == 2
                      and all(isinstance(s, str) and "{}" in s for s in t) for t in templates))
        if not ok:
            raise check.fail("prompts.templates", "a list of [present, absent] strings, each with one '{}'", templates)
        ridge = check.number(sec, "prompts.ridge", 0.1)
        if ridge < 0:
            raise check.fail("prompts.ridge", "a number >= 0", ridge)
        return cls(templates=tuple((t[0], t[1]) for t in templates),
                   scoring=check.choice(sec, "prompts.scoring", PROMPT_SCORINGS, "pairwise"), ridge=ridge)


@dataclass(frozen=True, eq=False)
class ModelConfig(Mapping):
    """A validated model config: the typed contract sections plus the raw JSON as a read-only mapping.

    Build it with :func:`load_model_config`. ``source`` is the file it came from (or ``"<dict>"``).
    """

    name: str
    source: str
    input: InputContract
    text: TextContract
    prompts: PromptConfig
    _raw: Mapping[str, Any] = field(repr=False)

    # --- the raw JSON, read-only (architecture sections and anything the contract does not type)
    def __getitem__(self, key: str) -> Any:
        return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._raw) == dict(other)

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the JSON (for writing it out, or to edit and load again)."""
        return copy.deepcopy(dict(self._raw))

    def merged(self, overrides: Optional[Mapping[str, Any]]) -> "ModelConfig":
        """A new, validated config with ``overrides`` merged in (:func:`merge_config`); ``self`` when empty."""
        if not overrides:
            return self
        return _from_dict(merge_config(self._raw, overrides), self.source)

    @property
    def image_encoder(self) -> tuple[str, dict[str, Any]]:
        """``(type, settings)`` of the image encoder: the ``image_encoder`` section's ``type`` and the rest of it,
        or ``("ctvit", <the ctvit section>)`` for a config written before the registry."""
        section = self._raw.get("image_encoder")
        if section is None:
            if "ctvit" not in self._raw:
                raise ModelConfigError(f"model config {self.source}: no 'image_encoder' (or 'ctvit') section")
            return "ctvit", copy.deepcopy(dict(self._raw["ctvit"]))
        settings = copy.deepcopy(dict(section))
        return settings.pop("type"), settings

    @property
    def image_pooling(self) -> str:
        """Depth pooling of the image tokens (``ctclip.image_pooling``, one of :data:`IMAGE_POOLINGS`)."""
        return self._raw.get("ctclip", {}).get("image_pooling", "depth_mean")


def _from_dict(raw: Mapping[str, Any], source: str) -> ModelConfig:
    check = _Checker(source)
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"model config {source}: expected a JSON object, got {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))
    name = raw.setdefault("name", Path(source).stem if source != "<dict>" else "unnamed")
    if not isinstance(name, str):
        raise check.fail("name", "a string", name)
    encoder = check.section(raw, "image_encoder", required=False)
    if encoder:
        if not isinstance(encoder.get("type"), str) or not encoder["type"]:
            raise check.fail("image_encoder.type", "the name of a registered image encoder (e.g. 'slice_fusion')",
                             encoder.get("type"))
        if "ctvit" in raw:
            raise ModelConfigError(f"model config {source}: both a 'ctvit' and an 'image_encoder' section: keep one "
                                   "(a 'ctvit' section alone is the same as image_encoder type 'ctvit')")
    elif "ctvit" in raw:
        check.section(raw, "ctvit")
    ctclip = check.section(raw, "ctclip", required=False)
    check.choice(ctclip, "ctclip.image_pooling", IMAGE_POOLINGS, "depth_mean")
    return ModelConfig(name=name, source=source,
                       input=InputContract.parse(check.section(raw, "input"), check),
                       text=TextContract.parse(check.section(raw, "text", required=False), check),
                       prompts=PromptConfig.parse(check.section(raw, "prompts", required=False), check),
                       _raw=raw)


def list_model_configs() -> list[str]:
    """Names of the model configs shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(config: str | os.PathLike | Mapping[str, Any],
                      overrides: Optional[Mapping[str, Any]] = None) -> ModelConfig:
    """Read and validate a model config once; a :class:`ModelConfig` given here is passed through.

    Args:
        config: a shipped config name (``"ctclip_v2"``), a path to a JSON file, a dict, or a :class:`ModelConfig`.
        overrides: merged into the config before validation (:func:`merge_config`).

    Raises:
        FileNotFoundError: naming the path, or the unknown name with the shipped configs.
        ModelConfigError: naming the file, the key and what was expected (also for invalid JSON).
    """
    if isinstance(config, ModelConfig):
        return config.merged(overrides)
    if isinstance(config, Mapping):
        return _from_dict(merge_config(config, overrides or {}), "<dict>")
    candidate = Path(config)
    if candidate.suffix == ".json" or candidate.exists():
        if not candidate.is_file():
            raise FileNotFoundError(f"model config file not found: {candidate}")
        path = candidate
    else:
        path = CONFIG_DIR / f"{config}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"unknown model config {str(config)!r}; shipped configs: {', '.join(list_model_configs())}")
    try:
        raw = read_json(path, "model config")
    except ValueError as err:
        raise ModelConfigError(str(err)) from None
    if isinstance(raw, Mapping):
        raw.setdefault("name", path.stem)
    return _from_dict(merge_config(raw, overrides or {}) if isinstance(raw, Mapping) else raw, str(path))


def image_input_shape(config: str | os.PathLike | Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(1, D, H, W)`` model-input shape of a config (:attr:`InputContract.model_input_shape`)."""
    return load_model_config(config).input.model_input_shape
