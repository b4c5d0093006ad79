"""``moelab routers`` lists every registered router with its description and paper."""

import json

from moelab.cli.main import main
from moelab.layers.routers import ROUTERS


def test_routers_command_lists_every_router(capsys):
    assert main(["routers"]) == 0
    out = capsys.readouterr().out
    for e in ROUTERS.entries():
        assert e.name in out and e.description in out
    assert f"{len(ROUTERS)} routers" in out


def test_routers_command_json(capsys):
    assert main(["routers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ROUTERS.names()
    by_name = {r["name"]: r for r in rows}
    assert "2403.07652" in by_name["top_p"]["paper"] and "p" in by_name["top_p"]["kwargs"]
    assert all(r["paper"] for r in rows)
