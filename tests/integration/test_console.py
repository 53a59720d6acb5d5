"""The operator console over PostgreSQL and Redis: sign-in, sessions, CSRF, scopes, tenants,
and every page and action on real rows."""

from __future__ import annotations

import re
import uuid

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from conveyor.api.app import create_app
from conveyor.cli.wiring import build_platform
from conveyor.config import Settings
from conveyor.jobs import keys, schedules, store
from conveyor.jobs.db import make_session_factory
from conveyor.jobs.models import JobError, NewJob
from conveyor.jobs.states import JobState
from conveyor.tasks import registry
from conveyor.tasks.submission import build_new_job

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def make_key(engine: Engine, tenant: str = "acme", scopes: tuple[str, ...] = keys.SCOPES) -> str:
    with make_session_factory(engine).begin() as session:
        key, _ = keys.create_key(session, tenant=tenant, scopes=scopes)
    return key


def sign_in(client: TestClient, key: str) -> str:
    """Sign in through the form; the CSRF token of the session's pages."""
    form = client.get("/ui/login")
    assert form.status_code == 200
    token = TOKEN.search(form.text)
    assert token is not None
    answer = client.post(
        "/ui/login",
        data={"csrf_token": token.group(1), "key": key, "next": "/ui/jobs"},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/jobs"
    cookie = answer.headers["set-cookie"]
    assert "conveyor_session=" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Max-Age=" in cookie
    page = client.get("/ui/")
    assert page.status_code == 200
    found = TOKEN.search(page.text)
    assert found is not None
    return found.group(1)


def new_job(engine: Engine, tenant: str = "acme", task: str = "demo.echo") -> NewJob:
    return build_new_job(registry, tenant=tenant, task=task, payload={"hello": "console"})


def dead_job(engine: Engine, tenant: str = "acme") -> uuid.UUID:
    with make_session_factory(engine).begin() as session:
        job = store.create_job(session, new_job(engine, tenant))
        claimed = store.claim(session, job.id, worker="w1", lease_seconds=30)
        assert claimed is not None
        error = JobError("ValueError", "bad input", "Traceback: line 1", "fp-1")
        assert store.dead(session, job.id, worker="w1", token=claimed.lease_token, error=error)
    return job.id


def queued_job(engine: Engine, tenant: str = "acme") -> uuid.UUID:
    with make_session_factory(engine).begin() as session:
        return store.create_job(session, new_job(engine, tenant)).id


def state_of(engine: Engine, job_id: uuid.UUID) -> JobState | None:
    with make_session_factory(engine)() as session:
        job = store.get_job(session, job_id)
    return None if job is None else job.state


def test_every_page_sends_a_stranger_to_sign_in(client: TestClient) -> None:
    for path in ["/ui/", "/ui/jobs?state=dead", "/ui/dead-letters", "/ui/schedules"]:
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/ui/login?next=/ui/")
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"


def test_sign_in_refuses_a_wrong_key_and_a_form_without_its_token(
    client: TestClient, pg_engine: Engine
) -> None:
    form = client.get("/ui/login")
    token = TOKEN.search(form.text)
    assert token is not None
    wrong = client.post("/ui/login", data={"csrf_token": token.group(1), "key": "cvk_nope"})
    assert wrong.status_code == 401 and "unknown" in wrong.text
    fresh = TOKEN.search(wrong.text)
    assert fresh is not None
    key = make_key(pg_engine)
    forged = client.post("/ui/login", data={"key": key}, follow_redirects=False)
    assert forged.status_code == 403
    submit_only = make_key(pg_engine, scopes=("submit",))
    no_read = client.post("/ui/login", data={"csrf_token": fresh.group(1), "key": submit_only})
    assert no_read.status_code == 401


def test_a_tampered_cookie_ends_the_session(client: TestClient, pg_engine: Engine) -> None:
    key = make_key(pg_engine)
    sign_in(client, key)
    cookie = client.cookies.get("conveyor_session")
    assert cookie is not None
    body, mac = cookie.split(".")
    client.cookies.set("conveyor_session", body + "." + mac[:-2] + "AA", path="/ui")
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_an_admin_retries_a_dead_job_from_its_page_and_a_post_without_csrf_is_refused(
    client: TestClient, pg_engine: Engine
) -> None:
    csrf = sign_in(client, make_key(pg_engine))
    job_id = dead_job(pg_engine)
    page = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    assert str(job_id) in page.text and "dead" in page.text
    assert ">Retry</button>" in page.text and ">Cancel</button>" not in page.text
    assert "ValueError" in page.text and "Traceback: line 1" in page.text
    refused = client.post(f"/ui/jobs/{job_id}/retry", data={}, follow_redirects=False)
    assert refused.status_code == 403
    stale = client.post(f"/ui/jobs/{job_id}/retry", data={"csrf_token": "x" + csrf[1:]})
    assert stale.status_code == 403
    assert state_of(pg_engine, job_id) is JobState.DEAD
    done = client.post(
        f"/ui/jobs/{job_id}/retry", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert done.status_code == 303
    assert done.headers["location"] == f"/ui/jobs/{job_id}?done=retried"
    assert state_of(pg_engine, job_id) is JobState.QUEUED
    after = client.get(done.headers["location"])
    assert "The job is queued again." in after.text and ">Cancel</button>" in after.text
    # Retrying what is no longer dead is refused as the API refuses it, as a page.
    again = client.post(f"/ui/jobs/{job_id}/retry", data={"csrf_token": csrf})
    assert again.status_code == 409 and "only dead or cancelled" in again.text


def test_an_admin_cancels_a_queued_job(client: TestClient, pg_engine: Engine) -> None:
    csrf = sign_in(client, make_key(pg_engine))
    job_id = queued_job(pg_engine)
    answer = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": csrf})
    assert answer.status_code == 200 and "The job is cancelled." in answer.text
    assert state_of(pg_engine, job_id) is JobState.CANCELLED


def test_a_read_only_key_sees_no_buttons_and_cannot_act(
    client: TestClient, pg_engine: Engine
) -> None:
    csrf = sign_in(client, make_key(pg_engine, scopes=("read",)))
    dead = dead_job(pg_engine)
    queued = queued_job(pg_engine)
    for job_id in (dead, queued):
        page = client.get(f"/ui/jobs/{job_id}")
        assert page.status_code == 200 and str(job_id) in page.text
        assert ">Retry</button>" not in page.text and ">Cancel</button>" not in page.text
    letters = client.get("/ui/dead-letters")
    assert str(dead) in letters.text and ">Replay</button>" not in letters.text
    refused = client.post(f"/ui/jobs/{dead}/retry", data={"csrf_token": csrf})
    assert refused.status_code == 403 and "may read but not act" in refused.text
    assert state_of(pg_engine, dead) is JobState.DEAD


def test_another_tenants_job_and_workflow_are_not_found(
    client: TestClient, pg_engine: Engine
) -> None:
    csrf = sign_in(client, make_key(pg_engine, tenant="acme"))
    theirs = dead_job(pg_engine, tenant="globex")
    assert client.get(f"/ui/jobs/{theirs}").status_code == 404
    assert client.post(f"/ui/jobs/{theirs}/retry", data={"csrf_token": csrf}).status_code == 404
    assert str(theirs) not in client.get("/ui/dead-letters").text
    assert str(theirs) not in client.get("/ui/jobs").text
    assert client.get(f"/ui/workflows/{uuid.uuid4()}").status_code == 404


def test_jobs_are_filtered_searched_and_paged(client: TestClient, pg_engine: Engine) -> None:
    sign_in(client, make_key(pg_engine))
    ids = [queued_job(pg_engine) for _ in range(55)]
    dead = dead_job(pg_engine)
    first = client.get("/ui/jobs")
    assert first.status_code == 200
    newer = re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', first.text)
    assert len(newer) == 50 and newer[0] == str(dead)
    older = re.search(r'rel="next" href="([^"]+)"', first.text)
    assert older is not None
    second = client.get(older.group(1).replace("&amp;", "&"))
    rest = re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', second.text)
    assert len(rest) == 6 and not set(rest) & set(newer)
    assert set(rest) | set(newer) == {str(i) for i in ids} | {str(dead)}
    only_dead = client.get("/ui/jobs?state=dead")
    assert re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', only_dead.text) == [str(dead)]
    found = client.get(f"/ui/jobs?q={dead}", follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"] == f"/ui/jobs/{dead}"
    assert client.get("/ui/jobs?q=not-an-id").status_code == 422
    assert client.get("/ui/jobs?state=nonsense").status_code == 422
    assert client.get("/ui/jobs?cursor=garbage").status_code == 422


def test_dead_letters_are_grouped_replayed_and_discarded(
    client: TestClient, pg_engine: Engine
) -> None:
    csrf = sign_in(client, make_key(pg_engine))
    group = [dead_job(pg_engine) for _ in range(3)]
    page = client.get("/ui/dead-letters")
    assert "Replay all 3" in page.text
    replayed = client.post(
        "/ui/dead-letters/replay",
        data={
            "csrf_token": csrf,
            "task": "demo.echo",
            "error_type": "ValueError",
            "fingerprint": "fp-1",
        },
    )
    assert replayed.status_code == 200 and "Dead jobs queued again: 3." in replayed.text
    assert {state_of(pg_engine, i) for i in group} == {JobState.QUEUED}
    one, other = dead_job(pg_engine), dead_job(pg_engine)
    client.post("/ui/dead-letters/replay", data={"csrf_token": csrf, "id": str(one)})
    assert state_of(pg_engine, one) is JobState.QUEUED
    assert state_of(pg_engine, other) is JobState.DEAD
    gone = client.post(f"/ui/dead-letters/{other}/discard", data={"csrf_token": csrf})
    assert "The dead job is removed." in gone.text
    assert state_of(pg_engine, other) is None


def test_a_schedule_is_paused_enabled_and_run_now(client: TestClient, pg_engine: Engine) -> None:
    csrf = sign_in(client, make_key(pg_engine))
    with make_session_factory(pg_engine).begin() as session:
        schedules.create_schedule(
            session,
            tenant="acme",
            name="nightly",
            task="demo.echo",
            payload={"from": "schedule"},
            cron="0 3 * * *",
            interval_seconds=None,
            timezone="UTC",
            enabled=True,
            priority=None,
            misfire="run_once",
        )
    page = client.get("/ui/schedules")
    assert "nightly" in page.text and "enabled" in page.text
    assert page.text.count("03:00:00 UTC") == 3
    paused = client.post("/ui/schedules/nightly/pause", data={"csrf_token": csrf})
    assert "The schedule is paused." in paused.text
    with make_session_factory(pg_engine)() as session:
        found = schedules.get_schedule(session, "acme", "nightly")
        assert found is not None and not found.enabled
    client.post("/ui/schedules/nightly/enable", data={"csrf_token": csrf})
    ran = client.post("/ui/schedules/nightly/run", data={"csrf_token": csrf})
    assert "The schedule fired a run now." in ran.text
    with make_session_factory(pg_engine)() as session:
        found = schedules.get_schedule(session, "acme", "nightly")
        assert found is not None and found.enabled
        runs = schedules.recent_runs(session, found.id)
    assert len(runs) == 1 and runs[0][1].payload == {"from": "schedule"}
    assert client.post("/ui/schedules/missing/run", data={"csrf_token": csrf}).status_code == 404


def test_a_workflow_is_drawn_and_cancelled(client: TestClient, pg_engine: Engine) -> None:
    key = make_key(pg_engine)
    steps = {
        "steps": [
            {"key": "fetch", "task": "demo.echo"},
            {"key": "load", "task": "demo.echo", "after": ["fetch"]},
        ]
    }
    made = client.post("/v1/workflows", json=steps, headers={"Authorization": f"Bearer {key}"})
    assert made.status_code == 202
    workflow_id = made.json()["id"]
    csrf = sign_in(client, key)
    page = client.get(f"/ui/workflows/{workflow_id}")
    assert page.status_code == 200
    assert "<svg" in page.text and "marker-end" in page.text
    assert page.text.count('class="node state-') == 2
    assert workflow_id in client.get("/ui/workflows").text
    cancelled = client.post(f"/ui/workflows/{workflow_id}/cancel", data={"csrf_token": csrf})
    assert "The workflow is cancelled." in cancelled.text


def test_the_overview_shows_queues_and_the_last_hour(client: TestClient, pg_engine: Engine) -> None:
    sign_in(client, make_key(pg_engine))
    queued_job(pg_engine)
    dead_job(pg_engine)
    page = client.get("/ui/")
    assert page.status_code == 200
    for queue in ("high", "default", "low"):
        assert f">{queue}</a>" in page.text
    assert "demo.echo" in page.text and 'class="chart"' in page.text
    assert "failure rate 100.0 %" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"
    assert client.get("/ui/anomalies").status_code == 200
    assert client.get("/ui/static/console.css").status_code == 200


def test_signing_out_needs_the_token_and_ends_the_session(
    client: TestClient, pg_engine: Engine
) -> None:
    csrf = sign_in(client, make_key(pg_engine))
    assert client.post("/ui/logout", data={}).status_code == 403
    out = client.post("/ui/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_a_job_links_to_flower_when_flower_is_configured(
    pg_engine: Engine, pg_url: str, redis_url: str
) -> None:
    settings = Settings(
        database_url=pg_url,
        broker_url=redis_url,
        api_rate_per_second=0,
        flower_url="https://flower.example/",
    )
    platform = build_platform(settings)
    try:
        with TestClient(create_app(platform.api_state())) as flowered:
            sign_in(flowered, make_key(pg_engine))
            job_id = dead_job(pg_engine)
            page = flowered.get(f"/ui/jobs/{job_id}").text
    finally:
        platform.store.dispose()
    assert f'href="https://flower.example/api/tasks?search=args:{job_id}"' in page


def test_without_flower_there_is_no_link(client: TestClient, pg_engine: Engine) -> None:
    sign_in(client, make_key(pg_engine))
    assert "Flower" not in client.get(f"/ui/jobs/{dead_job(pg_engine)}").text
