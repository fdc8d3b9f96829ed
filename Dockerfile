# The image of a raftsync member: `raftsync node run`, configured by RAFTSYNC_* variables.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY raftsync ./raftsync
COPY cluster ./cluster
RUN pip install . && useradd --system --home-dir /var/lib/raftsync raftsync \
    && mkdir -p /var/lib/raftsync && chown raftsync /var/lib/raftsync

USER raftsync
ENV RAFTSYNC_DATA_DIR=/var/lib/raftsync
VOLUME ["/var/lib/raftsync"]
EXPOSE 7000
ENTRYPOINT []
CMD ["raftsync", "node", "run"]
