# Small non-root image running `smtp-gateway serve`. Its configuration is /etc/smtp-gateway/gateway.toml
# (config/docker.toml); mount yours over it. No GATEWAY_* setting is baked in: what the mounted file says wins.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /var/lib/smtp-gateway --create-home gateway
COPY --from=build /install /usr/local
COPY config/docker.toml /etc/smtp-gateway/gateway.toml
COPY gateway/examples/example.toml /etc/smtp-gateway/example.toml
USER gateway
WORKDIR /var/lib/smtp-gateway
ENV GATEWAY_CONFIG=/etc/smtp-gateway/gateway.toml
EXPOSE 587 465 8080
VOLUME ["/var/lib/smtp-gateway"]
# Asks the operator endpoint at [http] port 8080 of config/docker.toml: a mounted config keeps that port.
# Plain HTTP: with http.tls_cert_file the endpoint speaks HTTPS only; docs/install.md has the HEALTHCHECK for it.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
# SIGTERM drains (serve --drain-timeout, 30 s, then running upstream calls get delivery.shutdown_timeout):
# give `docker stop` more than its default 10 s (docker stop --time 90; compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtp-gateway"]
CMD ["serve"]
