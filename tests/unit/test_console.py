"""The console's pieces without a network: the gate (sessions, one-time action tickets), the SVG
charts (escaping, gaps), and the templates' autoescaping."""

from __future__ import annotations

import time

import pytest

from edge_runtime.fleet.console import auth
from edge_runtime.fleet.console.auth import Gate
from edge_runtime.fleet.console.charts import bar_chart, line_chart
from edge_runtime.fleet.console.pages import environment

pytestmark = pytest.mark.unit

TOKEN = "a-console-token-of-some-length"


def test_short_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Gate("short", loopback=True)


def test_reading_is_free_on_loopback_only() -> None:
    assert Gate(TOKEN, loopback=True).can_read(None)
    off = Gate(TOKEN, loopback=False)
    assert not off.can_read(None)
    sid = off.login(TOKEN)
    assert sid is not None and off.can_read(off.session(sid))


def test_login_needs_the_token_and_counts_refusals() -> None:
    g = Gate(TOKEN, loopback=True)
    assert g.login("not-the-token-at-all") is None
    assert g.refused == {"bad_token": 1}
    sid = g.login(f"  {TOKEN}\n")  # a token file's newline is not part of it
    assert sid and g.session(sid) is not None
    g.logout(sid)
    assert g.session(sid) is None


def test_a_ticket_works_once_for_its_action_and_rollout() -> None:
    g = Gate(TOKEN, loopback=True)
    s = g.session(g.login(TOKEN))
    assert s is not None
    t = g.issue(s, "abort", 3)
    assert g.redeem(s, t, "abort", 3) is None
    status, why = g.redeem(s, t, "abort", 3) or (0, "")
    assert status == 409 and "replay" in why
    t2 = g.issue(s, "abort", 3)
    assert (g.redeem(s, t2, "abort", 4) or (0,))[0] == 403  # another rollout: spent, refused
    assert (g.redeem(s, t2, "abort", 3) or (0,))[0] == 409  # and it cannot be tried again
    t3 = g.issue(s, "promote", 3)
    assert (g.redeem(s, t3, "abort", 3) or (0,))[0] == 403
    assert (g.redeem(s, "made-up", "abort", 3) or (0,))[0] == 403
    assert (g.redeem(None, g.issue(s, "abort", 3), "abort", 3) or (0,))[0] == 403
    assert g.refused == {"replayed": 2, "bad_ticket": 3, "no_session": 1}


def test_a_ticket_of_another_session_or_expired_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Gate(TOKEN, loopback=True)
    a, b = g.session(g.login(TOKEN)), g.session(g.login(TOKEN))
    assert a is not None and b is not None
    t = g.issue(a, "abort", 1)
    assert (g.redeem(b, t, "abort", 1) or (0,))[0] == 403
    t = g.issue(a, "abort", 1)
    monkeypatch.setattr(auth, "TICKET_S", -1.0)
    late = g.issue(a, "abort", 1)
    status, why = g.redeem(a, late, "abort", 1) or (0, "")
    assert status == 403 and "expired" in why
    assert g.redeem(a, t, "abort", 1) is None  # the earlier one is still good


def test_charts_escape_labels_and_break_lines_at_gaps() -> None:
    now = time.time()
    svg = str(line_chart({"<script>x</script>": [(now - 9, 1.0), (now - 8, None), (now - 7, 2.0), (now - 6, 3.0)]},
                         "t<i>", now=now))  # fmt: skip
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "t&lt;i&gt;" in svg
    assert svg.count("<circle") == 1 and svg.count("<polyline") == 1  # the lone point, then a line
    assert "no data yet" in str(line_chart({}, "empty"))
    bars = str(bar_chart({"<b>cls</b>": {"1.0.0": 40.0, "<v>": 60.0}}, "top-1"))
    assert "<b>" not in bars and "<v>" not in bars and bars.count("<rect") >= 2


def test_templates_escape_what_devices_say() -> None:
    env = environment()
    html = env.get_template("decisions.html").render(decisions=[{"ts": time.time(), "message": "<img src=x>"}])
    assert "<img" not in html and "&lt;img src=x&gt;" in html
