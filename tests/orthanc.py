"""A private Orthanc PACS for the tests: Debian's orthanc + orthanc-dicomweb, on 127.0.0.1 only.

``start(folder)`` writes a configuration (storage and index in ``folder``, free HTTP and DICOM
ports, remote access off, a test user) and starts Orthanc; ``stop`` ends that process by its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

USER, PASSWORD = "haven-test", "pacs-Secret-7f3a9c"
SBIN = ("/usr/sbin", "/sbin")


def binary() -> str | None:
    return shutil.which("Orthanc") or shutil.which("Orthanc", path=os.pathsep.join(SBIN))


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared object, where Debian's orthanc-dicomweb puts it."""
    try:
        files = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    found = [f for f in files if "/plugins/" in f and f.endswith(".so")] or [f for f in files if ".so" in f]
    return found[0] if found else None


def missing() -> str | None:
    """Why this machine cannot run the PACS tests, or None."""
    if not binary():
        return "Orthanc not installed: run .ci/system-setup (apt-get install orthanc orthanc-dicomweb)"
    if not dicomweb_plugin():
        return "Orthanc's DICOMweb plugin not installed: run .ci/system-setup (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def source(self) -> str:
        return f"dicomweb://127.0.0.1:{self.port}/dicom-web"

    def get(self, path: str):
        r = requests.get(self.rest + path, auth=(USER, PASSWORD), timeout=30)
        r.raise_for_status()
        return r.json()

    def load(self, files) -> int:
        """POST every DICOM file to /instances; files Orthanc rejects (not DICOM) are skipped."""
        stored = 0
        with requests.Session() as s:
            s.auth = (USER, PASSWORD)
            for f in files:
                r = s.post(self.rest + "/instances", data=Path(f).read_bytes(), timeout=60)
                stored += r.status_code == 200
        return stored

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def start(folder: Path) -> Orthanc:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "haven-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "HttpPort": port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary(), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Orthanc(process, port, folder)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({process.returncode}):\n{server.log()[-3000:]}")
        try:
            if requests.get(server.rest + "/dicom-web/studies", auth=(USER, PASSWORD), timeout=2).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    stop(server)
    raise RuntimeError(f"Orthanc did not answer within 60 s:\n{server.log()[-3000:]}")


def stop(server: Orthanc) -> None:
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait()
