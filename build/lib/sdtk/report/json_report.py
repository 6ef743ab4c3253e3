"""The JSON output of `sdtk inspect --json` (schema "sdtk.inspect/1", docs/inspect.md):
{"schema", "files": [Identity.to_json() + "messages"], "unreadable": [...], "totals": {...}}."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from sdtk.identify.model import SCHEMA, Identity
from sdtk.report.fields import prepare
from sdtk.report.messages import text


def identity_json(ident: Identity, lang: str = "en") -> Dict[str, Any]:
    data = ident.to_json()
    for p in data["problems"]:
        p["message"] = text(p["message_key"], lang, **prepare(p["details"]))
    for a in data["advice"]:
        a["message"] = text(a["message_key"], lang, **prepare(a["details"]))
    if data.get("vae_comparison"):
        vc = data["vae_comparison"]
        vc["message"] = text(vc.get("message_key", ""), lang, **prepare(vc))
    return data


def totals(identities: Sequence[Identity], unreadable: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "files": len(identities) + len(unreadable),
        "identified": sum(1 for i in identities if i.identified),
        "unknown": sum(1 for i in identities if not i.identified),
        "with_problems": sum(1 for i in identities if i.has_problems),
        "unreadable": len(unreadable),
        "bytes": sum(i.file_size for i in identities) + sum(u.get("file_size", 0) for u in unreadable),
    }


def json_report(identities: Sequence[Identity], unreadable: Sequence[Dict[str, Any]] = (), lang: str = "en",
                exit_code: int = 0) -> Dict[str, Any]:
    files: List[Dict[str, Any]] = [identity_json(i, lang) for i in identities]
    return {"schema": SCHEMA, "language": lang, "exit_code": exit_code, "files": files, "unreadable": list(unreadable),
            "totals": totals(identities, unreadable)}
