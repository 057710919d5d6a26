"""Fixtures of the fault-injection suite; the harness itself lives in harness.py."""

from .harness import (  # noqa: F401 - fixtures are found by name
    fault_broker,
    frame_bank,
    pipeline_factory,
    profile_bank,
    pytest_collection_modifyitems,
)
