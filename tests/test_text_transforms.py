"""Report text choice, "Not given." handling, truncation and tokenisation."""

from __future__ import annotations

import pytest
import torch

from transforms import NOT_GIVEN, ReportTextd, TokenizeReportd
from transforms.text import report_sections_from_config

ITEM = {"name": "vol_1", "findings": "Heart size is normal. No pleural effusion.",
        "impressions": "Emphysema in both lungs."}


def test_sections_and_not_given():
    assert ReportTextd("findings")(ITEM)["text"] == ITEM["findings"]
    both = ReportTextd("findings_impressions")(ITEM)["text"]
    assert both == ITEM["findings"] + " " + ITEM["impressions"]
    # CT-RATE column names map to the datalist keys
    assert ReportTextd(["Findings_EN", "Impressions_EN"])(ITEM)["text"] == both
    missing = dict(ITEM, impressions=NOT_GIVEN)
    assert ReportTextd("findings_impressions")(missing)["text"] == ITEM["findings"]
    empty = dict(ITEM, findings="  ", impressions="nan")
    assert ReportTextd("findings_impressions")(empty)["text"] == NOT_GIVEN
    with pytest.raises(ValueError, match="vol_1"):
        ReportTextd("findings_impressions", fallback=None)(empty)


def test_word_truncation_and_model_config_sections():
    assert ReportTextd("findings", max_words=3)(ITEM)["text"] == "Heart size is"
    assert report_sections_from_config("ctclip_v2") == ("findings",)
    assert report_sections_from_config("ctclip_small") == ("impressions",)
    assert ReportTextd.from_model_config("ctclip_tiny", sections="findings").keys == ("findings",)


def test_tokenize_fixed_length_and_truncation():
    tok = TokenizeReportd.from_model_config("ctclip_tiny", max_length=16)
    d = tok(ReportTextd("findings_impressions")(ITEM))
    assert d["input_ids"].shape == (16,) and d["attention_mask"].shape == (16,)
    assert d["input_ids"].dtype == torch.long and int(d["attention_mask"].sum()) == 16  # truncated: all real
    short = tok({"text": "Emphysema."})
    n = int(short["attention_mask"].sum())
    assert 2 < n < 16 and bool((short["input_ids"][n:] == tok.tokenizer.pad_token_id).all())
    with pytest.raises(KeyError, match="ReportTextd"):
        tok({"name": "x"})
