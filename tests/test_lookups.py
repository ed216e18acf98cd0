"""Case, segmentation and structure lookups raise ctzarr errors that are also KeyError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ctzarr

LOOKUPS: list[tuple[str, Callable[[Any], object], type[ctzarr.CtzarrError], str]] = [
    ("unknown-case", lambda col: col["no_such_case"], ctzarr.CaseNotFoundError, "no_such_case"),
    ("hostile-case-id", lambda col: col["../x"], ctzarr.CaseNotFoundError, "'../x'"),
    (
        "cohort-unknown-case",
        lambda col: col.stats(cases=["no_such_case"]),
        ctzarr.CaseNotFoundError,
        "no_such_case",
    ),
    (
        "cohort-unknown-segmentation",
        lambda col: col.stats(segmentation="no_such_map"),
        ctzarr.SegmentationNotFoundError,
        "no_such_map",
    ),
    (
        "case-unknown-segmentation",
        lambda col: col[col.case_ids[0]].labels("no_such_map"),
        ctzarr.SegmentationNotFoundError,
        "no_such_map",
    ),
    (
        "unknown-structure",
        lambda col: col[col.case_ids[0]].crop("no such organ"),
        ctzarr.StructureNotFoundError,
        "no such organ",
    ),
]


@pytest.mark.parametrize(
    ("lookup", "error", "named"), [c[1:] for c in LOOKUPS], ids=[c[0] for c in LOOKUPS]
)
def test_lookup_errors_are_ctzarr_errors_and_key_errors(
    dap_store: Path, lookup: Callable[[Any], object], error: type[ctzarr.CtzarrError], named: str
) -> None:
    col = ctzarr.open_collection(dap_store)
    with pytest.raises(error) as info:
        lookup(col)
    assert isinstance(info.value, KeyError)
    assert named in str(info.value)
    assert not str(info.value).startswith(("'", '"'))  # the message, not KeyError's repr of it


def test_every_error_is_exported() -> None:
    import ctzarr.errors

    exported = {
        name
        for name, value in vars(ctzarr.errors).items()
        if isinstance(value, type) and issubclass(value, (ctzarr.CtzarrError, ctzarr.CtzarrWarning))
    }
    assert exported <= set(ctzarr.__all__), sorted(exported - set(ctzarr.__all__))
    assert set(ctzarr.errors.__all__) == exported
