"""``ctzarr demo``: phantom datasets in the DAP Atlas, SAROS and TotalSegmentator layouts,
converted and queried."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ctzarr.read.collection import open_collection
from ctzarr.testing.phantom import write_dap_atlas, write_saros, write_totalsegmentator
from ctzarr.write.convert import convert

__all__ = ["run_demo"]


def _store_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_demo(
    directory: str | os.PathLike[str] = "ctzarr-demo", *, progress: bool = True
) -> dict[str, Path]:
    """Generate phantom datasets, convert them and print what was stored and how to query it.

    Returns
    -------
    dict
        Store paths by dataset id.
    """
    out = Path(directory)
    sources = out / "sources"
    print(f"ctzarr demo in {out}/")
    dap_src, saros_src = sources / "dap_atlas", sources / "saros"
    ts_src = sources / "totalsegmentator"
    if not (dap_src / "labels.json").exists():
        write_dap_atlas(dap_src, n_cases=3, shape_zyx=(80, 96, 96), seed=1)
    if not (saros_src / "Segmentation-Info.csv").exists():
        write_saros(saros_src, n_cases=2, shape_zyx=(60, 80, 80), seed=2)
    if not (ts_src / "meta.csv").exists():
        # one mask file per structure (empty ones too), tasks total and tissue_types
        write_totalsegmentator(
            ts_src, n_cases=2, shape_zyx=(60, 72, 72), seed=3, tasks=("total", "tissue_types")
        )
    stores = {
        "dap_atlas": out / "dap_atlas.zarr",
        "saros": out / "saros.zarr",
        "totalsegmentator": out / "totalsegmentator.zarr",
    }
    for name, src in (
        ("dap_atlas", dap_src),
        ("saros", saros_src),
        ("totalsegmentator", ts_src),
    ):
        src_bytes = sum(f.stat().st_size for f in src.rglob("*.nii.gz"))
        t0 = time.perf_counter()
        report = convert(src, stores[name], progress=progress)
        dt = time.perf_counter() - t0
        print(f"\n{name}: {report}")
        print(
            f"  {src_bytes / 1e6:.2f} MB of .nii.gz -> {_store_size(stores[name]) / 1e6:.2f} MB store in {dt:.1f} s"
        )
        _summarise(stores[name])
    print(
        "\nQuery it:\n"
        f"  ctzarr info {stores['dap_atlas']} --case {open_collection(stores['dap_atlas']).case_ids[0]}\n"
        f"  ctzarr stats {stores['dap_atlas']} --structure liver --structure 'kidney left'\n"
        f"  ctzarr crop {stores['dap_atlas']} {open_collection(stores['dap_atlas']).case_ids[0]} liver "
        f"--margin-mm 10 -o {out / 'liver.nii.gz'}\n"
        f"  ctzarr show {stores['dap_atlas']} {open_collection(stores['dap_atlas']).case_ids[0]} 'kidney left' "
        f"-o {out / 'kidney.png'}\n"
        f"  ctzarr stats {stores['saros']} --segmentation body_regions\n"
        f"  ctzarr stats {stores['totalsegmentator']} --structure liver --structure skeletal_muscle\n"
        f"  ctzarr export {stores['saros']} case_000 {out / 'export'}\n"
        f"  ctzarr verify {stores['dap_atlas']}\n"
        "  python -c \"import ctzarr; col = ctzarr.open_collection('"
        f"{stores['dap_atlas']}'); case = col[col.case_ids[0]]; print(case.labels('anatomy'))\""
    )
    return stores


def _summarise(store: Path) -> None:
    col = open_collection(store)
    for case in col:
        voxel_ml = float(np.prod(case.spacing)) / 1000.0
        parts = []
        for seg in case.segmentation_names:
            idx = case.index(seg)
            lm = col.segmentations[seg]
            top = np.argsort(idx.voxel_count)[::-1][:3]
            names = ", ".join(
                f"{lm[int(idx.labels[i])].normalized_name} {idx.voxel_count[i] * voxel_ml:.1f} ml"
                for i in top
            )
            sparse = (
                ""
                if idx.annotated_slices is None
                else f" ({len(idx.annotated_slices)} annotated slices)"
            )
            parts.append(f"{seg}: {len(idx.labels)} labels{sparse}; largest {names}")
        meta = ", ".join(f"{k} {v}" for k, v in case.attributes.items() if k in _META_SHOWN)
        print(f"  {case.case_id} {case.shape}{f' ({meta})' if meta else ''}: " + "; ".join(parts))


#: case attributes the summary shows (TotalSegmentator's meta.csv has these)
_META_SHOWN = ("age", "gender", "split")
