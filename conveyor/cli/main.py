"""The `conveyor` command: parse arguments, then call into the rooms."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

# Only light modules here: Celery, SQLAlchemy and the API load once there is work to do,
# so `--help` and a bad argument answer quickly.
from conveyor.cli.errors import CommandError, fail, settings_or_exit
from conveyor.config import POOLS, Settings
from conveyor.jobs.states import WORKFLOW_STATES, JobState

if TYPE_CHECKING:
    from sqlalchemy.exc import SQLAlchemyError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("conveyor").strip()
        fail(f"{where + ': ' if where else ''}{message} (see --help)")


def _scopes(text: str) -> list[str]:
    from conveyor.jobs.keys import SCOPES

    scopes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise argparse.ArgumentTypeError(
            f"scopes must be a comma-separated subset of {','.join(SCOPES)}"
        )
    return scopes


def _queues(text: str) -> list[str]:
    queues = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in queues if q not in POOLS]
    if unknown or not queues:
        raise argparse.ArgumentTypeError(
            f"queues must be a comma-separated subset of {','.join(POOLS)}"
        )
    return queues


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def database_problem(error: SQLAlchemyError) -> str:
    """One line for a database failure, with a hint when the schema is missing."""
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    line = lines[0] if lines else type(cause).__name__
    if "no such table" in line or (line.startswith('relation "') and "does not exist" in line):
        return f"database error: {line} (run `conveyor migrate` first)"
    return f"database error: {line}"


def build_parser() -> Parser:
    """Every subcommand and its arguments."""
    parser = Parser(prog="conveyor", description="Conveyor: background jobs on Celery.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("up", help="the whole platform on this machine")
    commands.add_parser("api", help="the HTTP API")
    worker = commands.add_parser("worker", help="a worker for one pool or given queues")
    which = worker.add_mutually_exclusive_group()
    which.add_argument("--pool", choices=POOLS, help="the pool to serve (default: default)")
    which.add_argument("--queues", type=_queues, help="comma-separated queues to consume")
    worker.add_argument("--concurrency", type=_positive, help="processes (default from settings)")
    commands.add_parser("beat", help="the scheduler")
    commands.add_parser("flower", help="Flower, with basic auth from settings")
    commands.add_parser("migrate", help="apply database migrations")

    keys = commands.add_parser("keys", help="API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument(
        "--scopes", type=_scopes, help="comma-separated scopes (default: every scope)"
    )
    key_list = keys_commands.add_parser("list", help="list keys (never the keys themselves)")
    key_list.add_argument("--tenant", help="only this tenant's keys")
    revoke = keys_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id")

    submit = commands.add_parser("submit", help="submit a job")
    submit.add_argument("task")
    given = submit.add_mutually_exclusive_group()
    given.add_argument("--payload", default="{}", help="the payload as JSON")
    given.add_argument(
        "--file", help="submit one job per line of this file (JSON payloads; - for stdin)"
    )
    submit.add_argument("--priority", choices=POOLS)
    submit.add_argument("--tenant", default="default")
    submit.add_argument("--wait", action="store_true", help="wait until it finishes")
    submit.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits")

    jobs = commands.add_parser("jobs", help="inspect and act on jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for action, text in (
        ("show", "print a job"),
        ("cancel", "cancel a job"),
        ("retry", "queue a dead or cancelled job again"),
    ):
        sub = jobs_commands.add_parser(action, help=text)
        sub.add_argument("id")
    listing = jobs_commands.add_parser("list", help="list jobs, newest first")
    listing.add_argument("--state", choices=[s.value for s in JobState])
    listing.add_argument("--limit", type=_positive, default=50)

    flows = commands.add_parser("workflows", help="workflows: graphs of steps")
    flow_commands = flows.add_subparsers(dest="workflows_command", required=True, metavar="ACTION")
    flow_submit = flow_commands.add_parser("submit", help="submit a workflow from a JSON file")
    flow_submit.add_argument("file", help="POST /v1/workflows' body: {name?, steps, tags?}")
    flow_submit.add_argument("--tenant", default="default")
    flow_submit.add_argument("--wait", action="store_true", help="wait until it finishes")
    flow_submit.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits")
    flow_show = flow_commands.add_parser("show", help="print a workflow as a tree of steps")
    flow_show.add_argument("id")
    flow_list = flow_commands.add_parser("list", help="list a tenant's workflows")
    flow_list.add_argument("--tenant", default="default")
    flow_list.add_argument("--state", choices=WORKFLOW_STATES)
    flow_list.add_argument("--limit", type=_positive, default=50)
    flow_cancel = flow_commands.add_parser("cancel", help="cancel a workflow's unfinished steps")
    flow_cancel.add_argument("id")

    sched = commands.add_parser("schedules", help="users' cron and interval schedules")
    sched_commands = sched.add_subparsers(dest="schedules_command", required=True, metavar="ACTION")
    sched_list = sched_commands.add_parser("list", help="list a tenant's schedules")
    sched_list.add_argument("--tenant", default="default")
    add = sched_commands.add_parser("add", help="add a schedule")
    add.add_argument("name")
    add.add_argument("task")
    timing = add.add_mutually_exclusive_group(required=True)
    timing.add_argument("--cron", help="five-field cron expression")
    timing.add_argument("--every", type=float, metavar="SECONDS", help="interval in seconds")
    add.add_argument("--payload", default="{}", help="the payload as JSON")
    add.add_argument("--timezone", default="UTC")
    add.add_argument("--priority", choices=POOLS)
    add.add_argument("--misfire", choices=("run_once", "skip"), default="run_once")
    add.add_argument("--tenant", default="default")
    for action, text in (
        ("pause", "stop firing"),
        ("resume", "fire again"),
        ("remove", "delete the schedule"),
    ):
        sub = sched_commands.add_parser(action, help=text)
        sub.add_argument("name")
        sub.add_argument("--tenant", default="default")

    dlq = commands.add_parser("dlq", help="the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="list dead jobs")
    dlq_list.add_argument("--limit", type=_positive, default=50)
    replay = dlq_commands.add_parser("replay", help="queue dead jobs again")
    replay.add_argument("--ids", nargs="*", default=[], help="job ids (default: all dead jobs)")
    replay.add_argument("--task", help="only dead jobs of this task type")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `conveyor` command."""
    args = build_parser().parse_args(argv)
    settings = settings_or_exit()
    if args.command == "worker":
        # Before prometheus_client is imported: its prefork children count into files.
        from conveyor.observability import multiproc

        multiproc.enable()
    if not settings.otlp_endpoint:
        # Before anything imports redis-py, which would load the SDK for nothing.
        from conveyor.observability import sdk_guard

        sdk_guard.import_redis_without_sdk()
    from conveyor.cli.wiring import setup_logging
    from conveyor.lazy import is_sqlalchemy_error

    setup_logging(settings, service=f"conveyor-{args.command}")

    try:
        if args.command in SERVICES:
            run_service(settings, args)
        else:
            run_command(settings, args)
    except CommandError as error:
        fail(str(error), code=1)
    except Exception as error:
        # SQLAlchemy is loaded only by what uses the store (a worker may never need it).
        if not is_sqlalchemy_error(error):
            raise
        fail(database_problem(error), code=1)
    except KeyboardInterrupt:
        sys.exit(130)


SERVICES = ("up", "api", "worker", "beat", "flower", "migrate")


def run_service(settings: Settings, args: argparse.Namespace) -> None:
    """Run a long-running service, loading only what that service uses.

    A worker and its pool children fork from this process, so whatever it imports they
    all hold: the API stack is loaded by `api` and `up` alone.
    """
    from conveyor.cli import services

    match args.command:
        case "up":
            from conveyor.cli import up

            up.up(settings)
        case "api":
            services.api(settings)
        case "worker":
            queues = args.queues or [args.pool or "default"]
            services.worker(settings, queues, args.concurrency)
        case "beat":
            services.beat(settings)
        case "flower":
            services.flower(settings)
        case "migrate":
            services.migrate(settings)


def run_command(settings: Settings, args: argparse.Namespace) -> None:
    """Run a one-shot command over the job store."""
    from conveyor.cli import commands
    from conveyor.jobs.keys import SCOPES

    match args.command:
        case "keys":
            match args.keys_command:
                case "create":
                    commands.keys_create(settings, args.tenant, args.scopes or list(SCOPES))
                case "list":
                    commands.keys_list(settings, args.tenant)
                case "revoke":
                    commands.keys_revoke(settings, args.id)
        case "submit" if args.file:
            commands.submit_file(
                settings,
                task=args.task,
                path=args.file,
                priority=args.priority,
                tenant=args.tenant,
            )
        case "submit":
            sys.exit(
                commands.submit(
                    settings,
                    task=args.task,
                    payload_text=args.payload,
                    priority=args.priority,
                    tenant=args.tenant,
                    wait=args.wait,
                    wait_timeout=args.timeout,
                )
            )
        case "jobs":
            match args.jobs_command:
                case "show":
                    commands.jobs_show(settings, args.id)
                case "list":
                    commands.jobs_list(settings, args.state, args.limit)
                case "cancel":
                    commands.jobs_cancel(settings, args.id)
                case "retry":
                    commands.jobs_retry(settings, args.id)
        case "workflows":
            from conveyor.cli import workflows

            match args.workflows_command:
                case "submit":
                    sys.exit(
                        workflows.submit(settings, args.file, args.tenant, args.wait, args.timeout)
                    )
                case "show":
                    workflows.show(settings, args.id)
                case "list":
                    workflows.listing(settings, args.tenant, args.state, args.limit)
                case "cancel":
                    workflows.cancel(settings, args.id)
        case "schedules":
            commands.schedules_command(settings, args)
        case "dlq":
            if args.dlq_command == "list":
                commands.dlq_list(settings, args.limit)
            else:
                commands.dlq_replay(settings, args.ids, args.task)
