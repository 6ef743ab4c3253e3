"""`sdtk serve`: a local web app over the library and every operation.

    from sdtk.web.app import create_app          # an ASGI app (Starlette), guarded
    from sdtk.web.settings import ServeSettings

Modules: `settings` (what one server is configured with), `security` (Host/Origin/token guard,
path containment, output names), `catalog` (paged library queries), `operations` (the table of
what can be done: form -> job -> the library call the CLI makes), `jobs` (queue, progress,
cancel), `previews` (sniffed image sidecars), `quarantine` (removal with an undo log),
`report_view` (the inspect report for the page), `app` (routes and templates), `server` (uvicorn).
The web dependencies (starlette, jinja2, uvicorn) are imported only when serving.
"""
