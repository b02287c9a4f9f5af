import pytest

from transforms import CTRATE_PATHOLOGIES, NUM_PATHOLOGIES, pathology_index


def test_ctclip_order_and_count():
    assert NUM_PATHOLOGIES == 18
    assert CTRATE_PATHOLOGIES[0] == "Medical material"
    assert CTRATE_PATHOLOGIES[9] == "Lung nodule"
    assert CTRATE_PATHOLOGIES[-1] == "Interlobular septal thickening"
    assert len(set(CTRATE_PATHOLOGIES)) == 18


def test_pathology_index_is_case_insensitive_and_names_unknowns():
    assert pathology_index("lung NODULE") == 9
    with pytest.raises(KeyError, match="Pneumothorax"):
        pathology_index("Pneumothorax")
