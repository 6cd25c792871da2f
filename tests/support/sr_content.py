"""Reading our SRs' content trees in tests, where no highdicom reader covers the template."""

from __future__ import annotations

from pydicom import Dataset


def text_values(ds: Dataset) -> list[str]:
    """Every TextValue of an SR's content tree, depth first."""
    found: list[str] = []
    for item in getattr(ds, "ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += text_values(item)
    return found
