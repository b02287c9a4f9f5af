"""The anatomical label table and the mask-file contract (ctclip_contract.anatomy)."""

from __future__ import annotations

import json

import pytest

from ctclip_contract import CTRATE_PATHOLOGIES
from ctclip_contract.anatomy import (ANATOMY_LABELS, ANATOMY_REGIONS, OWN_REGIONS, TOTALSEGMENTATOR_TASK,
                                     TOTALSEGMENTATOR_TO_REGION, MaskError, finding_bit, findings_of_value,
                                     is_mask_file, label_table, mask_paths, read_label_table, read_region_mapping,
                                     region_id)


def test_every_region_is_totalsegmentator_or_documented_as_ours():
    assert 12 <= len(ANATOMY_REGIONS) <= 20 and len(set(ANATOMY_REGIONS)) == len(ANATOMY_REGIONS)
    assert max(ANATOMY_LABELS) < 256 and 0 not in ANATOMY_LABELS  # uint8, 0 = background
    for name in ANATOMY_REGIONS:
        assert (name in TOTALSEGMENTATOR_TASK) != (name in OWN_REGIONS), name
    assert region_id("lung_middle_lobe_right") == ANATOMY_REGIONS.index("lung_middle_lobe_right") + 1
    with pytest.raises(KeyError, match="lingula"):
        region_id("lingula")


def test_label_table_round_trips_through_its_file(tmp_path):
    path = tmp_path / "anatomy_labels.json"
    path.write_text(json.dumps(label_table()))
    assert read_label_table(path) == ANATOMY_LABELS
    for bad, why in (({"1": "a", "2": "a"}, "used by two"), ({"300": "a"}, "0..255"), ({"x": "a"}, "0..255"),
                     ([1, 2], "JSON object"), ({"1": ""}, "no name")):
        path.write_text(json.dumps(bad))
        with pytest.raises(MaskError, match=why) as e:
            read_label_table(path)
        assert str(path) in str(e.value)


def test_mask_paths_sit_beside_nifti_and_dicom_volumes(tmp_path):
    assert mask_paths(tmp_path / "train_1_a_1.nii.gz") == {"seg": tmp_path / "train_1_a_1_seg.nii.gz",
                                                           "findings": tmp_path / "train_1_a_1_findings.nii.gz"}
    assert mask_paths(tmp_path / "train_1_a_2")["seg"] == tmp_path / "train_1_a_2_seg.nii.gz"  # DICOM folder
    assert mask_paths(tmp_path / "x.nii")["findings"].name == "x_findings.nii.gz"
    assert is_mask_file("train_1_a_1_seg.nii.gz") and is_mask_file("a_findings.nii")
    assert not is_mask_file("train_1_a_1.nii.gz") and not is_mask_file("seg.nii.gz")


def test_finding_bits_follow_the_pathology_order():
    assert [finding_bit(p) for p in CTRATE_PATHOLOGIES] == [1 << i for i in range(len(CTRATE_PATHOLOGIES))]
    assert (1 << len(CTRATE_PATHOLOGIES)) < 2**31  # fits int32
    assert findings_of_value(finding_bit("Pleural effusion") | finding_bit("Atelectasis")) == \
        ["Atelectasis", "Pleural effusion"]
    with pytest.raises(KeyError):
        finding_bit("Pneumothorax")


def test_region_mapping_default_and_file(tmp_path):
    default = read_region_mapping()
    assert default["regions"]["rib_left_7"] == region_id("bone")
    assert default["regions"]["lung_upper_lobe_left"] == region_id("lung_upper_lobe_left")
    assert set(TOTALSEGMENTATOR_TO_REGION.values()) <= set(ANATOMY_REGIONS)
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"regions": {"heart": "heart", "rib_left_1": "bone"}, "labels": {"0": "background", "51": "heart"}}))
    m = read_region_mapping(path)
    assert m["regions"] == {"heart": region_id("heart"), "rib_left_1": region_id("bone")} and m["labels"] == {51: "heart"}
    path.write_text(json.dumps({"regions": {"heart": "cardiac"}}))
    with pytest.raises(MaskError, match="'cardiac', not one of our regions"):
        read_region_mapping(path)
