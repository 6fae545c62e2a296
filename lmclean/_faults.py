"""Named crash points for fault-injection tests: `LMCLEAN_CRASH_AT=name` kills the process there.

A real crash (os._exit: no cleanup handlers, no flushing) at each step boundary of a multi-step
write is how the tests prove that every boundary leaves the store consistent. Free when unset.
"""

from __future__ import annotations

import os


def crash_point(name: str) -> None:
    if os.environ.get("LMCLEAN_CRASH_AT") == name:
        os._exit(86)
