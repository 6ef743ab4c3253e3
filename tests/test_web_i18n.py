"""The page labels in en/ja/zh/ru (sdtk/web/ui_text.py): every label the templates use is in the
table in all four languages with the same placeholders, the language is chosen on the page (the
menu sets a cookie; ?lang= and Accept-Language), and a page in each language shows its own words."""
import re
import string
from importlib import resources

import pytest

from helpers_webapp import HX, build, client_for, file_id
from sdtk.web import catalog, jobs, operations
from sdtk.web.ui_text import LANGS, UI, choose_language, plural_form, ui, ui_plural

TEMPLATES = resources.files("sdtk.web").joinpath("templates")


def template_keys():
    keys = set()
    for f in TEMPLATES.iterdir():
        text = f.read_text(encoding="utf-8")
        keys |= set(re.findall(r"\bt\('([a-z0-9_.-]+)'", text))
        keys |= {k + "." + form for k in re.findall(r"t\.plural\('([a-z0-9_.-]+)'", text) for form in ("one", "few", "many")}
    return {k for k in keys if not k.endswith(".")}  # ('state.' ~ job.state): the full keys are added below


def fields(text):
    return sorted(f for _, f, _, _ in string.Formatter().parse(text) if f)


def test_every_label_is_in_the_table_in_four_languages():
    used = template_keys()
    assert len(used) > 150
    # keys built in the templates or the code: sort orders, job states, severities, advice buttons, messages
    used |= {f"sort.{s}" for s in catalog.SORTS} | {f"state.{s}" for s in (jobs.QUEUED, jobs.RUNNING, *jobs.FINISHED)}
    used |= {f"severity.{s}" for s in ("error", "warning", "info")} | {a[2] for a in operations.ADVICE_ACTIONS.values()}
    used |= {"msg.queued", "msg.moved_trash", "msg.moved_quarantine", "msg.no_trash", "msg.moved_back", "msg.remote"}
    missing = sorted(used - set(UI))
    assert not missing, missing
    for key, row in UI.items():
        assert set(row) == set(LANGS) and all(row[lang].strip() for lang in LANGS), key
        assert len({tuple(fields(row[lang])) for lang in LANGS}) == 1, (key, row)  # same placeholders
        if key not in ("convert.dtype_unet", "convert.dtype_vae", "merge.vae", "lora.n", "remove.confirm"):
            assert row["ja"] != row["en"] and row["ru"] != row["en"], key  # translated, not copied


def test_plural_forms_and_language_choice():
    assert [plural_form(n, "ru") for n in (1, 2, 5, 11, 12, 21, 22, 25, 111, 112)] == \
        ["one", "few", "many", "many", "many", "one", "few", "many", "many", "many"]
    assert [ui_plural("files", n, "ru") for n in (1, 3, 30000)] == ["1 файл", "3 файла", "30,000 файлов"]
    assert [ui_plural("files", n, "en") for n in (1, 2)] == ["1 file", "2 files"]
    assert ui_plural("files", 10, "ja") == "10 件" and ui_plural("files", 1, "zh") == "1 个文件"
    assert choose_language("zh", "ja", "ru") == "zh"
    assert choose_language(None, "ja", "ru") == "ja"
    assert choose_language("xx", "yy", "de-DE,de;q=0.9,ru;q=0.8,ja;q=0.5") == "ru"
    assert choose_language(None, None, "de, fr;q=0.5") == "en" and choose_language(None, None, None) == "en"
    assert ui("no.such.key", "ja") == "no.such.key" and ui("nav.jobs", "xx") == "Jobs"


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    base = tmp_path_factory.mktemp("i18n")
    sample = build(base)
    with client_for(base, sample) as client:
        client.sample = sample
        yield client


# words each page must show in its language (and the English ones it must not)
LIBRARY_WORDS = {"en": ("Library", "Search", "10 files", "Trigger words", "with problems", "largest first"),
                 "ja": ("ライブラリ", "検索", "10 件", "トリガーワード", "問題あり", "大きい順"),
                 "zh": ("模型库", "搜索", "10 个文件", "触发词", "有问题", "从大到小"),
                 "ru": ("Библиотека", "Поиск", "10 файлов", "Триггерные слова", "с проблемами", "сначала большие")}


@pytest.mark.parametrize("lang", LANGS)
def test_language_menu_sets_the_page_language(lib, lang):
    r = lib.post("/lang", data={"lang": lang}, headers=HX)
    assert r.status_code == 200 and r.headers["hx-refresh"] == "true"
    cookie = r.headers["set-cookie"]
    assert f"sdtk_lang={lang}" in cookie and "samesite=strict" in cookie.lower() and "httponly" in cookie.lower()
    page = lib.get("/").text
    assert f'<html lang="{lang}">' in page
    for word in LIBRARY_WORDS[lang]:
        assert word in page, (lang, word)
    if lang != "en":
        for word in ("Search", "Trigger words", "with problems", "Index folders", "Duplicates"):
            assert word not in page, (lang, word)
    assert 'aria-pressed="true"' in page.split(f'value="{lang}"')[1][:80]
    lib.cookies.clear()


def test_other_pages_and_fragments_follow_the_language(lib):
    lib.cookies.set("sdtk_lang", "ru")
    demo = file_id(lib, lib.sample["demo_ckpt"])
    model = lib.get(f"/model/{demo}").text
    assert "Действия" in model and "Хеши" in model and "Конвертировать для генерации" in model
    assert "Stable Diffusion 1.x" in model and "Actions" not in model  # the report too (sdtk.report's Russian)
    zh = lib.get(f"/model/{demo}?lang=zh").text  # ?lang= overrides the cookie for that page
    assert '<html lang="zh">' in zh and "操作" in zh
    a = file_id(lib, lib.sample["sd_a"])
    for path, word in ((f"/convert?file={a}", "Формат вывода"), (f"/merge?a={a}", "Слияние"), (f"/lora?base={a}", "Вшить LoRA в модель"),
                       ("/jobs", "Задачи"), ("/dupes", "Журнал отмены"), ("/model/999999", "Извините")):
        assert word in lib.get(path).text, path
    queued = lib.post("/run/scan", data={"file": a}, headers=HX).text
    assert "в очереди" in queued and "задача #" in queued
    rows = lib.get("/library/rows?q=alpha").text
    assert "1 файл" in rows
    assert "Язык" in lib.get("/").text
    lib.cookies.clear()
    ja = lib.get("/", headers={"Accept-Language": "ja,en;q=0.5"}).text
    assert '<html lang="ja">' in ja and "ライブラリ" in ja
    assert "unknown language" in lib.post("/lang", data={"lang": "xx"}, headers=HX).text


def test_the_language_menu_is_guarded_like_every_post(lib):
    r = lib.post("/lang", data={"lang": "ja"}, headers={"Origin": "http://evil.example", "HX-Request": "true"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
