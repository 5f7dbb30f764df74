# The stockflow workers and CLI, for docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock .
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY producers producers
COPY processors processors
COPY projections projections
COPY stockflow stockflow
RUN pip install --no-cache-dir --no-deps .
CMD ["stockflow", "--help"]
