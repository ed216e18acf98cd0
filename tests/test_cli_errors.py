"""Every CLI failure is one line that says what to do, a non-zero exit, and no traceback.

Run as a user would: the real entry point in a fresh process (``python -m ctzarr.cli``), real
servers (moto's S3 on 127.0.0.1), a closed port for a dead endpoint, a pipe closed by its
reader, and optional packages blocked with ``sys.modules[name] = None`` (the import then fails
as when the package is absent) — nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ctzarr

from .servers import moto_s3_server, unused_port

CLI = [sys.executable, "-m", "ctzarr.cli"]


def _assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The process failed with exit 1 and one ``ctzarr: error:`` line holding every needle."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    err = proc.stderr
    assert err.startswith("ctzarr: error: "), err
    assert err.count("\n") == 1, err
    assert err.endswith("\n"), err
    assert "Traceback" not in err
    assert "[Errno" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _run(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *argv],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
        cwd=cwd,
    )


def _aws_env(io: str, *, credentials: bool) -> dict[str, str]:
    """The environment of a user with (dummy) or without AWS credentials: no profile, no
    config files, and an instance metadata service that refuses at once (a closed port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{unused_port()}",
            "AWS_METADATA_SERVICE_TIMEOUT": "1",
            "AWS_METADATA_SERVICE_NUM_ATTEMPTS": "1",
            "CTZARR_IO": io,
            "CTZARR_RETRIES": "0",
        }
    )
    if credentials:
        env["AWS_ACCESS_KEY_ID"] = "ctzarr-fake-key"
        env["AWS_SECRET_ACCESS_KEY"] = "ctzarr-fake-secret"
    return env


# --------------------------------------------------------------------------------------------
# remote stores: credentials, endpoints, extras
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("io", ["fsspec", "obstore"])
def test_s3_without_credentials_names_the_variables(io: str) -> None:
    with moto_s3_server() as endpoint:
        options = json.dumps({"endpoint_url": endpoint})
        proc = _run(
            ["info", "s3://bucket/x.zarr", "--storage-options", options],
            env=_aws_env(io, credentials=False),
        )
    err = _assert_one_line(
        proc, "s3://bucket/x.zarr", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"
    )
    assert '"anon": true' in err
    assert "403" not in err


@pytest.mark.parametrize("io", ["fsspec", "obstore"])
def test_dead_s3_endpoint_names_it_and_is_not_a_403(io: str) -> None:
    port = unused_port()
    options = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"})
    proc = _run(
        ["info", "s3://bucket/x.zarr", "--storage-options", options],
        env=_aws_env(io, credentials=True),
    )
    err = _assert_one_line(proc, "s3://bucket/x.zarr", f"127.0.0.1:{port}", "connect")
    assert "403" not in err
    assert "ctzarr-fake" not in err  # never a credential in a message


def test_unknown_aws_profile_is_named() -> None:
    env = _aws_env("fsspec", credentials=False)
    env["AWS_PROFILE"] = "ctzarr-no-such-profile"
    proc = _run(["info", "s3://bucket/x.zarr"], env=env)
    _assert_one_line(proc, "AWS profile 'ctzarr-no-such-profile' not found", "AWS_PROFILE")


def _cli_without(
    blocked: tuple[str, ...], argv: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from ctzarr.cli import main
        sys.exit(main({argv!r}))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    ("blocked", "url", "extra"),
    [
        (("s3fs", "obstore"), "s3://bucket/x.zarr", "s3"),
        (("aiohttp", "obstore"), "https://127.0.0.1:9/x.zarr", "http"),
        (("gcsfs",), "gs://bucket/x.zarr", "gcs"),
    ],
    ids=["s3", "http", "gcs"],
)
def test_remote_store_without_its_extra(blocked: tuple[str, ...], url: str, extra: str) -> None:
    proc = _cli_without(blocked, ["info", url], env=_aws_env("auto", credentials=True))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f'ctzarr: error: ctzarr info needs {blocked[0]}: pip install "ctzarr[{extra}]"\n'
    )


@pytest.mark.parametrize("option", [["--workers", "2"], ["--scheduler", "tcp://127.0.0.1:9"]])
def test_cluster_without_distributed(saros_store: Path, option: list[str]) -> None:
    proc = _cli_without(("distributed",), ["stats", str(saros_store), "--scan", *option])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        f"ctzarr: error: ctzarr stats {option[0]} needs distributed: "
        'pip install "ctzarr[distributed]"\n'
    )
    assert proc.stdout == ""


# --------------------------------------------------------------------------------------------
# a closed pipe: quiet, status 0
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["info"], ["stats"], ["info", "--case", "case_000"]])
def test_closed_stdout_ends_quietly(saros_store: Path, argv: list[str]) -> None:
    """``ctzarr info STORE | head -0``: the reader is gone before the first line."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` exits
    try:
        proc = subprocess.run(
            [*CLI, argv[0], str(saros_store), *argv[1:]],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_head_reads_the_first_lines(saros_store: Path) -> None:
    """A real shell pipeline: ``ctzarr info STORE | head -1`` prints one line, exits 0."""
    cmd = f"{' '.join(CLI)} info {saros_store} --case case_000 | head -1; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(
        ["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("<ctzarr.Collection 'saros'")
    assert proc.stdout.count("\n") == 1
    assert proc.stderr == ""


# --------------------------------------------------------------------------------------------
# raw OS and zarr errors become ctzarr errors naming the path
# --------------------------------------------------------------------------------------------
def test_forced_layout_of_another_dataset(saros_source: Path, tmp_path: Path) -> None:
    proc = _run(["convert", str(saros_source), str(tmp_path / "x.zarr"), "--layout", "dap_atlas"])
    _assert_one_line(proc, str(saros_source), "not a dap_atlas dataset", "omit --layout")


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def test_export_into_a_file(dap_store: Path, a_file: Path) -> None:
    cid = ctzarr.open_collection(dap_store).case_ids[0]
    proc = _run(["export", str(dap_store), cid, str(a_file)])
    _assert_one_line(proc, str(a_file), "a file is in the way")


def test_crop_below_a_file(dap_store: Path, a_file: Path) -> None:
    cid = ctzarr.open_collection(dap_store).case_ids[0]
    proc = _run(["crop", str(dap_store), cid, "liver", "-o", str(a_file / "x.nii.gz")])
    _assert_one_line(proc, str(a_file), "a file is in the way")


def test_convert_onto_a_file(dap_source: Path, a_file: Path) -> None:
    proc = _run(["convert", str(dap_source), str(a_file), "-q"])
    _assert_one_line(proc, str(a_file))


@pytest.mark.parametrize("kind", ["empty-folder", "plain-group", "array", "missing"])
def test_not_a_collection(kind: str, tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "x.zarr"
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "plain-group":
        zarr.open_group(path, mode="w")
    elif kind == "array":
        zarr.create_array(path, shape=(2,), dtype="i1")
    for command in (["info"], ["stats"], ["verify"]):
        proc = _run([*command, str(path)])
        assert proc.returncode == 1, proc.stderr
        text = proc.stderr + proc.stdout  # verify reports on stdout
        assert str(path) in text
        assert "No group found" not in text
        assert "LocalStore" not in text
        assert "Traceback" not in text


def test_missing_case_document_is_named(dap_store: Path, tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "damaged.zarr"
    shutil.copytree(dap_store, store)
    cid = ctzarr.open_collection(store).case_ids[0]
    (store / "cases" / cid / "zarr.json").unlink()
    proc = _run(["info", str(store)])
    _assert_one_line(proc, cid, f"cases/{cid}/zarr.json", "ctzarr verify")
    assert "LocalStore" not in proc.stderr


def test_usage_errors_exit_2_with_usage(tmp_path: Path) -> None:
    proc = _run(["show", "store.zarr", "case", "liver", "-o", "x.png", "--plane", "oblique"])
    assert proc.returncode == 2
    assert "invalid choice: 'oblique'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["stats", "{store}", "-o", "{tmp}/x.txt"], ["-o", "x.txt", ".csv", ".parquet", ".json"]),
        (["show", "{store}", "{case}", "liver", "-o", "{tmp}/x.gif"], ["x.gif", ".png", ".jpg"]),
        (["crop", "{store}", "{case}", "liver", "-o", "{tmp}/x.mha"], ["x.mha", ".nii.gz"]),
        (["profile", "{store}", "{case}", "liver", "--plot", "{tmp}/x.pdf"], ["x.pdf", ".png"]),
        (
            ["show", "{store}", "{case}", "liver", "--window", "lungs", "-o", "{tmp}/x.png"],
            ["lung"],
        ),
        (["show", "{store}", "{case}", "liver", "--slice", "3", "-o", "{tmp}/x.png"], ["--plane"]),
        (["stats", "{store}", "--at", "liver", "--scan"], ["--at", "--scan"]),
    ],
    ids=["stats-ext", "show-ext", "crop-ext", "plot-ext", "window", "slice-no-plane", "at-scan"],
)
def test_bad_output_or_option_fails_before_any_work(
    dap_store: Path, tmp_path: Path, argv: list[str], needles: list[str]
) -> None:
    from ctzarr.cli.main import main

    cid = ctzarr.open_collection(dap_store).case_ids[0]
    out = tmp_path / "out"
    args = [a.format(store=dap_store, case=cid, tmp=out) for a in argv]
    proc = _run(args)
    _assert_one_line(proc, *needles)
    assert not out.exists()  # no folder created, nothing written
    assert main(args) == 1


def test_credential_faults_are_permission_faults_that_say_what_to_do() -> None:
    """botocore's own exceptions (not stand-ins), as s3fs raises them, through the classifier
    the store retries and the CLI share: never retried, and worded with what to set."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError, ProfileNotFound

    from ctzarr.io.faults import FaultKind, classify, is_transient

    for exc in (
        NoCredentialsError(),
        PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
    ):
        wrapped = OSError("s3fs failed")
        wrapped.__cause__ = exc
        for raised in (exc, wrapped):
            fault = classify(raised)
            assert fault.kind is FaultKind.PERMISSION
            assert "AWS_ACCESS_KEY_ID" in fault.description
            assert "AWS_PROFILE" in fault.description
        assert not is_transient(wrapped)
    fault = classify(ProfileNotFound(profile="lab"))
    assert fault.kind is FaultKind.PERMISSION
    assert fault.description.startswith("AWS profile 'lab' not found")


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"])
def test_wrong_credentials_are_told_apart_from_refused_access(code: str) -> None:
    from botocore.exceptions import ClientError

    from ctzarr.io.faults import FaultKind, classify

    def answer(error_code: str) -> ClientError:
        response = {
            "Error": {"Code": error_code, "Message": "no"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        }
        return ClientError(response, "GetObject")  # type: ignore[arg-type]

    fault = classify(answer(code))
    assert fault.kind is FaultKind.PERMISSION
    assert fault.description.startswith(f"HTTP 403 {code}")
    assert "wrong or expired" in fault.description
    assert "AWS_SECRET_ACCESS_KEY" in fault.description
    refused = classify(answer("AccessDenied"))  # right credentials, no permission: no such hint
    assert refused.kind is FaultKind.PERMISSION
    assert "AWS_SECRET_ACCESS_KEY" not in refused.description
