# Conveyor image: every part of the platform is `conveyor <subcommand>`.
#
#   docker build -t conveyor .
#   docker run --rm -p 8000:8000 conveyor            # `conveyor up`: embedded, SQLite, one process
#   docker run --rm conveyor worker --pool high       # any subcommand; settings via CONVEYOR_*
#
# No settings with secrets are baked in: URLs and Flower credentials come from the
# environment at run time (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH="/app/.venv/bin:${PATH}"

RUN pip install --no-cache-dir "uv==0.13.9" \
    && useradd --system --create-home --uid 10001 --user-group conveyor

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the project itself (README.md is part of its metadata).
COPY README.md ./
COPY conveyor ./conveyor
RUN uv sync --frozen --no-dev --no-editable \
    && mkdir -p /app/var \
    && chown conveyor:conveyor /app/var

USER conveyor

# Inside a container, listening on loopback only would make the API unreachable.
ENV CONVEYOR_API_HOST=0.0.0.0
EXPOSE 8000 5555

ENTRYPOINT ["conveyor"]
CMD ["up"]
