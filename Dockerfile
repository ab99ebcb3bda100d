# Small non-root image running `smtp-gateway serve`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /var/lib/smtp-gateway --create-home gateway
COPY --from=build /install /usr/local
COPY config/example.toml /etc/smtp-gateway/example.toml
USER gateway
WORKDIR /var/lib/smtp-gateway
ENV GATEWAY_CONFIG=/etc/smtp-gateway/gateway.toml \
    GATEWAY_HTTP__ADDRESS=0.0.0.0 \
    GATEWAY_HTTP__PORT=8080 \
    GATEWAY_DELIVERY__SPOOL_PATH=/var/lib/smtp-gateway/spool.sqlite3 \
    GATEWAY_LOG__FORMAT=json
EXPOSE 587 465 8080
VOLUME ["/var/lib/smtp-gateway"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtp-gateway"]
CMD ["serve"]
