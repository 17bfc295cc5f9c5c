"""Progress bars: ``tqdm.auto`` (a widget in notebooks, text in a terminal), shown only when
the caller asks for them and the user has not set ``TQDM_DISABLE``.

tqdm reads ``TQDM_*`` variables as defaults, so an explicit ``disable=`` (as every
``progress=False`` needs) would silently override ``TQDM_DISABLE=1``; ``bar`` applies both.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm

OFF_VALUES = ("", "0", "false", "no", "off")


def disabled_by_environment() -> bool:
    """Whether ``TQDM_DISABLE`` is set to anything but empty, 0, false, no or off."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in OFF_VALUES


def bar(iterable=None, *, show: bool = True, **options) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **options)``, disabled unless ``show`` and not
    ``TQDM_DISABLE``."""
    return tqdm(iterable, disable=not show or disabled_by_environment(), **options)
