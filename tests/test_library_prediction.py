"""The library stores the prediction type with its confidence and the evidence that decided it
(issue 17): schema migration 3, `library show` / `--json`, rows described before it, and rows
imported from `sdtk batch` results. Files: scaled-down random-valued copies of the shared real layouts
(a scan hashes every byte; 4-6 MB each), beside an A1111 yaml where the case needs one."""
from __future__ import annotations

import json
import os

import pytest

from helpers_library import write_model
from conftest import run_cli
from sdtk.library import db as dbmod
from sdtk.library import open_library, record_json, scan_library, show_file
from sdtk.ops.sidecar import config_text


def rows(conn):
    return {os.path.basename(r["path"]): r for r in conn.execute("SELECT * FROM files")}


@pytest.fixture
def models(tmp_path):
    folder = tmp_path / "models" / "Stable-diffusion"
    write_model(folder / "noob-vpred.safetensors", "sdxl-vpred-ztsnr", scale=32)
    write_model(folder / "sd15.safetensors", "sd15-emaonly", scale=32)
    write_model(folder / "sd21-bare.safetensors", "sd21-768-v", scale=32)
    write_model(folder / "sd21-768.safetensors", "sd21-768-v", scale=32, seed=1)
    (folder / "sd21-768.yaml").write_text(config_text("v2-inference-v.yaml"))
    return folder


EXPECTED = {  # file -> (prediction, confidence, source, zero terminal SNR): what `sdtk inspect` says
    "noob-vpred.safetensors": ("v", "high", "marker", 1),
    "sd15.safetensors": ("epsilon", "medium", "family-default", 0),  # a guess, and stored as one
    "sd21-bare.safetensors": (None, "none", None, 0),  # SD2 without evidence: unknown, never 512/epsilon
    "sd21-768.safetensors": ("v", "high", "config", 0),  # the yaml beside it
}


def test_scan_stores_prediction_with_confidence_and_source(tmp_path, models):
    conn = open_library(tmp_path / "lib.db")
    scan_library(conn, [models], content=False)
    got = {name: (r["prediction"], r["prediction_confidence"], r["prediction_source"], r["zero_terminal_snr"])
           for name, r in rows(conn).items()}
    assert got == EXPECTED
    rec = record_json(rows(conn)["noob-vpred.safetensors"])
    assert {k: rec["prediction"][k] for k in ("type", "confidence", "source", "zero_terminal_snr")} == \
        {"type": "v", "confidence": "high", "source": "marker", "zero_terminal_snr": True}
    assert rec["prediction"]["evidence"][0]["source"] == "marker"  # every piece of evidence, strongest first
    sd15 = record_json(rows(conn)["sd15.safetensors"])["prediction"]
    assert (sd15["type"], sd15["confidence"]) == ("epsilon", "medium")
    # the library's answer is inspect's answer, object for object (`inspect --json` "prediction")
    names = sorted(EXPECTED)
    inspected = json.loads(run_cli("inspect", *(models / n for n in names), "--json").stdout)["files"]
    assert [os.path.basename(f["path"]) for f in inspected] == names
    for name, f in zip(names, inspected):
        assert record_json(rows(conn)[name])["prediction"] == f["prediction"], name


def test_library_show_prints_the_confidence(tmp_path, models):
    db = tmp_path / "lib.db"
    conn = open_library(db)
    scan_library(conn, [models], content=False)
    conn.close()
    r = run_cli("library", "show", models / "noob-vpred.safetensors", "--db", db)
    assert r.returncode == 0, r.stderr
    assert "prediction    v (high confidence, from marker), zero terminal SNR" in r.stdout
    r = run_cli("library", "show", models / "sd15.safetensors", "--db", db)
    assert "prediction    epsilon (medium confidence, from family-default)" in r.stdout
    r = run_cli("library", "show", models / "sd21-bare.safetensors", "--db", db, "--json")
    rec = json.loads(r.stdout)
    rec = rec[0] if isinstance(rec, list) else rec
    assert (rec["prediction"]["type"], rec["prediction"]["confidence"]) == (None, "none")


def test_migration_from_schema_2_keeps_the_type_then_a_scan_fills_the_confidence(tmp_path):
    """A library written by the sdtk before migration 3: the prediction type it kept in `info` is
    carried into the new column; confidence stays unrecorded (not invented) until the next scan
    re-describes the file from its header, without hashing it again."""
    from sdtk.hashing.filehash import hash_file

    models = tmp_path / "models"
    path = write_model(models / "noob-vpred.safetensors", "sdxl-vpred-ztsnr", scale=32)
    db = tmp_path / "old.db"
    conn = dbmod.connect(db, upto=2)
    st = os.stat(path)
    h = hash_file(path)
    info = {"identity": {"family": "sdxl", "prediction": "v"}, "from_metadata": {}, "sidecars": {}}
    conn.execute("INSERT INTO files (path, root, size, mtime_ns, inode, device, first_seen, last_seen, sha256, autov1, autov3,"
                 " crc32, blake3, format, architecture, kind, info, describe_version, sidecar_sig)"
                 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                 (str(path), str(models), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, 1.0, 1.0, h.sha256,
                  h.autov1_window[:8], h.autov3, "00000000", h.blake3, "safetensors", "stable-diffusion-xl-v1-base",
                  "checkpoint", json.dumps(info), 2, ""))
    conn.close()
    conn = open_library(db)
    assert dbmod.schema_version(conn) == dbmod.SCHEMA_VERSION == 3
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == [1, 2, 3]
    row = rows(conn)["noob-vpred.safetensors"]
    assert (row["prediction"], row["prediction_confidence"], row["prediction_source"]) == ("v", None, None)
    assert record_json(row)["prediction"]["confidence"] is None
    conn.close()
    r = run_cli("library", "show", path, "--db", db)
    assert "prediction    v (confidence not recorded: run `sdtk library scan` again)" in r.stdout, r.stdout
    conn = open_library(db)
    report = scan_library(conn, [path.parent], content=False)
    assert (report.unchanged, report.hashed, report.redescribed) == (1, 0, 1)  # from the header; the bytes are not read again
    row = rows(conn)["noob-vpred.safetensors"]
    assert (row["prediction"], row["prediction_confidence"], row["prediction_source"], row["zero_terminal_snr"]) == \
        ("v", "high", "marker", 1)
    assert row["first_seen"] == 1.0 and row["crc32"] == "00000000"  # the record was kept, not replaced


def test_batch_results_imported_carry_the_same_columns(tmp_path, models):
    """`library import` of `sdtk batch inspect` rows: the same `info` gives the same columns as a scan."""
    from sdtk.batch.importer import _record
    from sdtk.formats import open_model
    from sdtk.library.describe import PREDICTION_COLUMNS, describe_for_library

    path = models / "noob-vpred.safetensors"
    with open_model(path) as cat:
        desc = describe_for_library(cat)
    row = {"url": str(path), "size": path.stat().st_size, "command": "inspect", "verdict": "safe",
           "info": json.dumps(desc["info"], default=str)}
    rec = _record(row, 1.0)
    assert {c: rec[c] for c in PREDICTION_COLUMNS} == {c: desc[c] for c in PREDICTION_COLUMNS} == \
        {"prediction": "v", "prediction_confidence": "high", "prediction_source": "marker", "zero_terminal_snr": 1}
