"""Input: decoding files and DICOM into grayscale pixels, datasets, patients and splits."""
