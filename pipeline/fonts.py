"""Fonts for the figures: matplotlib's DejaVu Sans first, Noto Sans CJK as its fallback.

Class names in Japanese, Chinese or Korean (`日本語`, `초코`) are normal for anime characters; DejaVu Sans has none of
their glyphs and matplotlib would draw empty boxes. Noto Sans CJK (SIL Open Font License 1.1) comes from the PyPI
package manimgx-fonts-cjk (pinned in requirements.txt): one variable-font collection that covers all three scripts.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import resources

CJK_FAMILY = "Noto Sans CJK JP"  # every regional face of the collection holds the Han, kana and Hangul glyphs
CJK_FILE = "NotoSansCJK-VF.otf.ttc"


def use_cjk_fallback() -> None:
    """Make the packaged Noto Sans CJK matplotlib's fallback family (figures created afterwards use it)."""
    import matplotlib

    _register()
    matplotlib.rcParams["font.family"] = ["DejaVu Sans", CJK_FAMILY]  # per glyph: the first family that has it


@functools.cache
def _register() -> None:
    """Add the font file to matplotlib's font manager, once per process."""
    from matplotlib import font_manager

    path = str(resources.files("manimgx_fonts_cjk") / CJK_FILE)
    known = {e.fname for e in font_manager.fontManager.ttflist}
    if path not in known:
        font_manager.fontManager.addfont(path)
        # A variable font registers its default instance (weight 100): declared normal, or every lookup logs a
        # "failed to find font weight normal" line.
        font_manager.fontManager.ttflist = [
            dataclasses.replace(e, weight=400) if e.fname == path else e for e in font_manager.fontManager.ttflist
        ]
