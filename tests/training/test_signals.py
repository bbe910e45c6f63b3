"""SIGINT/SIGTERM as a stop request: the first one is a flag, the second acts as before."""

from __future__ import annotations

import os
import signal

import pytest

from medcap.training import StopSignals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_first_signal_is_a_stop_request_and_the_second_acts_as_before(sig):
    before = signal.getsignal(sig)
    with StopSignals() as stop:
        os.kill(os.getpid(), sig)
        assert stop.received == sig  # handled, not raised
        assert signal.getsignal(sig) is before  # a second one would act as usual
    assert signal.getsignal(sig) is before
    with StopSignals():
        assert signal.getsignal(sig) is not before
    assert signal.getsignal(sig) is before
