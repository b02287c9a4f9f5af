"""Report text choice, "Not given." handling, truncation and tokenisation."""

from __future__ import annotations

import pytest
import torch

from custom_nets import build_tokenizer, load_model_config, merge_config
from transforms import NOT_GIVEN, ReportTextd, TokenizeReportd
from transforms.report_text import report_sections_from_config, split_sentences

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
    tok = TokenizeReportd.from_model_config("ctclip_tiny", build_tokenizer("ctclip_tiny"), max_length=16)
    d = tok(ReportTextd("findings_impressions")(ITEM))
    assert d["input_ids"].shape == (16,) and d["attention_mask"].shape == (16,)
    assert d["input_ids"].dtype == torch.long and int(d["attention_mask"].sum()) == 16  # truncated: all real
    short = tok({"text": "Emphysema."})
    n = int(short["attention_mask"].sum())
    assert 2 < n < 16 and bool((short["input_ids"][n:] == tok.tokenizer.pad_token_id).all())
    with pytest.raises(KeyError, match="ReportTextd"):
        tok({"name": "x"})


def test_sentence_rows_for_sentence_mean_pooling():
    assert split_sentences("Cardiomegaly\nHiatal hernia. Emphysema in both lungs.\n\n") == [
        "Cardiomegaly", "Hiatal hernia.", "Emphysema in both lungs."]
    cfg = merge_config(load_model_config("ctclip_tiny"), {"text": {"pooling": "sentence_mean", "max_sentences": 3}})
    tok = TokenizeReportd.from_model_config(cfg, build_tokenizer(cfg), max_length=8)
    d = tok({"text": "Cardiomegaly\nHiatal hernia. Emphysema in both lungs and a very long sentence. Nodule."})
    assert d["input_ids"].shape == (3, 8) and d["attention_mask"].shape == (3, 8)
    assert d["attention_mask"].sum(-1).tolist()[2] == 8  # per-sentence truncation; the fourth sentence is dropped
    one = tok({"text": "Emphysema."})
    assert one["attention_mask"].sum(-1).gt(0).tolist() == [True, False, False]  # empty rows are all padding
    assert torch.equal(one["input_ids"][0], tok.tokenizer("Emphysema.", padding="max_length", max_length=8,
                                                          return_tensors="pt")["input_ids"][0])
    assert TokenizeReportd.from_model_config("ctclip_tiny", build_tokenizer("ctclip_tiny")).max_sentences is None
