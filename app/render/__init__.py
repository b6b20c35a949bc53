"""Rendered and thumbnail images of DICOM instances (PS3.18 §8.3.5, §10.4.1.1.3-4).

``params`` parses the rendering query parameters, ``pipeline`` turns one frame
into 8-bit display pixels (PS3.4 N.2: modality LUT, VOI LUT, presentation
LUT), ``encode`` writes JPEG, PNG or GIF with Pillow.  Nothing here knows HTTP.
"""
