"""sdtk serve end to end in a real headless Chromium (Playwright through Debian's chromium):
index a folder of sample files, search and filter, read a model page, run a convert job to 100%
and find its output in the library, cancel a job and find no file, a block-weight merge with the
CLI's bytes, two queued jobs, the hostile file shown unsafe, a cross-site page that cannot act,
and an axe check with no serious violations. SDTK_WEB_SCREENSHOTS=DIR also saves screenshots."""
import os
import re
import time
from pathlib import Path

import pytest

from conftest import run_cli
from helpers_browser import chromium_or_skip, running_server
from helpers_web import sample_library

CHROMIUM = chromium_or_skip()
from playwright.sync_api import expect, sync_playwright  # noqa: E402

SHOTS = os.environ.get("SDTK_WEB_SCREENSHOTS")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("webui")
    sample = sample_library(base)
    with running_server(sample["root"], base / "lib.db", base / "state", progress_delay=0.01) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            page = context.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            # the new folder is indexed in the background, with its progress on the page
            expect(page.locator("aside.queue article.job.done").first).to_be_visible(timeout=60_000)
            page.reload()
            yield {"url": url, "page": page, "context": context, "sample": sample, "base": base, "errors": errors}
            browser.close()


def shot(page, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=False)


def job_card(page, title_part):
    return page.locator("aside.queue article.job", has_text=title_part).first


def test_library_search_and_filters(site):
    page, url = site["page"], site["url"]
    page.goto(url + "/")
    expect(page.locator("#count")).to_have_text("10 files")
    shot(page, "library")
    page.fill("#q", "ink wash")  # a trigger word from the .civitai.info sidecar
    expect(page.locator("#count")).to_have_text("1 file")
    expect(page.locator("table.files tbody tr")).to_have_count(1)
    expect(page.locator("table.files")).to_contain_text("inkwash.safetensors")
    assert "q=ink" in page.url  # the search is in the address (reload, share)
    page.fill("#q", "")
    page.select_option("#kind", "vae")
    expect(page.locator("#count")).to_have_text("1 file")
    expect(page.locator("table.files")).to_contain_text("kl-f8.safetensors")
    page.select_option("#kind", "")
    page.check("#problems")
    expect(page.locator("table.files")).to_contain_text("free-model.ckpt")
    expect(page.locator("table.files")).not_to_contain_text("inkwash.safetensors")
    page.uncheck("#problems")
    page.select_option("#sort", "size")
    expect(page.locator("table.files tbody tr").first).to_contain_text("v1-5-pruned.ckpt")
    assert not site["errors"], site["errors"]


def test_model_page_report_languages_and_copy(site):
    page, url = site["page"], site["url"]
    page.goto(url + "/?q=v1-5-pruned")
    page.click("text=v1-5-pruned.ckpt")
    expect(page.locator("h1")).to_have_text("v1-5-pruned.ckpt")
    expect(page.locator("dl.report")).to_contain_text("Stable Diffusion 1.x")
    expect(page.locator("table.components")).to_contain_text("EMA copy of the UNet")
    expect(page.locator("figure.chart svg rect")).to_have_count(5)
    expect(page.get_by_role("button", name="Convert for generation")).to_be_visible()
    expect(page.locator("#hash-SHA256")).to_have_text(re.compile("^[0-9A-F]{64}$"))
    shot(page, "model")
    page.get_by_role("button", name="Copy SHA256").click()
    expect(page.get_by_role("button", name="Copy SHA256")).to_have_text("Copied")
    page.click("a[lang=ja]")
    expect(page.locator("table.components")).to_contain_text("UNet の EMA コピー")
    shot(page, "model-ja")
    page.click("a[lang=zh]")
    expect(page.locator("html")).to_have_attribute("lang", "zh")


def test_hostile_file_shown_unsafe_never_run(site):
    page, url = site["page"], site["url"]
    page.goto(url + "/?q=free-model")
    expect(page.locator("table.files")).to_contain_text("unreadable or unsafe")
    page.click("text=free-model.ckpt")
    expect(page.locator("section.danger")).to_contain_text("os.system")
    expect(page.get_by_role("link", name="Convert…")).to_have_count(0)
    shot(page, "unsafe")
    assert not site["sample"]["marker"].exists()


def test_convert_job_reaches_100_and_output_appears(site):
    page, url = site["page"], site["url"]
    page.goto(url + "/?q=v1-5-pruned.ckpt")
    page.click("text=v1-5-pruned.ckpt")
    page.get_by_role("button", name="Convert for generation").click()
    expect(page.locator("#flash")).to_contain_text("queued")
    card = job_card(page, "convert v1-5-pruned.ckpt (generation)")
    seen = set()
    end = time.monotonic() + 120
    while time.monotonic() < end:
        text = card.locator(".pct").inner_text(timeout=10_000)
        seen.add(text)
        if card.locator(".state").inner_text() in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    expect(card.locator(".state")).to_have_text("done")
    expect(card.locator(".pct")).to_have_text("100%")
    assert any(s not in ("0%", "100%") for s in seen), seen  # live progress on the way
    shot(page, "job-done")
    card.get_by_role("link", name="v1-5-pruned-fp16-emaonly.safetensors").click()
    expect(page.locator("h1")).to_have_text("v1-5-pruned-fp16-emaonly.safetensors")
    expect(page.locator("dl.report")).to_contain_text("fp16")
    page.goto(url + "/?q=emaonly")
    expect(page.locator("table.files")).to_contain_text("v1-5-pruned-fp16-emaonly.safetensors")


def test_cancel_a_job_and_find_no_file(site):
    page, url = site["page"], site["url"]
    folder = site["sample"]["sd_fp32"].parent
    page.goto(url + "/?q=gamma-fp32")
    page.click("text=gamma-fp32.safetensors")
    page.click("text=Convert…")
    page.select_option("#dtype", "fp16")
    page.fill("#output", "to-cancel.safetensors")
    shot(page, "convert")
    page.get_by_role("button", name="Start converting").click()
    expect(page.locator("#convert-result")).to_contain_text("queued")
    card = job_card(page, "convert gamma-fp32.safetensors")
    expect(card.locator(".state")).to_have_text("running", timeout=60_000)
    expect(card.locator(".pct")).not_to_have_text("0%", timeout=60_000)
    assert [p for p in os.listdir(folder) if p.endswith(".sdtk-partial")]  # it is writing
    card.get_by_role("button", name="Cancel").click()
    expect(card.locator(".state")).to_have_text("cancelled", timeout=30_000)
    expect(card).to_contain_text("nothing was written")
    assert not (folder / "to-cancel.safetensors").exists()
    assert not [p for p in os.listdir(folder) if p.endswith(".sdtk-partial")]


def test_two_queued_jobs(site):
    page, url = site["page"], site["url"]
    for name, out in (("alpha-mix", "alpha-q1.safetensors"), ("beta-mix", "beta-q2.safetensors")):
        page.goto(url + f"/?q={name}.safetensors")
        page.click(f"text={name}.safetensors")
        page.click("text=Convert…")
        page.select_option("#dtype", "bf16")
        page.fill("#output", out)
        page.get_by_role("button", name="Start converting").click()
        expect(page.locator("#convert-result")).to_contain_text("queued")
    first, second = job_card(page, "convert alpha-mix"), job_card(page, "convert beta-mix")
    expect(second.locator(".state")).to_have_text(re.compile("queued|running"))
    expect(first.locator(".state")).to_have_text("done", timeout=120_000)
    expect(second.locator(".state")).to_have_text("done", timeout=120_000)
    page.goto(url + "/?q=-q")
    expect(page.locator("table.files")).to_contain_text("alpha-q1.safetensors")
    expect(page.locator("table.files")).to_contain_text("beta-q2.safetensors")


def test_block_weight_merge_has_the_cli_bytes(site):
    page, url, sample = site["page"], site["url"], site["sample"]
    page.goto(url + "/?q=alpha-mix.safetensors")
    page.click("text=alpha-mix.safetensors")
    page.click("text=Merge with…")
    page.select_option("#model_b", label="beta-mix.safetensors")
    page.fill("#alpha", "0.3")
    page.select_option("#block_preset", "GRAD_V")
    expect(page.locator("#use_blocks")).to_be_checked()
    expect(page.locator("#bv_1")).to_have_text("1")
    slider = page.locator("#block_5")  # then move one slider by keyboard: the weights become custom
    slider.focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#block_preset")).to_have_value("")
    page.get_by_role("button", name="Compare A and B per block").click()  # `sdtk diff`, beside the sliders
    expect(page.locator("#similarity")).to_contain_text("How similar A and B are", timeout=120_000)
    expect(page.locator("#similarity .sim")).to_have_count(26)
    page.fill("#output", "browser-merge.safetensors")
    page.get_by_role("button", name="Preview the recipe").click()
    expect(page.locator("#recipe-yaml")).to_contain_text("weighted-sum")
    shot(page, "merge")
    values = page.eval_on_selector_all("input.block", "els => els.map(e => e.value)")
    assert len(values) == 26 and values[5] != values[4]
    page.get_by_role("button", name="Start merging").click()
    card = job_card(page, "browser-merge.safetensors")
    expect(card.locator(".state")).to_have_text("done", timeout=120_000)
    cli_out = site["base"] / "cli-merge.safetensors"
    r = run_cli("merge", sample["sd_a"], sample["sd_b"], "-o", cli_out, "-a", "0.3", "--blocks", ",".join(values))
    assert r.returncode == 0, r.stderr
    assert cli_out.read_bytes() == (sample["sd_a"].parent / "browser-merge.safetensors").read_bytes()


def test_a_cross_site_page_cannot_act(site, tmp_path):
    """A hostile page on another origin posts a form to the server: refused, no job."""
    import http.server
    import threading

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "index.html").write_text(f'<form id="f" method="post" action="{site["url"]}/run/index"></form>'
                                     '<script>document.getElementById("f").submit()</script>')
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(evil))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page = site["context"].new_page()
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
        page.wait_for_url(re.compile("/run/index"))
        assert "refused" in page.content()
        page.close()
    finally:
        httpd.shutdown()
    page = site["page"]
    page.goto(site["url"] + "/jobs")
    expect(page.locator("table.jobs")).to_contain_text("index")
    assert page.locator("table.jobs tbody tr", has_text="index").count() == 1  # only the one at start: no new job


def reindex(page):
    """Click "Index folders" and wait for that new job to finish."""
    cards = page.locator("aside.queue article.job", has_text="index")
    expect(cards.first).to_be_visible()
    before = cards.count()
    page.get_by_role("button", name="Index folders").click()
    expect(cards).to_have_count(before + 1)
    expect(cards.first.locator(".state")).to_have_text("done", timeout=60_000)


def test_duplicates_to_the_trash_and_undo(site):
    import shutil

    page, url, sample = site["page"], site["url"], site["sample"]
    copy = sample["sd_b"].parent / "beta-mix (1).safetensors"  # a second download of the same file
    shutil.copy2(sample["sd_b"], copy)
    page.goto(url + "/dupes")
    reindex(page)
    page.reload()
    expect(page.locator("#reclaimable")).to_have_text("8.56 MB")
    group = page.locator("section.group").first
    expect(group).to_contain_text("beta-mix (1).safetensors")
    shot(page, "dupes")
    page.once("dialog", lambda d: d.accept())  # "Move to the trash: ...?"
    group.get_by_role("button", name="Move to the trash").first.click()
    expect(page.locator("#dupes-msg")).to_contain_text("moved 1 file(s) to the system trash")
    moved = [p for p in (copy, sample["sd_b"]) if not p.exists()]
    assert len(moved) == 1  # one of the two, never both, and nothing deleted:
    trash = Path(os.environ["XDG_DATA_HOME"]) / "Trash"  # conftest's temporary XDG_DATA_HOME, inherited by the server
    remaining = copy if copy.exists() else sample["sd_b"]  # the two are identical
    assert (trash / "files" / moved[0].name).read_bytes() == remaining.read_bytes()
    assert (trash / "info" / (moved[0].name + ".trashinfo")).is_file()
    page.reload()
    page.get_by_role("button", name="Undo").first.click()
    expect(page.locator("#dupes-msg")).to_contain_text("moved back")
    assert copy.exists() and sample["sd_b"].exists()
    os.unlink(copy)
    reindex(page)


def test_gguf_and_lora_jobs_in_the_browser(site):
    """`convert --to gguf --quant Q8_0` and `lora apply` from their forms: progress to 100%, the
    output linked into the library, the CLI's bytes."""
    page, url, sample = site["page"], site["url"], site["sample"]
    page.goto(url + "/?q=alpha-mix.safetensors")
    page.click("text=alpha-mix.safetensors")
    page.click("text=Convert…")
    page.check("#to-gguf")
    page.select_option("#quant", "Q8_0")
    page.fill("#output", "browser-q8.gguf")
    page.get_by_role("button", name="Start converting").click()
    expect(page.locator("#convert-result")).to_contain_text("queued")
    card = job_card(page, "to GGUF Q8_0")
    expect(card.locator(".state")).to_have_text("done", timeout=120_000)
    expect(card.locator(".pct")).to_have_text("100%")
    cli = site["base"] / "cli-q8.gguf"
    assert run_cli("convert", sample["sd_a"], "--to", "gguf", "--quant", "Q8_0", "-o", cli).returncode == 0
    assert cli.read_bytes() == (sample["sd_a"].parent / "browser-q8.gguf").read_bytes()
    card.get_by_role("link", name="browser-q8.gguf").click()
    expect(page.locator("h1")).to_have_text("browser-q8.gguf")
    # a LoRA that fits the model, indexed, baked from the model page at strength 0.7
    from helpers_web import matched_lora

    lora = matched_lora(sample["sd_a"], sample["lora"].parent / "detail.safetensors", 1)
    reindex(page)
    page.goto(url + "/?q=alpha-mix.safetensors")
    page.click("text=alpha-mix.safetensors")
    page.click("text=Bake LoRAs…")
    value = page.locator("#lora_0 option", has_text="detail.safetensors").get_attribute("value")
    page.select_option("#lora_0", value)
    page.fill("#strength_0", "0.7")
    page.fill("#lbw_0", "OUTS")  # a LoRA Block Weight preset, as the CLI's :lbw=<its 17 values>
    page.fill("#output", "browser-baked.safetensors")
    shot(page, "lora")
    page.get_by_role("button", name="Start baking").click()
    expect(page.locator("#lora-result")).to_contain_text("queued")
    card = job_card(page, "browser-baked.safetensors")
    expect(card.locator(".state")).to_have_text("done", timeout=120_000)
    expect(card.locator(".pct")).to_have_text("100%")
    cli = site["base"] / "cli-baked" / "browser-baked.safetensors"
    cli.parent.mkdir()
    from sdtk.web.operations import LBW_PRESETS

    r = run_cli("lora", "apply", sample["sd_a"], f"{lora}:0.7:lbw={LBW_PRESETS['OUTS']}", "-o", cli)
    assert r.returncode == 0, r.stderr
    assert cli.read_bytes() == (sample["sd_a"].parent / "browser-baked.safetensors").read_bytes()
    page.goto(url + "/?q=browser-baked")
    expect(page.locator("table.files")).to_contain_text("browser-baked.safetensors")


def test_language_menu_changes_the_labels(site):
    page, url = site["page"], site["url"]
    page.goto(url + "/")
    try:
        page.get_by_role("button", name="日本語").click()
        expect(page.locator("html")).to_have_attribute("lang", "ja")
        expect(page.locator("main h1")).to_have_text("ライブラリ")
        expect(page.locator("#count")).to_have_text(re.compile(r"^[\d,]+ 件$"))
        expect(page.get_by_role("button", name="フォルダーを索引化")).to_be_visible()
        expect(page.locator("aside.queue .state").first).to_have_text(re.compile("完了|実行中|待機中|失敗|キャンセル済み"))
        shot(page, "library-ja")
        page.get_by_role("link", name="重複").click()  # the choice holds on every page
        expect(page.locator("main h1")).to_have_text("重複")
        page.get_by_role("button", name="Русский").click()
        expect(page.locator("main h1")).to_have_text("Дубликаты")
        page.goto(url + "/?q=alpha-mix.safetensors")
        expect(page.locator("#count")).to_have_text("1 файл")
    finally:
        page.get_by_role("button", name="English").click()
        expect(page.locator("html")).to_have_attribute("lang", "en")


def tab_to(page, test_js: str, limit: int = 80):
    """Press Tab until the focused element passes `test_js` (a function of the element)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(f"(({test_js}))(document.activeElement)"):
            return
    raise AssertionError(f"no focusable element matched {test_js} within {limit} Tab presses")


def test_keyboard_only_search_open_and_run_a_job(site):
    """The library, a model page and a job with the keyboard alone: the skip link first, the
    search field, a result link, an action button."""
    page, url = site["page"], site["url"]
    page.goto(url + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.url.endswith("#main")
    tab_to(page, "e => e.id === 'q'")
    page.keyboard.type("kl-f8")
    expect(page.locator("#count")).to_have_text("1 file")
    tab_to(page, "e => e.tagName === 'A' && e.textContent.trim() === 'kl-f8.safetensors'")
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("kl-f8.safetensors")
    tab_to(page, "e => e.tagName === 'BUTTON' && e.textContent.trim() === 'Safety scan'")
    page.keyboard.press("Enter")
    card = job_card(page, "scan kl-f8.safetensors")
    expect(card.locator(".state")).to_have_text("done", timeout=60_000)


def test_accessibility_no_serious_violations(site):
    from axe_playwright_python.sync_playwright import Axe

    page, url = site["page"], site["url"]
    ids = {}
    page.goto(url + "/")
    for name in ("v1-5-pruned.ckpt", "alpha-mix.safetensors", "inkwash.safetensors"):
        ids[name] = page.locator("table.files a", has_text=re.compile("^" + re.escape(name) + "$")).first.get_attribute("href")
    pages = ["/", ids["v1-5-pruned.ckpt"], ids["v1-5-pruned.ckpt"] + "?lang=ja", "/jobs", "/dupes",
             "/convert?file=" + ids["alpha-mix.safetensors"].rsplit("/", 1)[1],
             "/merge?a=" + ids["alpha-mix.safetensors"].rsplit("/", 1)[1],
             "/lora?base=" + ids["alpha-mix.safetensors"].rsplit("/", 1)[1], "/?lang=ru",
             "/lora/merge?lora=" + ids["inkwash.safetensors"].rsplit("/", 1)[1],
             "/lora/resize?file=" + ids["inkwash.safetensors"].rsplit("/", 1)[1]]
    axe = Axe()
    problems = []
    for path in pages:
        page.goto(url + path)
        page.wait_for_timeout(300)  # the event stream has filled the queue panel
        result = axe.run(page)
        for v in result.response["violations"]:
            if v["impact"] in ("serious", "critical"):
                problems.append((path, v["id"], v["help"], [n["target"] for n in v["nodes"]][:3]))
    assert not problems, problems
    page.goto(url + "/jobs")
    shot(page, "jobs")
