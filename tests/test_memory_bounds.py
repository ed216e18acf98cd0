"""A16, A17: decompression and size bombs under an address-space limit, in a fresh process.

Each test runs the converter in a child Python process. The child imports ctzarr and converts a
tiny warm-up case first (numba kernels, codec threads, zarr's event loop: ~0.7-1 GB of virtual
address space before any voxel is read), measures its virtual size, and only then lowers
``RLIMIT_AS`` to that size plus a margin. Setting the limit in the child itself, after the
imports, measures the baseline in the very process that is limited (a ``preexec_fn`` would need a
probe process and a guess of how much the imports map). A control allocation larger than the
margin must then fail with ``MemoryError``, which proves the limit bites.

- A16: an 89-byte-class ``.nii.gz`` (and a 352-byte ``.nii``) whose header claims 1024^3 int16
  (2 GiB) is refused from its header alone (the deflate-ratio and file-size checks) in well
  under a second, with our error, allocating nothing; a valid case of the same run converts.
  nibabel's full read of the same file dies with ``MemoryError`` under the same limit (it
  allocates the declared size first).
- A17: an honest 2 MB ``.nii.gz`` that inflates to 2 GiB of zeros (512 x 512 x 4096 int16, with a
  1 GiB uint8 label of zeros) is within every cap (deflate ratio ~1029:1, under the 1032:1
  bound; 2 GiB under the 64 GiB cap), so it is converted, slab by slab, under a limit of
  baseline + 1 GiB: half the image alone. Converting all 3 GiB costs ~14 CPU-seconds on
  this machine, so the full 2 GiB case is run rather than a smaller stand-in.

Figures (time, CPU time, peak RSS, virtual sizes) are printed under ``pytest -s``.
"""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import zarr

import ctzarr

try:  # 4x faster than zlib's crc32 over the 2 GiB of zeros
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

MIB = 2**20
AFFINE = np.diag([0.75, 0.75, 1.5, 1.0])  # exact in float32
LABELS = {"0": "background", "1": "a"}

CHILD = textwrap.dedent(
    r"""
    import json, logging, resource, sys, time

    args = json.loads(sys.argv[1])


    def status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmPeak", "VmSize", "VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) / 1024  # MiB
        return out


    t_start = time.perf_counter()
    import numpy as np
    import nibabel as nib
    import ctzarr
    from ctzarr.errors import CtzarrError

    warm = ctzarr.convert(args["warm_manifest"], args["warm_dest"], labels=[args["labels"]], progress=False)
    assert warm.ok, str(warm)
    before = status()
    limit = int((before["VmSize"] + args["margin_mib"]) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {
        "startup_seconds": time.perf_counter() - t_start,
        "baseline_vm_mib": before["VmSize"],
        "limit_mib": limit / 2**20,
        "rss_before_mib": before["VmHWM"],
    }
    try:
        block = bytearray(args["control_mib"] * 2**20)
        out["control"] = "allocated"
        del block
    except MemoryError:
        out["control"] = "MemoryError"

    errors = {}


    class Grab(logging.Handler):
        def emit(self, record):
            if record.msg == "case %s failed: %s":
                errors[str(record.args[0])] = record.args[1]


    logging.getLogger("ctzarr.write.convert").addHandler(Grab(logging.WARNING))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.get("open_first"):  # the header checks alone first: their own peak
        from ctzarr.sources.nifti import open_nifti

        for path in args["open_first"]:
            try:
                open_nifti(path)
                out.setdefault("opened", []).append(path)
            except CtzarrError:
                pass
        out["open_first_peak_rss_mib"] = status()["VmHWM"]
    report = ctzarr.convert(args["manifest"], args["dest"], labels=[args["labels"]], progress=False)
    results = report.results
    out["seconds"] = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    after = status()
    out.update(
        cpu_seconds=r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
        # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss starts at the forking process's
        # high-water mark (the pytest process: ~550 MiB late in a full run)
        peak_rss_mib=after["VmHWM"],
        vm_peak_mib=after["VmPeak"],
        converted=report.converted,
        results={r.case_id: [r.status, r.seconds, r.error] for r in results},
        error_types={
            cid: [type(e).__name__, isinstance(e, CtzarrError)] for cid, e in errors.items()
        },
    )
    for path in args.get("nibabel_full_read", []):
        t0 = time.perf_counter()
        try:
            np.asanyarray(nib.load(path).dataobj)
            outcome = "read"
        except MemoryError:
            outcome = "MemoryError"
        except Exception as exc:
            outcome = type(exc).__name__
        out.setdefault("nibabel_full_read", {})[path] = [outcome, time.perf_counter() - t0]
    print("RESULT " + json.dumps(out))
    """
)


def run_child(
    tmp: Path,
    manifest: Path,
    dest: Path,
    margin_mib: int,
    control_mib: int,
    nibabel_full_read: list[str] | None = None,
    timeout: float = 300,
    open_first: list[str] | None = None,
) -> dict[str, Any]:
    """Convert manifest into dest in a fresh, address-space-limited process; its figures."""
    warm = tmp / "warm"
    warm_manifest = write_pairs_dir(warm, {"w": (tiny_nifti(np.int16), tiny_nifti(np.uint8))})
    args = {
        "warm_manifest": str(warm_manifest),
        "warm_dest": str(tmp / "warm.zarr"),
        "labels": str(warm / "labels.json"),
        "manifest": str(manifest),
        "dest": str(dest),
        "margin_mib": margin_mib,
        "control_mib": control_mib,
        "nibabel_full_read": nibabel_full_read or [],
        "open_first": open_first or [],
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    assert result["control"] == "MemoryError", result  # the limit really is in force
    assert result["vm_peak_mib"] <= result["limit_mib"] + 1, result
    return result


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def header_bytes(shape_xyz: tuple[int, ...], dtype: type) -> bytes:
    """A plausible single-file NIfTI-1 header (352 bytes, with the extension flag)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape_xyz)
    hdr.set_qform(AFFINE, code=1)
    hdr.set_sform(AFFINE, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["vox_offset"] = 352
    return bytes(hdr.binaryblock) + b"\0" * 4


def tiny_nifti(dtype: type) -> bytes:
    data = (np.arange(5 * 6 * 7) % 2).astype(dtype).reshape(5, 6, 7)
    return gzip.compress(nib.Nifti1Image(data, AFFINE).to_bytes(), mtime=0)


def write_pairs_dir(
    root: Path, cases: dict[str, tuple[bytes, bytes]], suffix: str = ".nii.gz"
) -> Path:
    """A pairs dataset: cases of (image bytes, label bytes); returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["case_id,image,seg"]
    for cid, (image, label) in cases.items():
        img_suffix = ".nii.gz" if image[:2] == b"\x1f\x8b" else ".nii"
        (root / f"{cid}_ct{img_suffix}").write_bytes(image)
        (root / f"{cid}_seg.nii.gz").write_bytes(label)
        lines.append(f"{cid},{cid}_ct{img_suffix},{cid}_seg.nii.gz")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root / "manifest.csv"


def write_zero_bomb(
    path: Path, shape_xyz: tuple[int, int, int], dtype: type, segment: int = 64 * MIB
) -> int:
    """A .nii.gz of zeros written without ever holding the volume; returns the voxel bytes.

    The deflate stream is the header, then one ``Z_FULL_FLUSH``-terminated compressed block of
    ``segment`` zero bytes repeated (a full flush resets the window, so each copy decodes on its
    own), then the gzip trailer with the CRC32 and length of everything.
    """
    head = header_bytes(shape_xyz, dtype)
    nbytes = int(np.prod(shape_xyz)) * np.dtype(dtype).itemsize
    assert nbytes % segment == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(segment)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = deflate.flush(zlib.Z_FINISH)
    crc = crc32(head)
    for _ in range(nbytes // segment):
        crc = crc32(zeros, crc)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip, deflate, no name, mtime 0
        f.write(first)
        for _ in range(nbytes // segment):
            f.write(block)
        f.write(last)
        f.write(struct.pack("<II", crc & 0xFFFFFFFF, (len(head) + nbytes) & 0xFFFFFFFF))
    return nbytes


BOMB_SHAPE_XYZ = (512, 512, 4096)  # 2 GiB of int16; the label 1 GiB of uint8


@pytest.fixture(scope="session")
def zero_bomb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 2 GiB (image) + 1 GiB (label) zero bombs, made once per session."""
    root = tmp_path_factory.mktemp("zero-bomb")
    image, label = root / "zeros_ct.nii.gz", root / "zeros_seg.nii.gz"
    image_bytes = write_zero_bomb(image, BOMB_SHAPE_XYZ, np.int16)
    label_bytes = write_zero_bomb(label, BOMB_SHAPE_XYZ, np.uint8)
    (root / "manifest.csv").write_text(
        "case_id,image,seg\nzeros,zeros_ct.nii.gz,zeros_seg.nii.gz\n"
    )
    (root / "labels.json").write_text(json.dumps(LABELS))
    return {
        "root": root,
        "image": image,
        "label": label,
        "image_bytes": image_bytes,
        "label_bytes": label_bytes,
    }


def test_zero_bomb_file_is_what_it_claims(zero_bomb: dict[str, Any]) -> None:
    """The bomb is an honest gzip: nibabel reads its header, and its first slices are zeros."""
    image = zero_bomb["image"]
    size = image.stat().st_size
    assert 1.9 * MIB < size < 2.2 * MIB, size
    assert zero_bomb["image_bytes"] == 2 * 2**30
    assert 1000 < zero_bomb["image_bytes"] / size < 1032  # right under deflate's bound
    img = nib.load(image)
    assert img.shape == BOMB_SHAPE_XYZ
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(img.affine, AFFINE)
    with gzip.open(image, "rb") as f:
        head = f.read(352 + 4 * MIB)
    assert head[:352] == header_bytes(BOMB_SHAPE_XYZ, np.int16)
    assert head[352:] == bytes(4 * MIB)


# --------------------------------------------------------------------------------------------
# A16: size bombs refused from the header
# --------------------------------------------------------------------------------------------


def test_a16_header_bomb_refused_fast_without_allocating(tmp_path: Path) -> None:
    header = header_bytes((1024, 1024, 1024), np.int16)
    bomb_gz = gzip.compress(header, mtime=0)
    assert len(bomb_gz) < 100  # the 89-byte class: a header and nothing else
    src = tmp_path / "src"
    manifest = write_pairs_dir(
        src,
        {
            "bomb_gz": (bomb_gz, tiny_nifti(np.uint8)),
            "bomb_raw": (header, tiny_nifti(np.uint8)),
            "good": (tiny_nifti(np.int16), tiny_nifti(np.uint8)),
        },
    )
    dest = tmp_path / "out.zarr"
    res = run_child(
        tmp_path,
        manifest,
        dest,
        margin_mib=300,
        control_mib=512,
        nibabel_full_read=[str(src / "bomb_gz_ct.nii.gz")],
        open_first=[str(src / "bomb_gz_ct.nii.gz"), str(src / "bomb_raw_ct.nii")],
    )
    print(
        f"\nA16 header bomb ({len(bomb_gz)}-byte .nii.gz and 352-byte .nii claiming 1024^3 int16 = 2 GiB): "
        f"refused in {res['results']['bomb_gz'][1] * 1000:.1f} ms and "
        f"{res['results']['bomb_raw'][1] * 1000:.1f} ms; whole run {res['seconds']:.2f} s "
        f"({res['cpu_seconds']:.2f} CPU-s) with a valid case; peak RSS {res['open_first_peak_rss_mib']:.0f} MiB "
        f"after refusing both headers, {res['peak_rss_mib']:.0f} MiB after the conversion "
        f"(before the run {res['rss_before_mib']:.0f} MiB, imports and warm-up included); "
        f"RLIMIT_AS {res['limit_mib']:.0f} MiB = baseline {res['baseline_vm_mib']:.0f} + 300; "
        f"nibabel's full read under the same limit: {res['nibabel_full_read']}"
    )
    assert res["converted"] == ["good"]
    for cid, words in (("bomb_gz", "can inflate to at most"), ("bomb_raw", "holds only")):
        status, seconds, error = res["results"][cid]
        assert status == "failed"
        assert seconds < 1.0, seconds
        assert res["error_types"][cid] == ["InvalidNiftiError", True]
        assert words in error, error
        assert str(2 * 2**30) in error, error
        assert f"case {cid!r}" in error, error
        assert f"{cid}_ct.nii" in error
    # what refusing the bombs' headers costs, measured apart from the conversion around it;
    # the conversion itself runs under RLIMIT_AS = baseline + 300 MiB (a 2 GiB allocation
    # would end in MemoryError, not in InvalidNiftiError)
    assert "opened" not in res, res
    assert res["open_first_peak_rss_mib"] - res["rss_before_mib"] < 50, res
    assert res["peak_rss_mib"] - res["rss_before_mib"] < 50, res  # the whole conversion too
    assert next(iter(res["nibabel_full_read"].values()))[0] == "MemoryError"
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ["good"]
    assert not (dest / "cases" / "bomb_gz").exists()
    assert not (dest / "cases" / "bomb_raw").exists()


# --------------------------------------------------------------------------------------------
# A17: an honest 2 GiB inflate bomb converts slab by slab
# --------------------------------------------------------------------------------------------


def test_a17_zero_bomb_converts_slab_wise_under_a_limit_smaller_than_the_volume(
    zero_bomb: dict[str, Any], tmp_path: Path
) -> None:
    margin_mib = 1024  # baseline + 1 GiB: half the 2 GiB image, a third of image + label
    dest = tmp_path / "zeros.zarr"
    res = run_child(
        tmp_path,
        zero_bomb["root"] / "manifest.csv",
        dest,
        margin_mib=margin_mib,
        control_mib=2048,
        nibabel_full_read=[str(zero_bomb["image"])],
    )
    slab_mib = 64 * 512 * 512 * 2 / MIB
    grew = res["peak_rss_mib"] - res["rss_before_mib"]
    print(
        f"\nA17 zero bomb ({zero_bomb['image'].stat().st_size / MIB:.2f} MB .nii.gz -> 2 GiB int16 "
        f"512x512x4096, + {zero_bomb['label'].stat().st_size / MIB:.2f} MB -> 1 GiB uint8 label): "
        f"{res['results']['zeros'][0]} in {res['seconds']:.1f} s ({res['cpu_seconds']:.1f} CPU-s); "
        f"peak RSS {res['peak_rss_mib']:.0f} MiB, {grew:.0f} MiB over the {res['rss_before_mib']:.0f} MiB "
        f"before ({grew / slab_mib:.1f} image slabs of {slab_mib:.0f} MiB); virtual peak "
        f"{res['vm_peak_mib']:.0f} MiB under RLIMIT_AS {res['limit_mib']:.0f} MiB = baseline "
        f"{res['baseline_vm_mib']:.0f} + {margin_mib}; nibabel's full read under the same limit: "
        f"{next(iter(res['nibabel_full_read'].values()))}"
    )
    assert res["converted"] == ["zeros"], res["results"]
    assert grew < 512, res  # ~10 slabs in flight (ring buffers, pyramid, codecs), never the 3 GiB
    assert next(iter(res["nibabel_full_read"].values()))[0] == "MemoryError"
    case = ctzarr.open_collection(dest)["zeros"]
    assert case.shape == BOMB_SHAPE_XYZ[::-1]
    assert case.image.dtype == np.int16
    np.testing.assert_array_equal(case.affine, AFFINE)
    for z in (0, 2047, 4095):
        assert not case.image[z].values.any()
    assert len(case.index("seg").labels) == 0
    level0 = zarr.open_array(dest / "cases" / "zeros" / "0", mode="r")
    assert level0.nchunks_initialized == 0  # zeros are the fill value: nothing stored
