"""Shared fixtures: phantom atlas sets generated on the fly, and the real data under ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "dataset.json").is_file():
        pytest.skip(f"real data not found at {path} (../shared is absent on this machine)")
    return path


@pytest.fixture(scope="session")
def phantom_atlas_dir(tmp_path_factory) -> Path:
    from atlasseg.phantom import make_phantom_atlas_set

    return make_phantom_atlas_set(tmp_path_factory.mktemp("phantoms") / "atlases", n_cases=5, seed=1)
