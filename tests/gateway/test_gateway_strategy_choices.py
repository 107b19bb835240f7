"""The dashboard names no strategy: the new-session page lists the contract's strategies from the
gateway's rules, and every page hands those rules to its script as a JSON data block."""

from __future__ import annotations

import json
import re
from typing import get_args

import jinja2

from swarmtrain.common.events import Strategy
from swarmtrain.common.strategies import RULES, as_json
from swarmtrain.gateway.dashboard.pages import HERE, PAGES, PREFIX


def _render(page: str) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    context = {"page": page, "title": "t", "prefix": PREFIX, "pages": PAGES, "strategy_rules": as_json()}
    return env.get_template(f"{page}.html").render(**context)


def test_every_strategy_has_a_description_for_the_dashboard() -> None:
    assert all(RULES.get(s).description.strip() for s in get_args(Strategy))


def test_the_new_session_page_offers_each_strategy_of_the_contract_with_its_description() -> None:
    html = _render("new")
    offered = re.findall(r'<input type="radio" name="strategy" value="([a-z]+)"( checked)?> \1: ([^<]+)</label>', html)
    assert [name for name, _, _ in offered] == list(get_args(Strategy))
    assert [checked for _, checked, _ in offered].count(" checked") == 1 and offered[0][1] == " checked"
    assert [text for _, _, text in offered] == [RULES.get(s).description for s in get_args(Strategy)]


def test_every_page_hands_the_strategy_rules_to_its_script() -> None:
    for page in ("new", "session", "sessions"):
        blob = re.search(r'<script type="application/json" id="strategy-rules">(.*?)</script>', _render(page))
        assert blob is not None, page
        rules = json.loads(blob.group(1))
        assert set(rules) == set(get_args(Strategy))
        assert all({"rounds", "shared_model", "sharded", "description"} <= set(r) for r in rules.values())
