"""Reading a STOW-RS response (PS3.18 10.5.3) into one status per object sent."""

from __future__ import annotations

from pydicom import Dataset

from node.stow import PROCESSING_FAILURE, _statuses
from node.vocabulary import is_stored


def _item(uid: str, **fields: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPInstanceUID = uid
    for keyword, value in fields.items():
        setattr(item, keyword, value)
    return item


def test_every_instance_gets_its_status_from_the_response() -> None:
    response = Dataset()
    response.ReferencedSOPSequence = [_item("1.2.3"), _item("1.2.4", WarningReason=0xB000)]
    response.FailedSOPSequence = [_item("1.2.5", FailureReason=0xA700), _item("1.2.6")]
    statuses = _statuses(response)
    assert statuses == {"1.2.3": 0x0000, "1.2.4": 0xB000, "1.2.5": 0xA700,
                        "1.2.6": PROCESSING_FAILURE}
    # Stored (warnings too) or not, by the same rule as a C-STORE status.
    assert [is_stored(statuses[uid]) for uid in ("1.2.3", "1.2.4", "1.2.5", "1.2.6")] == \
           [True, True, False, False]


def test_an_empty_response_says_nothing_was_stored() -> None:
    assert _statuses(Dataset()) == {}
