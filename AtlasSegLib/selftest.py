"""Running a module's ``ScriptedLoadableModuleTest`` the way *Reload and Test* does, with skips kept as skips.

Slicer's *Reload and Test* calls ``runTest()`` directly, outside unittest's runner, so a ``self.skipTest(...)``
(for example: the engine's Python packages are not installed yet) would surface as an exception and be shown as a
failure. ctest runs the ``test_*`` methods through unittest, which reports skips itself.
"""

from __future__ import annotations

import unittest
from collections.abc import Callable, Sequence


def runSelfTests(testCase: unittest.TestCase, tests: Sequence[Callable[[], None]],
                 setUp: Callable[[], None] | None = None) -> list[str]:
    """Run ``tests`` in order (``setUp`` before each); a skipped test is announced through the test case's
    ``delayDisplay`` (or printed) and the others still run. Returns the skip messages; failures propagate."""
    skipped = []
    for test in tests:
        if setUp is not None:
            setUp()
        try:
            test()
        except unittest.SkipTest as skip:
            message = f"{getattr(test, '__name__', 'test')} skipped: {skip}"
            skipped.append(message)
            announce = getattr(testCase, "delayDisplay", None)
            announce(message) if announce is not None else print(message)
    return skipped
