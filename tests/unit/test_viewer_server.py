"""tools/stack/viewer.py: the install-time correction of OHIF's bundle, its config, its routes.

The viewer itself, over a real Orthanc and in a real browser, is tests/integration/test_viewer.py.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tools.stack.viewer import (
    VOI_LUT_FUNCTION_BUG,
    VOI_LUT_FUNCTION_FIX,
    ViewerError,
    ViewerServer,
    app_config_js,
    patch_ohif_bundle,
    patch_voi_lut_function,
)

# The code as OHIF 3.13.2 ships it (app.bundle.*.js, cornerstone dicom-image-loader createImage)
SHIPPED = (
    "                windowWidth: voiLutModule.windowWidth\n"
    "                    ? voiLutModule.windowWidth[0]\n"
    "                    : undefined,\n"
    "                voiLUTFunction: (voiLutModule.voiLUTFunction?.length &&\n"
    "                    voiLutModule.voiLUTFunction[0]) ||\n"
    "                    voiLutModule.voiLutFunction ||\n"
    "                    undefined,\n"
)


def test_the_patch_keeps_a_string_voi_lut_function_whole_and_is_idempotent() -> None:
    patched = patch_voi_lut_function(SHIPPED)
    assert VOI_LUT_FUNCTION_BUG not in patched and VOI_LUT_FUNCTION_FIX in patched
    assert "Array.isArray(voiLutModule.voiLUTFunction)" in patched
    assert patch_voi_lut_function(patched) == patched
    # everything around the expression is untouched
    assert patched.replace(VOI_LUT_FUNCTION_FIX, VOI_LUT_FUNCTION_BUG) == SHIPPED


def test_the_patch_refuses_a_bundle_where_the_code_moved() -> None:
    with pytest.raises(ViewerError, match="found 0 times"):
        patch_voi_lut_function("voiLUTFunction: voiLutModule.voiLUTFunction,")
    with pytest.raises(ViewerError, match="found 2 times"):
        patch_voi_lut_function(SHIPPED * 2)


def test_patching_a_build_corrects_the_one_bundle_with_the_code(tmp_path: Path) -> None:
    (tmp_path / "app.bundle.abc.js").write_text("/* app */\n" + SHIPPED)
    (tmp_path / "12.bundle.def.js").write_text("/* other */\n")
    assert patch_ohif_bundle(tmp_path).name == "app.bundle.abc.js"
    assert VOI_LUT_FUNCTION_FIX in (tmp_path / "app.bundle.abc.js").read_text()
    assert patch_ohif_bundle(tmp_path).name == "app.bundle.abc.js"  # again: nothing to do
    (tmp_path / "app.bundle.abc.js").write_text("/* upgraded */\n")
    with pytest.raises(ViewerError, match="in 0 bundles"):
        patch_ohif_bundle(tmp_path)


def test_app_config_points_ohif_at_dicom_web_on_its_own_origin() -> None:
    config = app_config_js()
    assert config.count('window.location.origin + "/dicom-web"') == 3  # QIDO, WADO-RS, WADO-URI
    assert '"defaultDataSourceName": "orthanc"' in config
    assert "cloudfront" not in config  # nothing leaves the machine


def _fetch(url: str) -> tuple[int, bytes, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def test_routes_fall_back_to_index_html_and_missing_assets_are_404(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>OHIF</html>")
    (tmp_path / "app.bundle.js").write_text("/* js */")
    (tmp_path / "codec.wasm").write_bytes(b"\0asm")
    # upstream on a port nobody listens on: the proxy answers 502, it does not hang
    with ViewerServer("http://127.0.0.1:9/dicom-web", dist=tmp_path) as server:
        assert _fetch(f"{server.url}/viewer?StudyInstanceUIDs=1.2.3")[:2] == (200, b"<html>OHIF</html>")
        assert _fetch(f"{server.url}/")[1] == b"<html>OHIF</html>"
        assert _fetch(f"{server.url}/app.bundle.js")[1] == b"/* js */"
        assert _fetch(f"{server.url}/codec.wasm")[2] == "application/wasm"
        assert _fetch(f"{server.url}/missing.bundle.js")[0] == 404
        assert _fetch(f"{server.url}/../../etc/passwd")[1] == b"<html>OHIF</html>"
        status, body, kind = _fetch(f"{server.url}/app-config.js")
        assert status == 200 and b"window.config" in body and "javascript" in kind
        assert _fetch(f"{server.url}/dicom-web/studies")[0] == 502


def test_a_missing_build_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ViewerError, match="make install"):
        ViewerServer("http://127.0.0.1:9/dicom-web", dist=tmp_path)
