"""The operator console in a real browser: headless Chromium against a real `conveyor api`
process, a real worker and PostgreSQL. Sign in, find a dead job, retry it and see it
succeed; cancel a running job; pause a schedule; a form without its CSRF token refused;
a read-only key sees no action buttons; every page at a phone's width. Screenshots of
each page are kept under var/test-artifacts/console (CONVEYOR_TEST_ARTIFACTS)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, insert

from conveyor.jobs import keys
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.tables import anomalies
from tests.acceptance.browser import ARTIFACTS, DESKTOP, PHONE, Browser, chromium
from tests.acceptance.cluster import Cluster, Receiver, cluster_context
from tests.support import free_port, wait_until

BROKER = "redis://127.0.0.1:6379/7"
PAGES = {
    "overview": "/ui/",
    "jobs": "/ui/jobs",
    "dead-letters": "/ui/dead-letters",
    "schedules": "/ui/schedules",
    "workflows": "/ui/workflows",
    "anomalies": "/ui/anomalies",
}


class Console:
    """A cluster with the API as its own process, and the URL the browser opens."""

    def __init__(self, cluster: Cluster, url: str) -> None:
        self.cluster = cluster
        self.url = url
        self.http = httpx.Client(base_url=url, headers=cluster.headers(), timeout=30)

    def submit(self, body: dict[str, object]) -> str:
        answer = self.http.post("/v1/jobs", json=body)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    def state(self, job_id: str) -> str:
        return str(self.http.get(f"/v1/jobs/{job_id}").json()["state"])

    def wait_state(self, job_id: str, state: str, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.state(job_id) == state, timeout=timeout, what=f"{job_id} to be {state}"
        )


@pytest.fixture
def console(pg_engine: Engine, pg_url: str, tmp_path: Path) -> Iterator[Console]:
    port = free_port()
    env_of = {"api": {"CONVEYOR_API_PORT": str(port), "CONVEYOR_API_RATE_PER_SECOND": "0"}}
    for cluster in cluster_context(pg_url, BROKER, pg_engine, tmp_path, ["default-1"], env_of):
        cluster.start("api", ["api"])
        url = f"http://127.0.0.1:{port}"

        def up(url: str = url) -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=60, what="the API process to answer")
        found = Console(cluster, url)
        yield found
        found.http.close()


@pytest.fixture
def browser(console: Console, request: pytest.FixtureRequest) -> Iterator[Browser]:
    with chromium(console.url, ARTIFACTS / "console" / request.node.name) as found:
        yield found


def read_only_key(engine: Engine) -> str:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant="acme", scopes=("read",))
    return key


def test_an_operator_finds_a_dead_job_retries_it_and_sees_it_succeed(
    console: Console, browser: Browser
) -> None:
    # The receiver refuses the first delivery (400: dead at once) and takes the next.
    with Receiver(hold=0.0, answers=[400]) as receiver:
        job_id = console.submit(
            {"task": "webhook.deliver", "payload": {"url": receiver.url, "body": {"n": 1}}}
        )
        console.wait_state(job_id, "dead")
        browser.open("/ui/dead-letters")
        assert "/ui/login" in browser.driver.current_url
        browser.shot("login")
        browser.sign_in(console.cluster.key)
        assert browser.driver.current_url.endswith("/ui/dead-letters")
        browser.shot("dead-letters")
        browser.find(f'a[href="/ui/jobs/{job_id}"]').click()
        browser.wait_text(job_id)
        assert browser.find("#job-state").get_attribute("textContent") == "dead"
        assert "Retry" in browser.find("#retry").text
        assert not browser.all("#cancel")
        browser.shot("job-dead")
        browser.find("#retry").click()
        browser.wait_text("The job is queued again.")
        # The page refreshes itself until the job has finished.
        browser.wait_for(
            lambda: browser.find("#job-state").get_attribute("textContent") == "succeeded",
            "the page to show the retried job succeeded",
        )
        assert console.state(job_id) == "succeeded"
        assert "Attempt 1 after retry 1" in browser.text() and "Queued again" in browser.text()
        browser.shot("job-retried")


def test_an_operator_cancels_a_running_job_from_its_page(
    console: Console, browser: Browser
) -> None:
    job_id = console.submit({"task": "demo.sleep", "payload": {"seconds": 120}})
    console.wait_state(job_id, "running")
    browser.sign_in(console.cluster.key)
    browser.open(f"/ui/jobs/{job_id}")
    browser.wait_for(
        lambda: browser.find("#job-state").get_attribute("textContent") == "running",
        "the job page to show it running",
    )
    browser.wait_text("slept")  # its progress
    browser.shot("job-running")
    browser.find("#cancel").click()
    browser.wait_text("The job is cancelled.")
    console.wait_state(job_id, "cancelled")
    browser.wait_for(
        lambda: browser.find("#job-state").get_attribute("textContent") == "cancelled",
        "the job page to show it cancelled",
    )
    assert not browser.all("#cancel")


def test_an_operator_pauses_a_schedule(console: Console, browser: Browser) -> None:
    made = console.http.post(
        "/v1/schedules",
        json={"name": "nightly-report", "task": "demo.echo", "cron": "0 3 * * *"},
    )
    assert made.status_code == 201, made.text
    browser.sign_in(console.cluster.key)
    browser.open("/ui/schedules")
    row = "#schedule-nightly-report .schedule-status"
    assert browser.find(row).text == "enabled"
    browser.shot("schedules")
    browser.find("#pause-nightly-report").click()
    browser.wait_text("The schedule is paused.")
    assert browser.find(row).text == "paused"
    assert console.http.get("/v1/schedules/nightly-report").json()["enabled"] is False
    assert browser.all("#enable-nightly-report")


def test_a_form_without_its_csrf_token_is_refused(console: Console, browser: Browser) -> None:
    with Receiver(hold=0.0, answers=[400]) as receiver:
        job_id = console.submit(
            {"task": "webhook.deliver", "payload": {"url": receiver.url, "body": {}}}
        )
        console.wait_state(job_id, "dead")
    browser.sign_in(console.cluster.key)
    browser.open(f"/ui/jobs/{job_id}")
    # The form as a forged page would post it: the session cookie, no token.
    browser.driver.execute_script(
        "document.querySelector('#retry').form.querySelector('[name=csrf_token]').remove()"
    )
    browser.find("#retry").click()
    browser.wait_text("CSRF")
    assert "403" in browser.driver.title
    assert console.state(job_id) == "dead"
    # A cross-site fetch with the cookie but without the token fares no better.
    status = browser.driver.execute_async_script(
        "const done = arguments[0];"
        f"fetch('/ui/jobs/{job_id}/retry', {{method: 'POST', body: 'x=1',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'}})"
        ".then(r => done(r.status));"
    )
    assert status == 403
    assert console.state(job_id) == "dead"


def test_a_read_only_key_sees_no_action_buttons(
    console: Console, browser: Browser, pg_engine: Engine
) -> None:
    with Receiver(hold=0.0, answers=[400]) as receiver:
        dead = console.submit(
            {"task": "webhook.deliver", "payload": {"url": receiver.url, "body": {}}}
        )
        console.wait_state(dead, "dead")
    running = console.submit({"task": "demo.sleep", "payload": {"seconds": 60}})
    console.wait_state(running, "running")
    made = console.http.post(
        "/v1/schedules", json={"name": "hourly", "task": "demo.echo", "cron": "0 * * * *"}
    )
    assert made.status_code == 201
    browser.sign_in(read_only_key(pg_engine))
    assert "read-only" in browser.text()
    for job_id in (dead, running):
        browser.open(f"/ui/jobs/{job_id}")
        browser.wait_text(job_id)
        assert not browser.all("#retry") and not browser.all("#cancel")
        assert not browser.all(".actions button")
    browser.open("/ui/dead-letters")
    assert dead in browser.text() and not browser.all("td button")
    browser.open("/ui/schedules")
    assert "hourly" in browser.text() and not browser.all("td button")
    browser.shot("read-only-schedules")
    console.http.post(f"/v1/jobs/{running}/cancel")


def test_every_page_shows_real_data_on_a_desktop_and_a_phone(
    console: Console, browser: Browser
) -> None:
    with Receiver(hold=0.0, answers=[400]) as receiver:
        dead = console.submit(
            {
                "task": "webhook.deliver",
                "payload": {"url": receiver.url, "body": {}},
                "tags": ["billing"],
            }
        )
        echoes = [console.submit({"task": "demo.echo", "payload": {"n": n}}) for n in range(5)]
        console.wait_state(dead, "dead")
    for job_id in echoes:
        console.wait_state(job_id, "succeeded")
    flow = console.http.post(
        "/v1/workflows",
        json={
            "name": "etl",
            "steps": [
                {"key": "fetch", "task": "demo.echo"},
                {"key": "clean", "task": "demo.echo", "after": ["fetch"]},
                {"key": "enrich", "task": "demo.echo", "after": ["fetch"]},
                {"key": "load", "task": "demo.collect", "after": ["clean", "enrich"]},
            ],
        },
    )
    assert flow.status_code == 202
    workflow_id = flow.json()["id"]
    made = console.http.post(
        "/v1/schedules", json={"name": "cleanup", "task": "demo.echo", "interval_seconds": 3600}
    )
    assert made.status_code == 201
    # An open episode, as the aggregation records one when a task type leaves its baseline.
    now = dt.datetime.now(dt.UTC)
    with console.cluster.engine.begin() as conn:
        conn.execute(
            insert(anomalies),
            {
                "id": uuid.uuid4(),
                "tenant": "acme",
                "task": "webhook.deliver",
                "signal": "failure_rate",
                "started_at": now - dt.timedelta(minutes=3),
                "last_seen_at": now,
                "ended_at": None,
                "value": 1.0,
                "baseline": 0.02,
                "score": 14.2,
            },
        )
    browser.sign_in(console.cluster.key)
    pages = {
        **PAGES,
        "job": f"/ui/jobs/{echoes[0]}",
        "job-dead": f"/ui/jobs/{dead}",
        "workflow": f"/ui/workflows/{workflow_id}",
    }
    browser.open(f"/ui/workflows/{workflow_id}")
    browser.wait_for(lambda: "succeeded" in browser.find(".summary").text, "the workflow to end")
    expected = {
        "overview": "demo.echo",
        "jobs": echoes[-1][:12],
        "dead-letters": dead,
        "schedules": "cleanup",
        "workflows": "etl",
        "anomalies": "failure_rate",
        "job": '"n": 0',
        "job-dead": "receiver answered 400",
        "workflow": "enrich",
    }
    for size, label in ((DESKTOP, "desktop"), (PHONE, "phone")):
        for name, path in pages.items():
            browser.resize(size)
            browser.open(path)
            browser.wait_text(expected[name])
            assert not browser.overflows(), f"{path} is wider than a {label} screen"
            browser.shot(f"{name}-{label}")
    browser.open(f"/ui/workflows/{workflow_id}")
    assert len(browser.all("svg.graph a.node")) == 4
    browser.sign_out()
    browser.open("/ui/")
    assert "/ui/login" in browser.driver.current_url
