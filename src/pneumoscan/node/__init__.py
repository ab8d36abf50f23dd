"""The DICOM node: films in from the PACS over DICOM, results (SR, optional SC) back out.

``receiver`` accepts C-STORE/C-ECHO and spools every instance to disk before acknowledging it;
``pipeline`` scores a study once it has been stable, with the same decoding and decision as
``pneumoscan predict``; ``results`` builds the DICOM objects; ``delivery`` sends them, with
retries and a dead-letter folder; ``runner`` ties them together for ``pneumoscan node``.
"""
