"""The PS3.15 de-identification profile as data, shared by anonymize, the audit and ingest.

The attribute action table itself is generated data (``data/ps315_basic_profile.csv``, made by
:mod:`haven.deid.ps315`); this module holds the option codes, the attribute lists each option
retains, the identifying keywords ingest collects for the audit and the coding schemes whose
meanings are fixed vocabulary.  It imports nothing of haven: anonymize and the audit read it,
it never reads them.
"""

from __future__ import annotations

# identifying tags whose VR alone does not give them away (LO/SH/CS/IS/...)
IDENTIFYING_KEYWORDS = {
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber", "PatientBirthDate",
    "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "MedicalRecordLocator", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "StationName", "DeviceSerialNumber", "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID",
    "PerformedProcedureStepID", "AdmissionID", "ServiceEpisodeID", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "PatientInsurancePlanCodeSequence", "MilitaryRank",
    "BranchOfService", "RegionOfResidence", "CountryOfResidence", "PatientReligiousPreference",
    "ResponsibleOrganization", "ResponsiblePerson", "DetectorID", "GantryID", "PlateID", "CassetteID",
    "DeviceUID", "IssuerOfAdmissionIDSequence", "ConsultingPhysicianName", "PersonName",
    "ContentCreatorName", "VerifyingObserverName", "ReviewerName",
}
# demographic categories: identifying only in combination, their values words of a small
# vocabulary (a branch of service, a region, a religion) that coded terms share by chance.  The
# audit does not report another patient's such value as a whole coded (CS) value, e.g. one
# patient's BodyPartExamined ABDOMEN against junk ABDOMEN in another's BranchOfService; names,
# ids, dates, UIDs and places are never among them.
CATEGORY_KEYWORDS = frozenset({"BranchOfService", "MilitaryRank", "RegionOfResidence", "CountryOfResidence",
                               "PatientReligiousPreference"})
# free text that may carry names (LT/ST/UT are taken whatever their tag)
FREE_TEXT_KEYWORDS = {
    "StudyDescription", "SeriesDescription", "ImageComments", "AdditionalPatientHistory",
    "PatientComments", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
    "ScheduledProcedureStepDescription", "ReasonForStudy", "ReasonForTheRequestedProcedure",
    "RequestedContrastAgent", "ProtocolName", "AcquisitionComments", "DerivationDescription",
    "InterpretationText", "TextValue", "ContrastBolusAgent", "AdmittingDiagnosesDescription",
    "Occupation", "MedicalAlerts", "Allergies", "ImagingServiceRequestComments",
    "RequestedProcedureComments", "VisitComments", "DisplayName",
}
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
CODE_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
CODE_DEVICE_IDENTITY = ("113109", "Retain Device Identity Option")
CODE_CLEAN_DESCRIPTORS = ("113105", "Clean Descriptors Option")
CODE_RETAIN_UIDS = ("113110", "Retain UIDs Option")
CODE_SAFE_PRIVATE = ("113111", "Retain Safe Private Option")

# Descriptions kept under Clean Descriptors, with every identifying value of their file (names,
# ids, dates in any common spelling, institution, long numbers) cut out of them.  Patient-level
# free text (history, comments, allergies, ...) stays removed even then.
CLEAN_DESCRIPTORS = (
    "StudyDescription", "SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription",
    "RequestedProcedureDescription", "ScheduledProcedureStepDescription", "ImageComments",
    "AcquisitionComments", "DerivationDescription", "FrameComments", "ContrastBolusAgent",
    "BodyPartExamined",
)

# Attributes that Table E.1-1 marks K under Retain Patient Characteristics.
PATIENT_CHARACTERISTICS = (
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "PatientSexNeutered",
    "PregnancyStatus", "SmokingStatus",
)
# Attributes that Table E.1-1 marks K under Retain Device Identity (+ StationAETitle).  haven
# keeps them as keyed tokens (strings), keyed UIDs (UI) or removes them (sequences).
DEVICE_IDENTITY = (
    "CassetteID", "DetectorID", "DeviceDescription", "DeviceLabel", "DeviceSerialNumber", "DeviceUID",
    "GantryID", "GeneratorID", "LensMake", "LensModel", "LensSerialNumber", "LensSpecification",
    "ManufacturerDeviceClassUID", "ManufacturerDeviceIdentifier", "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence", "PerformedStationName",
    "PerformedStationNameCodeSequence", "PlateID", "ScheduledProcedureStepLocation",
    "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName",
    "ScheduledStationNameCodeSequence", "ScheduledStudyLocation", "ScheduledStudyLocationAETitle",
    "SourceManufacturer", "SourceSerialNumber", "StationName", "TransducerIdentificationSequence",
    "TreatmentMachineName", "UDISequence", "UniqueDeviceIdentifier", "XRayDetectorID",
    "XRayDetectorLabel", "XRaySourceID", "StationAETitle",
)
# Dates that stay removed/emptied under Retain Longitudinal Temporal Information.
BIRTH_DATES = ("PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
               "PatientDeathDateInAlternativeCalendar")
# coding schemes whose code meanings are fixed vocabulary (cannot carry a patient's identity)
STANDARD_SCHEMES = frozenset({"DCM", "SCT", "SRT", "LN", "UCUM", "FMA", "NCIt", "RADLEX", "UMLS",
                              "ICD10", "I10", "I9C", "NCDR", "ACR", "BI", "99SDM"})

def safe_private_table(entries: list[dict]) -> dict[tuple[int, str], frozenset[int]]:
    """The Retain Safe Private allow-list as ``{(group, creator): {element offsets}}``."""
    table: dict[tuple[int, str], set[int]] = {}
    for i, e in enumerate(entries or []):
        try:
            group = int(str(e["group"]), 16)
            creator = str(e["creator"]).strip()
            offsets = {int(str(x), 16) for x in e["elements"]}
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"anonymize.safe_private[{i}]: give {{group: '0019', creator: 'NAME', "
                             f"elements: ['10', ...]}} (hex group and element offsets)") from None
        if not group & 1 or not creator or any(not 0 <= o <= 0xFF for o in offsets):
            raise ValueError(f"anonymize.safe_private[{i}]: the group must be odd (private), the creator "
                             f"named, the element offsets 00-FF")
        table.setdefault((group, creator), set()).update(offsets)
    return {k: frozenset(v) for k, v in table.items()}
