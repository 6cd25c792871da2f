"""The source study's patient and study values, carried faithfully into every object we write.

highdicom builds the Patient, General Study and Patient Study modules of a new object from its
source image, but only for the values it expects: it refuses a multi-valued PatientName (a
TypeError, though PN may have several values, PS3.5 6.2) and reads type 2 attributes such as
AccessionNumber, StudyID or PatientBirthDate as attributes, failing when a source leaves them out
(a type 2 attribute of the MG image may be absent from a valid source received from another
SOP class, or empty). So every writer:

1. hands highdicom `highdicom_safe(source)`: a copy whose person names are single-valued and
   whose missing type 2 values are empty, and only that copy;
2. then `carry_source_values(source, written)`: the received values (every value, the source's
   Specific Character Set) replace what highdicom filled in.

The received values are never altered: a name in ISO 2022 IR 87 or UTF-8 is written back in the
character set it came in.
"""

from __future__ import annotations

import copy

from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement

# PS3.3 C.7.1.1 Patient, C.7.2.1 General Study, C.7.2.2 Patient Study: what identifies the
# patient and the study to a PACS, a worklist or a reader. Copied when the source has them.
CARRIED_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientComments",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight",
)
# What highdicom reads from the source as attributes (type 2 in the objects we write).
READ_BY_HIGHDICOM = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                     "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                     "ReferringPhysicianName")
PERSON_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName")


def highdicom_safe(source: Dataset) -> Dataset:
    """A shallow copy of `source` that highdicom's constructors accept; never written out."""
    safe = Dataset()  # copy.copy would share the source's element dictionary
    for element in source:
        safe.add(element)
    if hasattr(source, "file_meta"):
        safe.file_meta = source.file_meta
    # The elements are the source's own objects: replace them, never assign to their values.
    for keyword in READ_BY_HIGHDICOM:
        if keyword not in safe:
            safe.add_new(keyword, dictionary_VR(keyword), None)
    for keyword in PERSON_NAME_KEYWORDS:
        if keyword in safe and safe[keyword].VM > 1:
            safe.add_new(keyword, "PN", safe[keyword].value[0])
    if "SpecificCharacterSet" in safe:
        # highdicom knows single character sets only (no ISO 2022 code extensions); the values
        # are decoded text in memory, and the source's character set is carried back afterwards.
        del safe.SpecificCharacterSet
    if safe.get("PatientSex") not in (None, "", "M", "F", "O"):
        # highdicom takes defined terms only; the received value is carried back afterwards.
        safe.add_new("PatientSex", "CS", None)
    return safe


def carry_source_values(source: Dataset, written: Dataset) -> None:
    """Overwrite `written`'s patient and study values with the source's, exactly as received."""
    for keyword in CARRIED_KEYWORDS:
        if keyword in source:
            element = source[keyword]
            written[element.tag] = DataElement(element.tag, element.VR,
                                               copy.deepcopy(element.value))
    if "SpecificCharacterSet" in source:
        written.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
    elif "SpecificCharacterSet" in written:
        del written.SpecificCharacterSet  # the source's values are in the default repertoire
