"""/docs: Swagger UI served from this process, so the page works without internet access.

FastAPI's default page loads Swagger UI from a CDN and is blank offline (or where the CDN is
blocked). The assets come from the ``swagger-ui-bundle-v2`` package (Swagger UI 5, which reads
the OpenAPI 3.1 document FastAPI writes) and are mounted under /docs/assets; the page starts
Swagger UI from a file, not an inline script, so its Content-Security-Policy allows scripts
from this origin only. Swagger UI sets style attributes and shows data: images, which the
policy allows; nothing else is loaded from anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

ASSETS: Final = "/docs/assets"
_INIT: Final = Path(__file__).resolve().parent / "static" / "docs.js"

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


def page(title: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} - API docs</title>
<link rel="stylesheet" href="{ASSETS}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS}/swagger-ui-bundle.js"></script>
<script src="{ASSETS}/swagger-ui-standalone-preset.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""


def install(app: FastAPI) -> None:
    """Serve /docs and its assets; the app must be created with ``docs_url=None``."""
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}
    html = page(app.title)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    @app.get("/docs/init.js", include_in_schema=False)
    def init() -> FileResponse:
        return FileResponse(_INIT, media_type="text/javascript", headers=headers)

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
