"""Report text for CLIP-style training and evaluation: choose/join report sections, then tokenize.

``ReportTextd`` turns the ``findings``/``impressions`` entries of a ct_preprocess datalist item into one
string (CT-RATE marks missing sections with ``"Not given."``, which must not become training text), and
``TokenizeReportd`` turns that string into fixed-length ``input_ids``/``attention_mask`` tensors with the
model's tokenizer (fixed length so that samples collate; a network may trim common padding per batch).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Optional

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ctclip_contract import NOT_GIVEN, load_model_config, normalise_report_sections
from ctclip_contract.anatomy import ANATOMY_REGIONS
from ctclip_contract.anatomy_lexicon import region_sentence_mask

__all__ = ["ReportTextd", "TokenizeReportd", "SentenceRegionsd", "split_sentences", "report_sentences",
           "report_sections_from_config"]

def report_sections_from_config(config: Mapping[str, Any] | str) -> tuple[str, ...]:
    """Datalist keys of the report sections a model config names (``text.report_sections``).

    Args:
        config: model config (name, path, dict or :class:`~ctclip_contract.ModelConfig`).
    """
    return load_model_config(config).text.report_sections


def _is_missing(text: Any, not_given: Sequence[str]) -> bool:
    if text is None:
        return True
    s = str(text).strip()
    return not s or s.lower() == "nan" or s.lower() in {n.lower() for n in not_given}


class ReportTextd(MapTransform):
    """Join the chosen report sections of an item into one text entry.

    Sections that are missing, empty, ``"nan"`` or ``"Not given."`` are skipped; when all are missing the
    output is ``fallback`` (or a ``ValueError`` naming the volume when ``fallback`` is None).

    Args:
        keys: the section entries, in order, e.g. ``("findings", "impressions")``; also accepts the
            presets ``"findings"`` / ``"findings_impressions"`` / ``"impressions_findings"`` / ``"impressions"`` and
            CT-RATE column names (``"Findings_EN"``).
        output_key: entry receiving the joined text.
        separator: put between sections.
        max_words: keep only the first ``max_words`` words (None: no word-level truncation; the tokenizer
            truncates to the model's token length anyway).
        fallback: text for a report without any given section.
        not_given: markers of a missing section.
        name_key: entry naming the volume in error messages.
    """

    def __init__(self, keys: KeysCollection = ("findings", "impressions"), output_key: str = "text",
                 separator: str = " ", max_words: Optional[int] = None, fallback: Optional[str] = NOT_GIVEN,
                 not_given: Sequence[str] = (NOT_GIVEN, "Not given"), name_key: str = "name"):
        sections = normalise_report_sections(keys if isinstance(keys, str) else list(keys))
        super().__init__(sections, allow_missing_keys=True)
        if max_words is not None and max_words < 1:
            raise ValueError(f"max_words must be >= 1 or None, got {max_words}")
        self.output_key, self.separator, self.max_words = output_key, separator, max_words
        self.fallback, self.not_given, self.name_key = fallback, tuple(not_given), name_key

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any] | str, sections: Optional[str | Sequence[str]] = None,
                          **kwargs) -> "ReportTextd":
        """Sections from the model config's ``text.report_sections`` unless ``sections`` is given."""
        keys = report_sections_from_config(config) if sections is None else normalise_report_sections(sections)
        return cls(keys, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        parts = [str(d[k]).strip() for k in self.keys if k in d and not _is_missing(d[k], self.not_given)]
        if not parts:
            if self.fallback is None:
                raise ValueError(f"{d.get(self.name_key, 'item')}: no report text in sections {list(self.keys)}")
            parts = [self.fallback]
        text = self.separator.join(parts)
        if self.max_words is not None:
            words = text.split()
            if len(words) > self.max_words:
                text = " ".join(words[: self.max_words])
        d[self.output_key] = text
        return d


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n")


def split_sentences(text: str) -> list[str]:
    """Sentences of a report: split at line breaks and after ``.``, ``!`` or ``?`` followed by white space
    (CT-RATE impressions are one finding per line, often without a full stop)."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def report_sentences(text: str, max_sentences: int) -> list[str]:
    """The sentences a report is tokenized into, one row each: the first ``max_sentences`` of
    :func:`split_sentences`, or the whole text as one sentence when it has none. :class:`TokenizeReportd` and
    :class:`SentenceRegionsd` read the same rows."""
    return split_sentences(text)[: max_sentences] or [text]


class TokenizeReportd(MapTransform):
    """Tokenize a text entry into fixed-length ``input_ids`` and ``attention_mask`` (int64 tensors): ``(L,)``,
    or ``(max_sentences, L)`` with one sentence per row (:func:`split_sentences`; sentences past
    ``max_sentences`` are dropped, missing rows are all padding), for models that pool ``"sentence_mean"``.

    Args:
        keys: the text entry (one key).
        tokenizer: the model's tokenizer (:func:`custom_nets.build_tokenizer`).
        max_length: truncation and padding length (of each sentence with ``max_sentences``).
        ids_key: output entry of the token ids.
        mask_key: output entry of the attention mask.
        max_sentences: tokenize sentence by sentence into this many rows (None: the whole text in one row).
    """

    def __init__(self, keys: KeysCollection = "text", tokenizer: Any = None, max_length: int = 512,
                 ids_key: str = "input_ids", mask_key: str = "attention_mask", max_sentences: Optional[int] = None):
        super().__init__(keys)
        if tokenizer is None:
            raise ValueError("TokenizeReportd needs the model's tokenizer (custom_nets.build_tokenizer(config))")
        if len(self.keys) != 1:
            raise ValueError(f"TokenizeReportd tokenizes one text entry, got keys {self.keys}")
        if max_sentences is not None and int(max_sentences) < 1:
            raise ValueError(f"max_sentences must be at least 1 (or None), got {max_sentences}")
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.ids_key, self.mask_key = ids_key, mask_key
        self.max_sentences = None if max_sentences is None else int(max_sentences)

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any] | str, tokenizer: Any = None, keys: KeysCollection = "text",
                          max_length: Optional[int] = None, **kwargs) -> "TokenizeReportd":
        """``text.max_length`` and, for ``text.pooling`` ``"sentence_mean"``, ``text.max_sentences`` from a model
        config (``max_length`` overrides it). The tokenizer is the model's (``custom_nets.build_tokenizer(config)``):
        the data side does not build models' parts."""
        text = load_model_config(config).text
        length = max_length if max_length is not None else text.max_length
        if text.sentence_rows is not None:
            kwargs.setdefault("max_sentences", text.sentence_rows)
        return cls(keys, tokenizer, length, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        if key not in d:
            raise KeyError(f"{d.get('name', 'item')}: no {key!r} entry to tokenize (put ReportTextd before "
                           "TokenizeReportd)")
        text = str(d[key])
        if self.max_sentences is None:
            tok = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            d[self.ids_key] = tok["input_ids"][0].to(torch.long)
            d[self.mask_key] = tok["attention_mask"][0].to(torch.long)
            return d
        sentences = report_sentences(text, self.max_sentences)
        tok = self.tokenizer(sentences, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = torch.full((self.max_sentences, self.max_length), int(self.tokenizer.pad_token_id or 0), dtype=torch.long)
        mask = torch.zeros((self.max_sentences, self.max_length), dtype=torch.long)
        ids[: len(sentences)], mask[: len(sentences)] = tok["input_ids"], tok["attention_mask"]
        d[self.ids_key], d[self.mask_key] = ids, mask
        return d


class SentenceRegionsd(MapTransform):
    """Which anatomical regions each sentence of a report mentions: a ``(max_sentences, R)`` bool tensor, row ``s``
    the sentence of row ``s`` of :class:`TokenizeReportd` (the same :func:`report_sentences`), column ``r`` region id
    ``r + 1`` of :data:`ctclip_contract.anatomy.ANATOMY_REGIONS`, read by
    :func:`ctclip_contract.anatomy_lexicon.region_sentence_mask`. Padding rows and sentences that name no region
    are all False. The pairing of region-level alignment in pretraining.

    Args:
        keys: the text entry (one key; put :class:`ReportTextd` first).
        max_sentences: rows per report (the model config's ``text.max_sentences``).
        output_key: entry receiving the mask.
    """

    def __init__(self, keys: KeysCollection = "text", max_sentences: int = 16,
                 output_key: str = "sentence_regions"):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SentenceRegionsd reads one text entry, got keys {self.keys}")
        if int(max_sentences) < 1:
            raise ValueError(f"max_sentences must be at least 1, got {max_sentences}")
        self.max_sentences, self.output_key = int(max_sentences), output_key

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any] | str, keys: KeysCollection = "text",
                          **kwargs) -> "SentenceRegionsd":
        """Rows from the model config's ``text.max_sentences``; the config must tokenize reports sentence by
        sentence (``text.pooling`` ``"sentence_mean"``), otherwise there are no sentences to pair with regions.

        Raises:
            ValueError: naming the config, when it does not pool ``"sentence_mean"``.
        """
        cfg = load_model_config(config)
        if cfg.text.sentence_rows is None:
            raise ValueError(f"model config {cfg.source}: region- and sentence-level alignment pair image parts with "
                             f"report sentences; text.pooling must be 'sentence_mean' (is {cfg.text.pooling!r})")
        return cls(keys, cfg.text.sentence_rows, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        if key not in d:
            raise KeyError(f"{d.get('name', 'item')}: no {key!r} entry to read sentences from (put ReportTextd "
                           "before SentenceRegionsd)")
        sentences = report_sentences(str(d[key]), self.max_sentences)
        out = torch.zeros((self.max_sentences, len(ANATOMY_REGIONS)), dtype=torch.bool)
        if sentences:
            out[: len(sentences)] = torch.as_tensor(region_sentence_mask(sentences), dtype=torch.bool)
        d[self.output_key] = out
        return d
