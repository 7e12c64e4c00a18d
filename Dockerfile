# runsvc's image: `make image` (docker build -t runsvc:VERSION .).
# Build stage: the wheels, with the same recipe as `make dist` (scripts/dist.sh).
# Final stage: those wheels in a virtualenv on a slim Python, installed by the same script
# the install test runs (scripts/install-wheels.sh); no compiler, no source tree.

FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir setuptools==84.2.1 build==1.6.1
COPY . .
RUN PYTHON=python sh scripts/dist.sh /dist

FROM python:3.11-slim
COPY --from=build /dist /dist
COPY scripts/install-wheels.sh /tmp/install-wheels.sh
RUN PYTHON=python sh /tmp/install-wheels.sh /opt/runsvc /dist \
    && rm -rf /dist /tmp/install-wheels.sh \
    && useradd --system --uid 10001 --home-dir /var/lib/runsvc --create-home runsvc
ENV PATH=/opt/runsvc/bin:$PATH \
    RUNSVC_DATA_DIR=/var/lib/runsvc \
    RUNSVC_GRPC_ADDRESS=0.0.0.0:50051 \
    RUNSVC_HEALTH_ADDRESS=0.0.0.0:8086 \
    RUNSVC_METRICS_ADDRESS=0.0.0.0:9464
USER 10001
WORKDIR /var/lib/runsvc
EXPOSE 50051 8086 9464
# SIGTERM: health goes NOT_SERVING, calls in flight finish, then the process exits.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["runsvc", "health", "--address", "127.0.0.1:8086"]
ENTRYPOINT ["runsvc"]
CMD ["serve"]
