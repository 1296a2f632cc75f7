"""Images from a PACS: a dicomweb:// source fetched (QIDO-RS, WADO-RS) into the PHI zone, then ingested.

The server is a real Orthanc with its DICOMweb plugin (Debian's orthanc, orthanc-dicomweb; see
tests/orthanc.py) holding the brain-ct demo.  Without Orthanc those tests skip, except in CI
(HAVEN_SYSTEM_REQUIRED=1), where they fail.  The checks of URLs, credentials and queries need no
server.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml

import orthanc
from haven import fetch as pacs_fetch
from haven.config import section_defaults, validate
from haven.ingest import ingest

ENV = "HAVEN_TEST_PACS_LOGIN"
LOGIN = f"{orthanc.USER}:{orthanc.PASSWORD}"
SECRETS = (orthanc.PASSWORD, LOGIN, base64.b64encode(LOGIN.encode()).decode())


def settings(**changes) -> dict:
    """The pacs section as the schema fills it in, logged in through ENV, all CT studies."""
    s = section_defaults("pacs")
    s.update({"auth": "basic", "credentials_env": ENV, **changes})
    s["query"]["modalities"] = ["CT"]
    return s


def rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- no server needed ----------------------------------------------------------------------------

@pytest.mark.parametrize("source, error", [
    ("http://pacs:8042/dicom-web", "not a DICOMweb URL"),
    ("dicomweb:///dicom-web", "not a DICOMweb URL"),
    ("dicomweb://user:pw@pacs:8042/dicom-web", "user or password in the URL"),
    ("dicomweb://pacs:80x/dicom-web", "bad port"),
    ("dicomweb://pacs/dicom-web?StudyDate=2020", "pacs.query"),
])
def test_a_bad_url_names_source_and_the_fix(source, error):
    with pytest.raises(pacs_fetch.FetchError, match="source") as exc:
        pacs_fetch.server_url(source)
    assert error in str(exc.value)


def test_urls():
    assert pacs_fetch.server_url("dicomweb://pacs.example:8042/dicom-web/") == "http://pacs.example:8042/dicom-web"
    assert pacs_fetch.server_url("dicomwebs://pacs.example/rs") == "https://pacs.example/rs"


def test_credentials_come_from_the_variable_or_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(pacs_fetch.FetchError, match=f"{ENV} .pacs.credentials_env. is not set"):
        pacs_fetch.secret(settings())
    login = tmp_path / "login"
    login.write_text("alice:s3cret\n")
    assert pacs_fetch.secret(settings(credentials_file=str(login))) == "alice:s3cret"
    monkeypatch.setenv(ENV, "bob:other")
    assert pacs_fetch.secret(settings(credentials_file=str(login))) == "bob:other"  # the variable wins
    monkeypatch.setenv(ENV, "no-colon")
    with pytest.raises(pacs_fetch.FetchError, match="user:password"):
        pacs_fetch.secret(settings())
    with pytest.raises(pacs_fetch.FetchError, match="pacs.credentials_file"):
        pacs_fetch.secret(settings(credentials_env=None, credentials_file=str(tmp_path / "absent")))
    assert pacs_fetch.secret(settings(auth="none")) is None


def test_a_bearer_token_goes_in_the_authorization_header(monkeypatch):
    monkeypatch.setenv(ENV, "tok-123")
    web, _ = pacs_fetch.client("dicomweb://127.0.0.1:9/dicom-web", settings(auth="bearer"))
    assert web._session.headers["Authorization"] == "Bearer tok-123" and web._session.auth is None


def test_the_query_is_needed_and_a_list_is_dealt_into_shards(tmp_path):
    q = section_defaults("pacs", "query")
    with pytest.raises(pacs_fetch.FetchError, match="pacs.query: name the studies"):
        pacs_fetch.query_filters(q, (0, 1))
    (tmp_path / "acc").write_text("# accessions\n" + "\n".join(f"ACC{i:04d}" for i in range(40)) + "\n")
    q.update(accessions_file=str(tmp_path / "acc"), study_date="20200101-20201231")
    filters, deal = pacs_fetch.query_filters(q, (0, 1))
    assert not deal and len(filters) == 40 and filters[0] == {"StudyDate": "20200101-20201231", "AccessionNumber": "ACC0000"}
    shards = [{f["AccessionNumber"] for f in pacs_fetch.query_filters(q, (i, 3))[0]} for i in range(3)]
    assert sum(map(len, shards)) == 40 and set().union(*shards) == {f["AccessionNumber"] for f in filters}
    (tmp_path / "acc").write_text("ACC1\nACC*\n")
    with pytest.raises(pacs_fetch.FetchError, match="line 2") as exc:
        pacs_fetch.query_filters(q, (0, 1))
    assert "ACC" not in str(exc.value).replace(str(tmp_path / "acc"), "")  # the value itself is not repeated


def test_qido_pages_are_asked_for_while_the_server_says_there_are_more():
    more = pacs_fetch.MoreResults()
    uid = lambda v: {pacs_fetch.STUDY_UID: {"Value": [v]}}  # noqa: E731
    pages = {None: (["1.1", "1.2"], True), 2: (["1.3"], False)}

    def search(offset=None, **_):
        values, more.flag = pages[offset]
        return [uid(v) for v in values]

    assert [pacs_fetch._value(i, pacs_fetch.STUDY_UID) for i in pacs_fetch.search(search, more, pacs_fetch.STUDY_UID)] \
        == ["1.1", "1.2", "1.3"]

    def ignores_offset(offset=None, **_):  # a server that always sends page one and says "more"
        more.flag = True
        return [uid("1.1")]

    assert len(pacs_fetch.search(ignores_offset, more, pacs_fetch.STUDY_UID)) == 1  # and the loop ends


def _dated(date: str) -> dict:
    return {"projects": {"p": {"source": "dicomweb://pacs/rs", "pacs": {"query": {"study_date": date}}}}}


def test_the_schema_checks_the_study_date():
    for good in ("20200101", "20200101-", "-20201231", "20200101-20201231"):
        assert validate(_dated(good))["projects"]["p"]["pacs"]["auth"] == "none"
    for bad in ("2020", "-", "2020010120201231"):
        with pytest.raises(ValueError, match="projects.p.pacs.query.study_date"):
            validate(_dated(bad))


# --- against Orthanc -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A private Orthanc on 127.0.0.1 holding the brain-ct demo's DICOM (its two planted bad files,
    which are no DICOM, are refused by the server)."""
    why = orthanc.missing()
    if why:
        if os.environ.get("HAVEN_SYSTEM_REQUIRED") == "1":
            pytest.fail(f"CI must run the PACS tests: {why}")
        pytest.skip(why)
    from haven.demo import make_brain_ct

    root = tmp_path_factory.mktemp("pacs")
    make_brain_ct(root / "demo", n_patients=60)
    for seg in (root / "demo" / "dicom").rglob("seg.dcm"):
        seg.unlink()  # the PACS tests count the CT instances (a SEG in a PACS is ingest's concern: test_ingest)
    server = orthanc.start(root / "orthanc")
    try:
        stored = server.load(sorted((root / "demo" / "dicom").rglob("*.dcm")))
        assert stored == server.get("/statistics")["CountInstances"] == 240
        yield {"server": server, "demo": root / "demo"}
    finally:
        orthanc.stop(server)


@pytest.fixture
def login(monkeypatch):
    monkeypatch.setenv(ENV, LOGIN)


def test_fetch_writes_instances_under_hashed_names_in_a_private_folder(pacs, login, tmp_path):
    data, listing = tmp_path / "ingest" / "pacs" / "data", tmp_path / "ingest" / "pacs" / "shards" / "0" / "listing.csv"
    summary = pacs_fetch.fetch(pacs["server"].source, data, listing, settings())
    assert summary["studies"] == 60 and summary["instances"] == summary["fetched"] == 240
    files = sorted(p for p in data.rglob("*") if p.is_file())
    assert len(files) == 240 and {r["file"] for r in rows(listing)} == {p.relative_to(data).as_posix() for p in files}
    for folder in (data, data.parent, files[0].parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    ds = pydicom.dcmread(files[0])
    assert ds.SOPInstanceUID not in str(files[0]) and ds.PatientID not in str(files[0])
    original = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in (pacs["demo"] / "dicom").rglob("*/*/*.dcm")}
    assert pydicom.dcmread(original[ds.SOPInstanceUID]).PixelData == ds.PixelData
    # the merge keeps what the listings name and removes the rest (an earlier query's instance)
    stale = data / "00" / "stale.dcm"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"x")
    assert pacs_fetch.merge_fetch([listing], tmp_path / "listing.csv", data)["removed"] == 1 and not stale.exists()


def test_a_list_of_accessions_fetches_those_studies_only(pacs, login, tmp_path):
    wanted = [r["accession"] for r in rows(pacs["demo"] / "labels.csv")[:3]]
    (tmp_path / "acc.txt").write_text("\n".join(wanted) + "\n")
    s = settings()
    s["query"].update(accessions_file=str(tmp_path / "acc.txt"), modalities=[])
    summary = pacs_fetch.fetch(pacs["server"].source, tmp_path / "data", tmp_path / "listing.csv", s)
    assert summary["studies"] == 3 and summary["fetched"] == 12
    got = {str(pydicom.dcmread(p).AccessionNumber) for p in (tmp_path / "data").rglob("*.dcm")}
    assert got == set(wanted)


def _haven_fetch(pacs, work: Path, *extra: str, env: dict | None = None, popen: bool = False):
    s = settings()
    cmd = [sys.executable, "-m", "haven.cli", "-v", "fetch", pacs["server"].source, "--data", str(work / "data"),
           "--listing", str(work / "listing.csv"), "--params", json.dumps({"pacs": s}), *extra]
    env = {**os.environ, **(env or {})}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_credentials_and_identifiers_never_reach_the_log_or_outputs(pacs, tmp_path):
    run = _haven_fetch(pacs, tmp_path, env={ENV: LOGIN})
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr  # -v: debug logging on, as loud as it gets
    assert "240 fetched" in log
    leaked = [s for s in SECRETS if s in log]
    assert not leaked, leaked
    demo = rows(pacs["demo"] / "labels.csv")
    ds = pydicom.dcmread(next((tmp_path / "data").rglob("*.dcm")))
    for value in (demo[0]["accession"], str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientID)):
        assert value not in log
    for path in tmp_path.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not any(s.encode() in blob for s in SECRETS), path


def test_a_wrong_password_is_a_clear_error(pacs, tmp_path):
    run = _haven_fetch(pacs, tmp_path, env={ENV: f"{orthanc.USER}:wrong-password"})
    assert run.returncode == 2
    assert f"refused the credentials (HTTP 401): fix the user:password in the variable {ENV} (pacs.credentials_env)" \
        in run.stderr
    assert "wrong-password" not in run.stdout + run.stderr and not (tmp_path / "listing.csv").exists()


def test_no_login_and_no_server_are_clear_errors(pacs, login, tmp_path):
    with pytest.raises(pacs_fetch.FetchError, match="wants a login .HTTP 401.: set pacs.auth"):
        pacs_fetch.fetch(pacs["server"].source, tmp_path / "d", tmp_path / "l.csv", settings(auth="none"))
    dead = f"dicomweb://127.0.0.1:{orthanc.free_port()}/dicom-web"
    with pytest.raises(pacs_fetch.FetchError, match="cannot reach the DICOMweb server .* check host and port in `source`"):
        pacs_fetch.fetch(dead, tmp_path / "d", tmp_path / "l.csv", settings(auth="none", timeout=5))
    wrong_path = pacs["server"].source.replace("/dicom-web", "/wado")
    with pytest.raises(pacs_fetch.FetchError, match="HTTP 404.: check the path in `source`"):
        pacs_fetch.fetch(wrong_path, tmp_path / "d", tmp_path / "l.csv", settings())


def test_kill_9_mid_fetch_then_rerun_fetches_no_instance_twice(pacs, tmp_path):
    data = tmp_path / "data"
    proc = _haven_fetch(pacs, tmp_path, "--params", json.dumps({"pacs": settings(workers=2)}), env={ENV: LOGIN},
                        popen=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(data.rglob("*.dcm"))) < 40 and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the fetch ended before it could be killed"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in data.rglob("*.dcm")}
    assert 40 <= len(before) < 240 and not (tmp_path / "listing.csv").exists()
    run = _haven_fetch(pacs, tmp_path, env={ENV: LOGIN})
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["present"] == len(before) and summary["fetched"] == 240 - len(before)
    # the instances of the killed run are the same files, untouched: none was fetched again
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == v for p, v in before.items())
    assert len(list(data.rglob("*.dcm"))) == 240 and not list(data.rglob(".*.tmp"))  # a killed write's temp is gone
    assert all(pydicom.dcmread(p).SOPInstanceUID for p in data.rglob("*.dcm"))


@pytest.mark.integration
def test_the_dag_from_the_pacs_gives_the_manifest_of_the_files(root, pacs, tmp_path):
    """Snakemake: fetch_shard (2 shards), fetch, ingest_shard, ingest for a dicomweb:// project; its
    manifest equals ingest of the same files from disk, up to the paths; and the fetched files go
    on through anonymize to a passed audit (anonymize once read the source URL as a folder)."""
    work = tmp_path / "work"
    work.mkdir()
    conf = yaml.safe_load((root / "config.yaml").read_text())
    conf["projects"] = {"pacs": {
        "source": pacs["server"].source, "labels": str(pacs["demo"] / "labels.csv"), "label_key": "accession",
        "shards": 2, "pacs": {"auth": "basic", "credentials_env": ENV, "query": {"modalities": ["CT"]}}}}
    (work / "config.yaml").write_text(yaml.safe_dump(conf))
    cmd = [sys.executable, "-m", "snakemake", "results/pacs/ingest/manifest.csv", "results/pacs/anonymize/audit.json",
           "-s", str(root / "Snakefile"),
           "--directory", str(work), "--configfile", str(work / "config.yaml"), "--cores", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, ENV: LOGIN})
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    ingest(pacs["demo"] / "dicom", tmp_path / "disk", labels=pacs["demo"] / "labels.csv", label_key="accession")

    def table(path):
        return sorted(({k: v for k, v in r.items() if k != "path"} for r in rows(path)), key=lambda r: r["sop_uid"])

    from_pacs = table(work / "results" / "pacs" / "ingest" / "manifest.csv")
    assert len(from_pacs) == 240 and from_pacs == table(tmp_path / "disk" / "manifest.csv")
    logs = "".join(p.read_text() for p in (work / "results" / "pacs" / "logs").rglob("*.log"))
    assert "240 instances" in logs and not any(s in logs + run.stdout + run.stderr for s in SECRETS)
    audit = json.loads((work / "results" / "pacs" / "anonymize" / "audit.json").read_text())
    assert audit["passed"] and audit["files"] == 240
