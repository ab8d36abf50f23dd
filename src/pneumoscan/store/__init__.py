"""The result store: studies, films, model results, deliveries, radiologists' reads and settings.

``Store.open(url)`` is the entry point (see store.py and docs/store.md); what it returns are the
frozen records of records.py. The store imports only from ``core``.
"""

from pneumoscan.store.migrate import StoreError, normalise_url
from pneumoscan.store.records import (CLAIMED, CSTORE, DEAD, DELIVERED, FAILED, FILM_STATES, LABELS, NOT_SCORED,
                                      PENDING, READ_LABELS, RECEIVED, SCORED, SCORING, STOW, STUDY_STATES, Delivery,
                                      Film, FilmHeader, Flag, ModelVersion, Read, Result, SettingChange, StudyDetail,
                                      StudySummary, Upserted)
from pneumoscan.store.store import DEFAULT_URL, SHADOW_MODE, Store

__all__ = ["Store", "StoreError", "normalise_url", "DEFAULT_URL", "SHADOW_MODE", "FilmHeader", "Film", "Flag",
           "ModelVersion", "Result", "Delivery", "Read", "StudySummary", "StudyDetail", "SettingChange", "Upserted",
           "RECEIVED", "CLAIMED", "SCORED", "NOT_SCORED", "FAILED", "SCORING", "FILM_STATES", "STUDY_STATES",
           "LABELS", "READ_LABELS", "CSTORE", "STOW", "PENDING", "DELIVERED", "DEAD"]
