FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# See .dockerignore: no .venv, tessera-data, .git, caches or tests.
COPY . .

# Editable on purpose: the server finds migrations/ next to the package folders in /app.
RUN pip install --no-cache-dir -e .

# Unprivileged user; the embedded PostgreSQL also refuses to run as root.
RUN useradd --system --create-home --home-dir /home/tessera --shell /usr/sbin/nologin tessera \
    && mkdir -p /data \
    && chown tessera:tessera /data

USER tessera

ENV TESSERA_HOST=0.0.0.0 \
    TESSERA_DATA_DIR=/data

EXPOSE 8080

CMD ["tessera-server", "serve"]
