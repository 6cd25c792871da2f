"""OHIF (the static build from npm) over Orthanc's DICOMweb plugin, served on loopback.

A radiologist opens a study in a web viewer that reads the PACS through DICOMweb. This is that
viewer for the demo and the viewer test (tests/integration/test_viewer.py), standard library only:

- OHIF's ``dist/`` (unpacked by tools/install.sh into ``.viewer/ohif``) served as static files,
  with ``index.html`` for OHIF's client-side routes (``/viewer?StudyInstanceUIDs=…``): a plain
  static server answers those with 404.
- ``/app-config.js`` generated here: one data source, our ``/dicom-web`` on the same origin.
- ``/dicom-web/…`` proxied to Orthanc's DICOMweb root, so the browser talks to one origin only
  (Orthanc sends no CORS headers, and OHIF's requests would be refused cross-origin).

``python -m tools.stack.viewer serve --dicomweb http://127.0.0.1:8042/dicom-web`` serves it for
people; ``python -m tools.stack.viewer patch`` applies the one correction of OHIF's build
(``VOI_LUT_FUNCTION_BUG``), run by tools/install.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import mimetypes
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tools.stack.services import free_port

ROOT = Path(__file__).resolve().parents[2]
# Where tools/install.sh puts OHIF's static build (dist/ of @ohif/app) and playwright-core
VIEWER_DIR = ROOT / ".viewer"
OHIF_DIST = VIEWER_DIR / "ohif"
DICOMWEB_PREFIX = "/dicom-web"
PROXY_TIMEOUT_S = 120.0
# Request headers passed on to Orthanc; the rest (cookies, origin) are the browser's business.
FORWARDED_REQUEST_HEADERS = ("accept", "content-type", "range")
# Response headers passed back; hop-by-hop ones (connection, transfer-encoding) are ours to set.
FORWARDED_RESPONSE_HEADERS = ("content-type", "content-range", "etag", "last-modified")
CHUNK_BYTES = 1 << 16

# The one correction made to OHIF 3.13.2's build, at install (`python -m tools.stack.viewer patch`).
# Its image loader (cornerstone dicom-image-loader, createImage) takes `voiLUTFunction[0]`,
# expecting an array, but OHIF's own metadata provider hands it VOI LUT Function as a plain
# string: "LINEAR" becomes "L", and the viewport throws "Invalid VOI LUT function" for every
# image that carries (0028,1056), which real mammograms do (LINEAR, SIGMOID). The patch takes
# the string as it is and the first value of an array. The PACS's images are never changed.
VOI_LUT_FUNCTION_BUG = (
    "voiLUTFunction: (voiLutModule.voiLUTFunction?.length &&\n"
    "                    voiLutModule.voiLUTFunction[0]) ||"
)
VOI_LUT_FUNCTION_FIX = (
    "voiLUTFunction: (Array.isArray(voiLutModule.voiLUTFunction) ? voiLutModule.voiLUTFunction[0]"
    " : voiLutModule.voiLUTFunction) /* mammo-node: VOI LUT Function string */ ||"
)

__all__ = [
    "OHIF_DIST",
    "ViewerError",
    "ViewerServer",
    "app_config_js",
    "ohif_installed",
    "patch_ohif_bundle",
    "patch_voi_lut_function",
]


class ViewerError(RuntimeError):
    """OHIF's build is missing (run `make install`)."""


def ohif_installed(dist: Path = OHIF_DIST) -> bool:
    """True when OHIF's static build is unpacked (tools/install.sh did its viewer step)."""
    return (dist / "index.html").is_file()


def patch_voi_lut_function(source: str) -> str:
    """``source`` with the VOI LUT Function correction applied (see ``VOI_LUT_FUNCTION_BUG``).

    Already patched: returned unchanged. Neither the bug nor the fix present: ``ViewerError``, so
    an OHIF upgrade that moves the code fails the install instead of shipping a broken viewer.
    """
    if VOI_LUT_FUNCTION_FIX in source:
        return source
    count = source.count(VOI_LUT_FUNCTION_BUG)
    if count != 1:
        raise ViewerError(f"OHIF bundle: the VOI LUT Function code found {count} times, expected 1")
    return source.replace(VOI_LUT_FUNCTION_BUG, VOI_LUT_FUNCTION_FIX)


def patch_ohif_bundle(dist: Path = OHIF_DIST) -> Path:
    """Apply the VOI LUT Function correction to the one bundle of ``dist`` that has the code.

    Returns the patched file. Idempotent (tools/install.sh runs it after every unpack).
    """
    candidates = [
        path for path in sorted(dist.glob("*.js"))
        if VOI_LUT_FUNCTION_BUG in (text := path.read_text(encoding="utf-8"))
        or VOI_LUT_FUNCTION_FIX in text
    ]
    if len(candidates) != 1:
        raise ViewerError(
            f"OHIF build in {dist}: the VOI LUT Function code is in {len(candidates)} bundles, "
            "expected 1 (was OHIF upgraded? re-check the patch in tools/stack/viewer.py)"
        )
    [bundle] = candidates
    source = bundle.read_text(encoding="utf-8")
    patched = patch_voi_lut_function(source)
    if patched != source:
        temporary = bundle.with_suffix(".js.tmp")
        temporary.write_text(patched, encoding="utf-8")
        temporary.replace(bundle)
    return bundle


def app_config_js(dicomweb_path: str = DICOMWEB_PREFIX) -> str:
    """OHIF's ``window.config``: one DICOMweb data source on the page's own origin.

    The data source settings are those Orthanc's DICOMweb plugin supports: no QIDO includefield,
    WADO-RS rendering, bulk data by URI relative to the study, no fuzzy matching.
    """
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (mammo-node PACS)",
            "name": "orthanc",
            "wadoUriRoot": "__ORIGIN__" + dicomweb_path,
            "qidoRoot": "__ORIGIN__" + dicomweb_path,
            "wadoRoot": "__ORIGIN__" + dicomweb_path,
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config: dict[str, Any] = {
        "name": "mammo-node",
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [data_source],
    }
    body = json.dumps(config, indent=2).replace('"__ORIGIN__', "window.location.origin + \"")
    return f"/* generated by tools/stack/viewer.py */\nwindow.config = {body};\n"


class _ViewerHandler(http.server.BaseHTTPRequestHandler):
    server: _ViewerHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: request lines carry study UIDs; the server keeps no access log."""

    # -- routing ------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._route()

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_POST(self) -> None:  # noqa: N802
        self._route()

    def _route(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
            self._proxy()
        elif self.command not in ("GET", "HEAD"):
            self._send_bytes(405, b"method not allowed", "text/plain")
        elif path == "/app-config.js":
            self._send_bytes(200, self.server.app_config, "application/javascript")
        else:
            self._static(path)

    # -- static files -------------------------------------------------------------------------
    def _static(self, path: str) -> None:
        dist = self.server.dist
        relative = urllib.parse.unquote(path).lstrip("/")
        candidate = (dist / relative).resolve()
        if not candidate.is_relative_to(dist) or (relative and not candidate.is_file()):
            # OHIF's routes (/viewer, /segmentation, …) have no file: the app handles them.
            # A missing asset (a name with an extension) is a real 404.
            if "." in Path(relative).name:
                self._send_bytes(404, b"not found", "text/plain")
                return
            candidate = dist / "index.html"
        if candidate.is_dir() or not relative:
            candidate = dist / "index.html"
        content_type = mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        if candidate.suffix == ".wasm":
            content_type = "application/wasm"
        self._send_bytes(200, candidate.read_bytes(), content_type)

    def _send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- DICOMweb proxy -----------------------------------------------------------------------
    def _proxy(self) -> None:
        target = self.server.upstream + self.path[len(DICOMWEB_PREFIX):]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        request = urllib.request.Request(target, data=body, method=self.command)
        for name in FORWARDED_REQUEST_HEADERS:
            value = self.headers.get(name)
            if value:
                request.add_header(name, value)
        try:
            response = self.server.opener.open(request, timeout=PROXY_TIMEOUT_S)
        except urllib.error.HTTPError as err:
            response = err
        except OSError as err:
            self._send_bytes(502, f"DICOMweb upstream unreachable: {err}".encode(), "text/plain")
            return
        with contextlib.closing(response):
            self.send_response(response.status)
            for name in FORWARDED_RESPONSE_HEADERS:
                value = response.headers.get(name)
                if value:
                    self.send_header(name, value)
            declared = response.headers.get("Content-Length")
            if declared is not None:
                self.send_header("Content-Length", declared)
                self.end_headers()
                if self.command != "HEAD":
                    shutil.copyfileobj(response, self.wfile, CHUNK_BYTES)
                return
            # Orthanc streams multipart answers without a length: chunk them on to the browser.
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command == "HEAD":
                return
            while chunk := response.read(CHUNK_BYTES):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")


class _ViewerHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dist: Path, upstream: str) -> None:
        super().__init__(address, _ViewerHandler)
        self.dist = dist.resolve()
        self.upstream = upstream.rstrip("/")
        self.app_config = app_config_js().encode()
        # Never through an environment proxy: Orthanc is on loopback.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ViewerServer:
    """OHIF + the DICOMweb proxy on ``127.0.0.1:port``, served by a background thread."""

    def __init__(self, dicomweb_url: str, *, port: int | None = None, dist: Path = OHIF_DIST,
                 host: str = "127.0.0.1") -> None:
        if not ohif_installed(dist):
            raise ViewerError(
                f"OHIF's static build is not in {dist}: run `make install` (tools/install.sh)"
            )
        self.dist = dist
        self.dicomweb_url = dicomweb_url
        self.host = host
        self.port = port if port is not None else free_port()
        self._server: _ViewerHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def study_url(self, study_uid: str) -> str:
        """The page that opens one study in OHIF's basic viewer."""
        return f"{self.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"

    def start(self) -> ViewerServer:
        if self._server is None:
            self._server = _ViewerHTTPServer((self.host, self.port), self.dist, self.dicomweb_url)
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="ohif-viewer", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve OHIF over an Orthanc's DICOMweb")
    serve.add_argument("--dicomweb", required=True,
                       help="Orthanc's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    serve.add_argument("--port", type=int, default=3000)
    patch = commands.add_parser("patch", help="correct OHIF's build in place (tools/install.sh)")
    patch.add_argument("--dist", type=Path, default=OHIF_DIST)
    args = parser.parse_args(argv)
    if args.command == "patch":
        try:
            bundle = patch_ohif_bundle(args.dist)
        except ViewerError as err:
            print(f"viewer: {err}", file=sys.stderr)
            return 1
        print(f"viewer: OHIF VOI LUT Function correction in place ({bundle.name})")
        return 0
    server = ViewerServer(args.dicomweb, port=args.port).start()
    print(f"OHIF on {server.url} (DICOMweb from {args.dicomweb}); Ctrl-C stops", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
