"""The ASGI app: `create_app(settings)` wires the routes, templates, the job queue and the guards.

Every route that names a file takes a library id (an integer in the URL or the form), never a
path; the id's path is resolved and checked to lie inside a root (sdtk.web.security.contained)
before anything is read or written. GET never changes anything; every POST passes the Guard's
Origin/CSRF check. Errors a user can act on come back as a message in the page (HTTP 200 for
htmx fragments, so htmx shows them), never a traceback; the server keeps running.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from importlib import resources
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sdtk.errors import SdtkError, UnsafeFileError
from sdtk.library import db as dbmod
from sdtk.report import LANGUAGES
from sdtk.report.fields import human_bytes
from sdtk.web import catalog, operations, quarantine
from sdtk.web.jobs import FINISHED, JobQueue
from sdtk.web.previews import preview_file
from sdtk.web.report_view import metadata_rows, report_view
from sdtk.web.security import Guard, contained
from sdtk.web.settings import ServeSettings
from sdtk.web.ui_text import LANG_COOKIE, LANG_NAMES, LANGS, choose_language, translator, ui

LANGUAGE_NAMES = LANG_NAMES
HASH_ORDER = ("SHA256", "AutoV1", "AutoV2", "AutoV3", "CRC32", "BLAKE3", "Content")


class Web:
    """State shared by the routes: settings, templates, per-thread library connections, the queue."""

    def __init__(self, settings: ServeSettings):
        from jinja2 import Environment, PackageLoader, select_autoescape

        self.settings = settings
        self.env = Environment(loader=PackageLoader("sdtk.web", "templates"), autoescape=select_autoescape(["html"]))
        self.env.filters["bytes"] = human_bytes
        self.env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""
        self.env.globals.update(languages=LANGUAGE_NAMES, urlencode=urlencode)
        self._local = threading.local()
        from sdtk.web.index import LibraryIndex

        self.index = LibraryIndex(self.connect, settings.roots)
        self.index.reload()  # before the server answers: its first page then comes from the index (30,000 files: < 1 s)
        writes = {name for name, op in operations.OPERATIONS.items() if op.writes or name == "index"}
        self.queue = JobQueue(settings, self.connect, {name: op.run for name, op in operations.OPERATIONS.items()},
                              after_job=lambda job: self.index.reload() if job.op in writes else None)
        self.undo_log = quarantine.open_log(settings.state_folder)
        self.undo_lock = threading.Lock()
        self.precision_checks: Dict = {}  # sampled "same weights at another precision" checks, by both files' (path, size, mtime)

    def connect(self):
        return dbmod.connect(self.settings.db)

    @property
    def conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.connect()
        return conn

    @staticmethod
    def language(request: Optional[Request]) -> str:
        """The page language: ?lang=, the language menu's cookie, Accept-Language, else English."""
        if request is None:
            return "en"
        return choose_language(request.query_params.get("lang"), request.cookies.get(LANG_COOKIE),
                               request.headers.get("accept-language"))

    def render(self, name: str, request: Optional[Request] = None, status: int = 200, **context) -> HTMLResponse:
        lang = context.pop("lang", None) or self.language(request)
        html = self.env.get_template(name).render(request=request, settings=self.settings, lang=lang, t=translator(lang),
                                                  **context)
        return HTMLResponse(html, status_code=status, headers={"cache-control": "no-store", "content-language": lang})

    def fragment(self, name: str, request: Optional[Request] = None, **context) -> str:
        lang = self.language(request)
        return self.env.get_template(name).render(settings=self.settings, lang=lang, t=translator(lang), **context)

    def files(self) -> operations.Files:
        return operations.Files(self.conn, self.settings.roots)


async def form_of(request: Request) -> Dict[str, list]:
    """The urlencoded form of a POST (htmx sends forms urlencoded), size-limited."""
    body = await request.body()
    if len(body) > 256 * 1024:
        raise SdtkError(None, "form too large")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


def message(web: Web, request: Request, text: str, kind: str = "error", **extra) -> HTMLResponse:
    return HTMLResponse(web.fragment("_message.html", request, text=text, kind=kind, **extra), headers={"cache-control": "no-store"})


def create_app(settings: ServeSettings) -> Starlette:
    web = Web(settings)

    # -- library ---------------------------------------------------------------------------------
    def library_page(request: Request):
        query = catalog.Query.from_params(request.query_params)
        rows, total = catalog.page(web.conn, query, settings.roots, web.index)
        facets = web.index.facets() if web.index.ready.is_set() else catalog.facets(web.conn, settings.roots)
        return web.render("library.html", request, query=query, rows=rows, total=total, facets=facets,
                          sorts=list(catalog.SORTS))

    def library_rows(request: Request):
        query = catalog.Query.from_params(request.query_params)
        rows, total = catalog.page(web.conn, query, settings.roots, web.index)
        name = "_rows.html" if request.query_params.get("rows_only") else "_results.html"
        response = web.render(name, request, query=query, rows=rows, total=total)
        if name == "_results.html":
            response.headers["hx-push-url"] = "/?" + urlencode(query.params(offset=0))
        return response

    # -- one model -------------------------------------------------------------------------------
    def model_page(request: Request):
        file_id = request.path_params["file_id"]
        lang = web.language(request)  # the report in the page's language (?lang= links switch it)
        row = catalog.by_id(web.conn, file_id)
        if row is None:
            return web.render("error.html", request, status=404, text=f"no file {file_id} in the library")
        real = contained(row["path"], settings.roots)
        if real is None:
            return web.render("error.html", request, status=404, text="this file is outside the folders this server serves")
        rec = catalog.record(row)
        ident, report, unreadable, unsafe, metadata = None, None, None, False, {}
        if not os.path.exists(real):
            unreadable = "the file is no longer there (vanished since it was indexed)"
        else:
            from sdtk.identify import identify_path

            try:
                ident = identify_path(real)
                report = report_view(ident, lang)
                metadata = ident.metadata
            except UnsafeFileError as e:
                unsafe, unreadable = True, e.problem
            except SdtkError as e:
                unreadable = e.problem
            except (OSError, ValueError, KeyError, IndexError, TypeError, MemoryError, RecursionError) as e:
                unreadable = f"could not be read ({type(e).__name__}: {e})"
        if unreadable and row["problem"] and not unsafe:
            from sdtk.scan import scan_file  # small or broken files only: the verdict without running anything

            unsafe = scan_file(real).verdict == "unsafe"
        header_meta = {}
        if ident is not None and ident.format == "safetensors":
            from sdtk.formats import open_model

            with open_model(real) as cat:
                header_meta = dict(cat.metadata or {})
        side = (rec["info"] or {}).get("sidecars") or {}
        previews = (side.get("files") or {}).get("preview") or []
        dupes = [catalog.record(r) for r in catalog.same_hash(web.conn, row)]
        actions = []
        for a in (report or {}).get("advice", []):
            act = operations.ADVICE_ACTIONS.get(a["code"])
            if act and not unsafe:
                actions.append({"code": a["code"], "op": act[0], "values": act[1], "label": act[2]})
        hashes = [(k, (rec["hashes"] or {}).get(k)) for k in HASH_ORDER]
        return web.render("model.html", request, rec=rec, lang=lang, report=report, unreadable=unreadable, unsafe=unsafe,
                          meta_summary=metadata, header_meta=metadata_rows(header_meta), side=side, previews=previews,
                          dupes=dupes, hashes=hashes, actions=actions, ident=ident)

    async def set_language(request: Request):
        """The language menu: remembered in a cookie (SameSite=Strict), the page reloaded."""
        form = await form_of(request)
        lang = operations.one(form, "lang")
        if lang not in LANGS:
            return message(web, request, f"unknown language {lang!r}")
        response = Response("", status_code=200, headers={"hx-refresh": "true", "cache-control": "no-store"})
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 24 * 3600, path="/", samesite="strict", httponly=True)
        return response

    def preview(request: Request):
        row = catalog.by_id(web.conn, request.path_params["file_id"])
        if row is None:
            return PlainTextResponse("no such preview", status_code=404)
        names = ((json.loads(row["info"] or "{}").get("sidecars") or {}).get("files") or {}).get("preview") or []
        found = preview_file(row["path"], names, request.path_params["index"], settings.roots)
        if found is None:
            return PlainTextResponse("no such preview", status_code=404)
        return FileResponse(found[0], media_type=found[1], headers={"cache-control": "private, max-age=300",
                                                                  "content-disposition": "inline"})

    # -- operations --------------------------------------------------------------------------------
    def convert_page(request: Request):
        try:
            row, real = web.files().get(request.query_params.get("file", ""))
        except SdtkError as e:
            return web.render("error.html", request, status=404, text=str(e))
        vaes = catalog.page(web.conn, catalog.Query(kind="vae", limit=200), settings.roots, web.index)[0]
        donors = [r for kind in operations.REPLACE_DONOR_KINDS for r in
                  catalog.page(web.conn, catalog.Query(kind=kind, limit=500), settings.roots, web.index)[0]
                  if r["id"] != row["id"]]
        return web.render("convert.html", request, rec=catalog.record(row), vaes=vaes, donors=donors,
                          replace_parts=operations.REPLACE_PARTS, replace_rows=range(operations.MAX_REPLACE),
                          dtypes=operations.CONVERT_DTYPES, parts=operations.EXTRACT_PARTS,
                          quants=operations.gguf_quants(), variants=operations.diffusers_variants())

    def lora_page(request: Request):
        """Bake LoRAs into a model: from a model's page (?base=ID) or a LoRA's (?lora=ID)."""
        files = web.files()
        base = lora = None
        try:
            if request.query_params.get("base"):
                base = catalog.record(files.get(request.query_params["base"], "base model")[0])
            if request.query_params.get("lora"):
                lora = catalog.record(files.get(request.query_params["lora"], "LoRA")[0])
        except SdtkError as e:
            return web.render("error.html", request, status=404, text=str(e))
        loras = catalog.page(web.conn, catalog.Query(kind="lora", limit=500), settings.roots, web.index)[0]
        bases = [] if base else [r for kind in ("checkpoint", "diffusion-model") for r in
                                 catalog.page(web.conn, catalog.Query(kind=kind, limit=500), settings.roots, web.index)[0]]
        first = lora["id"] if lora else None
        return web.render("lora.html", request, base=base, bases=bases, loras=loras, first=first,
                          rows=range(operations.MAX_LORAS), doras=operations.DORA_CONVENTIONS,
                          lbw_presets=operations.LBW_PRESETS)

    def lora_merge_page(request: Request):
        """Merge LoRAs exactly (rank concatenation): from a LoRA's page (?lora=ID)."""
        first = None
        try:
            if request.query_params.get("lora"):
                first = catalog.record(web.files().get(request.query_params["lora"], "LoRA")[0])
        except SdtkError as e:
            return web.render("error.html", request, status=404, text=str(e))
        loras = catalog.page(web.conn, catalog.Query(kind="lora", limit=500), settings.roots, web.index)[0]
        return web.render("lora_merge.html", request, first_rec=first, loras=loras, rows=range(operations.MAX_LORAS),
                          dtypes=operations.LORA_MERGE_DTYPES)

    def lora_resize_page(request: Request):
        """Resize one LoRA (?file=ID): its current ranks read from the header, half the largest suggested."""
        try:
            row, real = web.files().get(request.query_params.get("file", ""), "LoRA")
        except SdtkError as e:
            return web.render("error.html", request, status=404, text=str(e))
        ranks = lora_ranks(real)
        return web.render("lora_resize.html", request, rec=catalog.record(row), ranks=ranks,
                          suggested=max(1, max(ranks) // 2) if ranks else 8, dynamics=operations.RESIZE_DYNAMIC)

    def merge_page(request: Request):
        from sdtk.ops.merge import methods as M

        a_id = request.query_params.get("a", "")
        try:
            row, real = web.files().get(a_id, "model A")
        except SdtkError as e:
            return web.render("error.html", request, status=404, text=str(e))
        arch = row["architecture"]
        candidates = catalog.page(web.conn, catalog.Query(architecture=arch or "", limit=500), settings.roots, web.index)[0] if arch else []
        candidates = [c for c in candidates if c["id"] != row["id"]]
        blocks = block_view(real)
        return web.render("merge.html", request, a=catalog.record(row), candidates=candidates, methods=list(M.METHODS),
                          method_info={k: {"alpha": m.alpha_default, "beta": m.beta_range is not None, "inputs": list(m.inputs)}
                                       for k, m in M.METHODS.items()},
                          blocks=blocks, dtypes=operations.CONVERT_DTYPES, b_id=request.query_params.get("b", ""))

    async def merge_preview(request: Request):
        try:
            form = await form_of(request)
            recipe, rows, _ = operations.merge_recipe_from_form(form, web.files())
        except SdtkError as e:
            return message(web, request, str(e))
        return HTMLResponse(web.fragment("_recipe.html", request, yaml=operations.recipe_yaml(recipe), form=urlencode(
            [(k, v) for k, vs in form.items() for v in vs])))

    def merge_recipe_download(request: Request):
        form = parse_qs(request.url.query, keep_blank_values=True)
        try:
            recipe, _, _ = operations.merge_recipe_from_form(form, web.files())
        except SdtkError as e:
            return PlainTextResponse(str(e), status_code=400)
        return Response(operations.recipe_yaml(recipe), media_type="application/x-yaml",
                        headers={"content-disposition": 'attachment; filename="recipe.yaml"'})

    def merge_similarity(request: Request):
        """The per-block similarity of A and B (a finished diff job), or the button that computes it."""
        try:
            a, b = int(request.query_params.get("model_a", "")), int(request.query_params.get("model_b", ""))
        except ValueError:
            return HTMLResponse("")
        found = next((j for j in web.queue.jobs() if j.op == "diff" and j.params.get("file_ids") == [a, b]), None)
        return HTMLResponse(web.fragment("_similarity.html", request, job=found, a=a, b=b))

    async def submit_job(request: Request):
        op_name = request.path_params["op"]
        op = operations.OPERATIONS.get(op_name)
        if op is None:
            return message(web, request, f"unknown operation {op_name!r}")
        try:
            form = await form_of(request)
            title, params = op.parse(form, web.files())
            job = web.queue.submit(op_name, title, params)
        except SdtkError as e:
            return message(web, request, str(e))
        return message(web, request, ui("msg.queued", web.language(request), title=job.title), kind="ok", job=job)

    async def cancel_job(request: Request):
        job = web.queue.cancel(request.path_params["job_id"])
        if job is None:
            return message(web, request, "no such job")
        return HTMLResponse(web.fragment("_job.html", request, job=job))

    def jobs_page(request: Request):
        return web.render("jobs.html", request, jobs=web.queue.jobs())

    def job_page(request: Request):
        job = web.queue.get(request.path_params["job_id"])
        if job is None:
            return web.render("error.html", request, status=404, text="no such job (finished jobs are kept until the server stops)")
        return web.render("job.html", request, job=job)

    async def job_events(request: Request):
        """Server-sent events: the queue, re-rendered whenever a job changes (one stream per page)."""
        async def stream():
            seen, last_sent = -1, 0.0
            while True:
                if await request.is_disconnected():
                    return
                version = web.queue.version
                if version != seen:
                    seen = version
                    html = web.fragment("_queue.html", request, jobs=web.queue.jobs()[:30])
                    yield "event: jobs\n" + "".join(f"data: {line}\n" for line in html.splitlines()) + "\n"
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent > 15:
                    yield ": keep-alive\n\n"
                    last_sent = time.monotonic()
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    # -- duplicates ----------------------------------------------------------------------------------
    def dupes_page(request: Request):
        groups = catalog.dupe_groups(web.conn, settings.roots, web.precision_checks)
        return web.render("dupes.html", request, groups=groups, history=quarantine.history(web.undo_log))

    async def dupes_remove(request: Request):
        if not settings.local_only:  # destructive actions only for a local server (A1111 --listen rule)
            return message(web, request, ui("msg.remote", web.language(request)))
        try:
            form = await form_of(request)
            row, real = web.files().get(operations.one(form, "file"))
            if not catalog.other_copies(catalog.dupe_groups(web.conn, settings.roots, web.precision_checks), row["id"]):
                raise SdtkError(real, "is no longer a duplicate: no other copy of it is left (removed from another tab, "
                                      "or vanished); nothing was moved")
            side = ((json.loads(row["info"] or "{}").get("sidecars") or {}).get("files") or {})
            names = [n for names in side.values() for n in names]
            with web.undo_lock:
                done = quarantine.remove(web.undo_log, web.conn, row, names, settings.roots, settings.removal)
            web.index.reload()
        except (SdtkError, OSError) as e:
            return message(web, request, str(e) if isinstance(e, SdtkError) else f"could not move the file: {e.strerror or e}")
        lang = web.language(request)
        text = ui("msg.moved_" + done["backend"], lang, n=len(done["moves"]), batch=done["batch"])
        return message(web, request, text + (f" ({ui('msg.no_trash', lang)})" if done["note"] else ""), kind="ok",
                       batch=done["batch"])

    async def dupes_undo(request: Request):
        if not settings.local_only:
            return message(web, request, ui("msg.remote", web.language(request)))
        try:
            form = await form_of(request)
            with web.undo_lock:
                back = quarantine.undo(web.undo_log, operations.one(form, "batch"), settings.roots)
            for p in back:
                web.conn.execute("UPDATE files SET status = 'present' WHERE path = ?", (os.path.normpath(p),))
            web.index.reload()
        except (SdtkError, OSError) as e:
            return message(web, request, str(e) if isinstance(e, SdtkError) else f"could not move the file back: {e.strerror or e}")
        return message(web, request, ui("msg.moved_back", web.language(request), names=", ".join(os.path.basename(p) for p in back)),
                       kind="ok")

    def not_found(request: Request, exc=None):
        return web.render("error.html", request, status=404, text="no such page")

    static = StaticFiles(directory=str(resources.files("sdtk.web").joinpath("static")))
    routes = [
        Route("/", library_page),
        Route("/library/rows", library_rows),
        Route("/model/{file_id:int}", model_page),
        Route("/preview/{file_id:int}/{index:int}", preview),
        Route("/convert", convert_page),
        Route("/merge", merge_page),
        Route("/lora", lora_page),
        Route("/lora/merge", lora_merge_page),
        Route("/lora/resize", lora_resize_page),
        Route("/merge/preview", merge_preview, methods=["POST"]),
        Route("/merge/recipe.yaml", merge_recipe_download),
        Route("/merge/similarity", merge_similarity),
        Route("/jobs", jobs_page),
        Route("/jobs/{job_id:int}", job_page),
        Route("/jobs/{job_id:int}/cancel", cancel_job, methods=["POST"]),
        Route("/run/{op}", submit_job, methods=["POST"]),
        Route("/events/jobs", job_events),
        Route("/dupes", dupes_page),
        Route("/dupes/remove", dupes_remove, methods=["POST"]),
        Route("/dupes/undo", dupes_undo, methods=["POST"]),
        Route("/lang", set_language, methods=["POST"]),
        Mount("/static", app=static, name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found})
    app.state.web = web
    for root in settings.index_roots:
        web.queue.submit("index", "index " + os.path.basename(root), {"roots": [root]})
    return Guard(app, settings.allowed_hosts(), settings.token)


def lora_ranks(path: str) -> List[int]:
    """The ranks of a LoRA's modules (from its header: no tensor read), [] when it is not one."""
    from sdtk.formats import open_model
    from sdtk.adapters.reading import read_adapter

    try:
        with open_model(path) as cat:
            adapter = read_adapter(cat.tensors, cat.metadata)
            return sorted({m.parts["down"].shape[0] for m in adapter.modules.values() if "down" in m.parts})
    except (SdtkError, KeyError, ValueError):
        return []


def block_view(model_path: str) -> Optional[Dict[str, Any]]:
    """Block names of the model's family and the presets resolved for it (for the sliders)."""
    from sdtk.formats import open_model
    from sdtk.ops.merge.arch import family_of
    from sdtk.ops.merge.blocks import BLOCK_LISTS, PRESETS, resolve_blocks

    try:
        with open_model(model_path) as cat:
            family = family_of(cat)
    except SdtkError:
        return None
    if family not in BLOCK_LISTS:
        return None
    presets = {}
    for name in PRESETS:
        try:
            presets[name] = list(resolve_blocks(name, family, 0.5).values())
        except SdtkError:
            continue
    return {"family": family, "names": BLOCK_LISTS[family], "presets": presets}
