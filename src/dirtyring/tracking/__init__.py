"""Layer 1: which guest pages changed since the last harvest (ring, bitmap, hot set)."""
from __future__ import annotations

from .bitmap import BitmapTracker, HotSetTracker, decode_bitmap, encode_bitmap
from .dirtyset import DirtySet
from .ring import RingTracker
from .tracker import TrackedSlot, Tracker, TrackerStats

KINDS = ("ring", "bitmap", "bitmap-clear", "hotset")

__all__ = ["DirtySet", "RingTracker", "BitmapTracker", "HotSetTracker", "Tracker", "TrackedSlot",
           "TrackerStats", "decode_bitmap", "encode_bitmap", "KINDS"]
