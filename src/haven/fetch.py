"""The fetch stage: a project's studies from a PACS over DICOMweb into the PHI zone, before ingest.

A project whose ``source`` is ``dicomweb://host:port/path`` (``dicomwebs://`` for https) names a
DICOMweb server and ``pacs.query`` the studies.  Each fetch shard finds its studies with QIDO-RS,
lists their instances and retrieves the missing ones with WADO-RS (``dicomweb-client``) into
``results/<project>/ingest/pacs/data/`` (mode 0700), which is then ingest's source folder.

Resumable: an instance is written atomically (:func:`haven.io.atomic_open`) under a name derived
from its SOPInstanceUID by a hash (no identifier in a file name), so after a kill -9 the rerun
skips every instance already present; the shard's listing, written last, is its done-marker.
:func:`merge_fetch` joins the listings and removes instances no listing names (left by an earlier
query), so ingest sees exactly what the query found.

Credentials come from a file or an environment variable the config names (``pacs.credentials_*``),
never from the URL; logs and errors carry counts and the server's base URL, never a query value
(accession numbers, UIDs) nor a secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from haven.io import atomic_open, read_rows, write_rows
from haven.shards import REMOTE_SCHEMES, shard_of

log = logging.getLogger(__name__)
# dicomweb-client logs every study, series and instance UID at INFO, urllib3 every query string at
# DEBUG and retrying each failed request's URL (with its query string) at WARNING: identifiers that
# must not reach the fetch log (outside the PHI zone); our own errors say what failed instead
for _name, _level in (("dicomweb_client", logging.WARNING), ("urllib3", logging.WARNING), ("retrying", logging.ERROR)):
    logging.getLogger(_name).setLevel(_level)

LISTING_COLUMNS = ["file", "study_uid", "series_uid", "sop_uid"]
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class FetchError(ValueError):
    """The source, query or server said no; the message names the config key and the fix."""


def server_url(source: str) -> str:
    """``dicomweb://host:port/path`` → ``http://host:port/path`` (``dicomwebs://`` → https)."""
    parts = urlsplit(str(source))
    scheme = {"dicomweb": "http", "dicomwebs": "https"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise FetchError(f"source {source!r} is not a DICOMweb URL: give `source` as "
                         f"{REMOTE_SCHEMES[0]}host:port/dicom-web ({REMOTE_SCHEMES[1]} for https)")
    if parts.username or parts.password:
        raise FetchError("source: a user or password in the URL would be logged; remove it from `source` "
                         "and name a file or variable in pacs.credentials_file / pacs.credentials_env")
    if parts.query or parts.fragment:
        raise FetchError("source: the DICOMweb URL takes no ?query or #fragment; put the query in pacs.query")
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        raise FetchError(f"source: bad port in {source!r}: give `source` as dicomweb://host:port/path") from None
    return f"{scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"


def secret(pacs: dict) -> str | None:
    """The credentials the config points at (the variable wins over the file), or None for auth none."""
    if pacs["auth"] == "none":
        return None
    env, path = pacs["credentials_env"], pacs["credentials_file"]
    form = "user:password" if pacs["auth"] == "basic" else "the token"
    if env and os.environ.get(env):
        value = os.environ[env]
    elif path:
        try:
            value = Path(path).read_text()
        except OSError as exc:
            raise FetchError(f"pacs.credentials_file {path}: cannot read it ({exc.strerror}); "
                             f"write {form} into it (chmod 600) or set pacs.credentials_env") from None
    else:
        where = f"the variable {env} (pacs.credentials_env) is not set" if env else "no credentials named"
        raise FetchError(f"pacs.auth is {pacs['auth']} but {where}: export it holding {form}, "
                         "or name a file holding it in pacs.credentials_file")
    value = value.strip()
    if not value or (pacs["auth"] == "basic" and ":" not in value):
        raise FetchError(f"pacs.auth basic needs user:password in {_origin(pacs)}: fix its content")
    return value


def _origin(pacs: dict) -> str:
    env = pacs["credentials_env"]
    if env and os.environ.get(env):
        return f"the variable {env} (pacs.credentials_env)"
    return f"the file {pacs['credentials_file']} (pacs.credentials_file)"


def client(source: str, pacs: dict):
    """A DICOMweb client for the project's server, logged in as the config says, and the hook that
    tells :func:`search` whether the server holds more results."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    value = secret(pacs)
    if pacs["auth"] == "basic":
        user, _, password = value.partition(":")
        session.auth = (user, password)
    elif pacs["auth"] == "bearer":
        session.headers["Authorization"] = f"Bearer {value}"
    if pacs["ca_bundle"]:
        session.verify = pacs["ca_bundle"]
    more = MoreResults()
    session.hooks["response"].append(more)
    web = DICOMwebClient(server_url(source), session=session, timeout=pacs["timeout"])
    # a refused login or a missing study is an answer, not a hiccup: retry only the server's busy codes
    web.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
    return web, more


@contextlib.contextmanager
def remote(web, pacs: dict):
    """Turn the HTTP library's errors into a FetchError that names the fix.  Their own text carries
    the request's URL with its query string (accession numbers, UIDs), so it is never repeated."""
    import requests

    url = web.base_url
    try:
        yield
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403) and pacs["auth"] == "none":
            raise FetchError(f"the DICOMweb server {url} wants a login (HTTP {status}): set pacs.auth (basic or "
                             "bearer) and pacs.credentials_file or pacs.credentials_env") from None
        if status in (401, 403):
            raise FetchError(f"the DICOMweb server {url} refused the credentials (HTTP {status}): fix the "
                             f"{'user:password' if pacs['auth'] == 'basic' else 'token'} in {_origin(pacs)}"
                             ) from None
        if status == 404:
            raise FetchError(f"no DICOMweb service at {url} (HTTP 404): check the path in `source` "
                             "(Orthanc: /dicom-web, dcm4chee: /dcm4chee-arc/aets/<AET>/rs)") from None
        raise FetchError(f"the DICOMweb server {url} answered HTTP {status}: check the server's log") from None
    except requests.exceptions.SSLError:
        raise FetchError(f"TLS with {url} failed: check the certificate or set pacs.ca_bundle") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise FetchError(f"cannot reach the DICOMweb server {url} ({type(exc).__name__}): check host and port "
                         f"in `source`, that the server runs, and pacs.timeout ({pacs['timeout']} s)") from None


class MoreResults:
    """A response hook: whether the server's last answer said it holds more QIDO-RS results than it
    sent (a Warning header with code 299, PS3.18 8.3.4.4)."""

    flag = False

    def __call__(self, response, *args, **kwargs):
        self.flag = "299" in response.headers.get("Warning", "")
        return response


def search(method, more: MoreResults, key: str, **kwargs) -> list[dict]:
    """Every result of a QIDO-RS search (``method``: the client's ``search_for_*``), deduplicated by
    the ``key`` tag.  Further pages are asked for (by offset) only while the server's Warning
    header says there are more: paging blindly is unreliable (Orthanc 1.10 ignores the offset of a
    ModalitiesInStudy query, so dicomweb-client's get_remaining never ends)."""
    found: dict[str, dict] = {}
    offset = 0
    while True:
        page = method(offset=offset or None, **kwargs)
        offset += len(page)
        new = {v: item for item in page if (v := _value(item, key)) and v not in found}
        found.update(new)
        if not new or not more.flag:
            return [found[k] for k in sorted(found)]


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return str(values[0]) if values[0] is not None else None


def _list_file(path: str | None, key: str, check) -> list[str]:
    """The values of a one-per-line file (blank lines and # comments skipped).  A bad line is named
    by its number only: its value is an identifier."""
    if not path:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise FetchError(f"pacs.query.{key} {path}: cannot read it ({exc.strerror})") from None
    values = []
    for n, line in enumerate(lines, 1):
        value = line.split("#", 1)[0].strip()
        if value and not check(value):
            raise FetchError(f"pacs.query.{key} {path}, line {n}: not a valid value (one per line, no wildcards)")
        if value:
            values.append(value)
    return sorted(set(values))


def query_filters(query: dict, shard: tuple[int, int]) -> tuple[list[dict], bool]:
    """The QIDO-RS study queries of ``pacs.query`` for this shard, and whether the studies they find
    still need dealing into shards (a list of accessions or UIDs is dealt before querying, so that
    each shard job asks only for its own)."""
    accessions = _list_file(query["accessions_file"], "accessions_file", lambda v: not re.search(r"[*?\\,]", v))
    uids = _list_file(query["study_uids_file"], "study_uids_file", lambda v: bool(_UID.match(v)) and len(v) <= 64)
    if accessions and uids:
        raise FetchError("pacs.query: give accessions_file or study_uids_file, not both")
    if not (accessions or uids or query["study_date"] or query["modalities"]):
        raise FetchError("pacs.query: name the studies to fetch (study_date, modalities, accessions_file or "
                         "study_uids_file); a dicomweb source never fetches the whole PACS")
    base = {"StudyDate": query["study_date"]} if query["study_date"] else {}
    per_modality = [{**base, "ModalitiesInStudy": m} for m in query["modalities"]] or [base]
    index, n = shard
    entries = [("AccessionNumber", v) for v in accessions] + [("StudyInstanceUID", v) for v in uids]
    if not entries:
        return per_modality, True
    mine = [(k, v) for k, v in entries if shard_of(v, n) == index]
    return [{**f, k: v} for k, v in mine for f in per_modality], False


def find_studies(web, more: MoreResults, query: dict, shard: tuple[int, int]) -> list[str]:
    """The StudyInstanceUIDs of this shard's studies, sorted."""
    filters, deal = query_filters(query, shard)
    found = set()
    for f in filters:
        for item in search(web.search_for_studies, more, STUDY_UID, search_filters=f, fields=["StudyInstanceUID"]):
            uid = _value(item, STUDY_UID)
            if uid:
                found.add(uid)
    index, n = shard
    return sorted(u for u in found if not deal or shard_of(u, n) == index)


def find_instances(web, more: MoreResults, study: str, modalities: list[str]) -> list[tuple[str, str]]:
    """(series, SOP instance UID) of every instance of the study, in the series of ``modalities``
    only when given (a CT study's dose report stays in the PACS)."""
    out = []
    for series in search(web.search_for_series, more, SERIES_UID, study_instance_uid=study):
        uid = _value(series, SERIES_UID)
        if not uid or (modalities and _value(series, MODALITY) not in modalities):
            continue
        for inst in search(web.search_for_instances, more, SOP_UID, study_instance_uid=study,
                           series_instance_uid=uid):
            sop = _value(inst, SOP_UID)
            if sop:
                out.append((uid, sop))
    return sorted(out)


def instance_name(sop_uid: str) -> str:
    """The instance's file under the data folder: a hash of its SOPInstanceUID, fanned out by its
    first two hex digits (no folder of 100,000 files)."""
    digest = hashlib.blake2b(sop_uid.encode(), digest_size=16).hexdigest()
    return f"{digest[:2]}/{digest}.dcm"


def private_dir(path: Path) -> Path:
    """``path`` created (with its parents) and set to 0700: instances hold PHI."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def _retrieve(web, data: Path, study: str, series: str, sop: str) -> None:
    ds = web.retrieve_instance(study, series, sop)
    if str(ds.get("SOPInstanceUID", "")) != sop:
        raise FetchError(f"the DICOMweb server {web.base_url} sent another instance than the one asked for")
    target = data / instance_name(sop)
    private_dir(target.parent)
    with atomic_open(target, "wb") as fh:
        ds.save_as(fh)


def retrieve_all(source: str, pacs: dict, data: Path, todo: list[tuple[str, str, str]]) -> None:
    """WADO-RS retrieve of every (study, series, instance) of ``todo`` by ``pacs.workers`` threads:
    the server's time per instance, not ours, is what a fetch waits for.  Each thread has its own
    client (a requests session is not meant to be shared between threads)."""
    local = threading.local()

    def one(item):
        if not hasattr(local, "web"):
            local.web, _ = client(source, pacs)
        _retrieve(local.web, data, *item)

    pool = ThreadPoolExecutor(max_workers=pacs["workers"], thread_name_prefix="fetch")
    try:
        for _ in pool.map(one, todo):
            pass
    finally:
        # on the first error the queued instances are dropped; the rerun fetches them
        pool.shutdown(wait=True, cancel_futures=True)


def fetch(source: str, data: Path, listing: Path, pacs: dict, shard: tuple[int, int] = (0, 1)) -> dict:
    """Fetch shard ``shard=(i, n)`` of the studies ``pacs.query`` finds at ``source`` into ``data``
    (instances already there are not fetched again), then write its ``listing`` (CSV, the
    :data:`LISTING_COLUMNS`).  Returns counts and the throughput."""
    web, more = client(source, pacs)  # a bad URL or missing credentials fail before anything is made
    data = private_dir(Path(data))
    private_dir(data.parent)
    start = time.monotonic()
    with remote(web, pacs):
        studies = find_studies(web, more, pacs["query"], shard)
        rows = [{"file": instance_name(sop), "study_uid": study, "series_uid": series, "sop_uid": sop}
                for study in studies for series, sop in find_instances(web, more, study, pacs["query"]["modalities"])]
        todo = [(r["study_uid"], r["series_uid"], r["sop_uid"]) for r in rows if not (data / r["file"]).is_file()]
        found = time.monotonic()
        retrieve_all(source, pacs, data, todo)
    done = time.monotonic()
    write_rows(listing, LISTING_COLUMNS, rows)
    fetched = len(todo)
    summary = {"studies": len(studies), "instances": len(rows), "fetched": fetched, "present": len(rows) - fetched,
               "query_s": round(found - start, 2), "retrieve_s": round(done - found, 2),
               "instances_per_s": round(fetched / (done - found), 1) if fetched else 0.0}
    log.info("fetch shard %d/%d from %s: %d studies, %d instances (%d fetched, %d already present); "
             "query %.1f s, retrieve %.1f s, %.1f instances/s", shard[0], shard[1], web.base_url, summary["studies"],
             summary["instances"], fetched, summary["present"], found - start, done - found,
             summary["instances_per_s"])
    return summary


def merge_fetch(listings: list[Path], out: Path, data: Path) -> dict:
    """The shards' listings as one (sorted by file); every instance in ``data`` that none names
    (left by an earlier query, or a killed write's temporary file) is removed."""
    rows = {}
    for path in listings:
        for row in read_rows(path):
            rows.setdefault(row["file"], row)
    data = Path(data)
    missing = [f for f in rows if not (data / f).is_file()]
    if missing:
        raise FetchError(f"{len(missing)} instances in the fetch listings are missing from {data}: "
                         "rerun the fetch (snakemake -R fetch_shard)")
    removed = 0
    for path in sorted(data.rglob("*"), reverse=True):
        rel = path.relative_to(data).as_posix()
        if path.is_file() and rel not in rows:
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    write_rows(out, LISTING_COLUMNS, (rows[f] for f in sorted(rows)))
    log.info("fetch merge: %d instances from %d shards, %d stale files removed", len(rows), len(listings), removed)
    return {"instances": len(rows), "shards": len(listings), "removed": removed}
