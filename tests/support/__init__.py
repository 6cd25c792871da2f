"""Helpers only the tests use: DICOM wire builders, dciodvfy, spooled files, the settings factory."""
