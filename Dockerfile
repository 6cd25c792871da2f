# mammo-node image: the DICOM node (`serve`) and the scoring worker (`worker`) in one image.
#
# CPU build (default):
#   docker build -t mammo-node .
# CUDA build: point pip at a CUDA wheel index of PyTorch; the wheels bring their own CUDA
# runtime, the host needs an NVIDIA driver and the NVIDIA container toolkit (`--gpus all`):
#   docker build -t mammo-node:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
# (pick the CUDA variant PyTorch publishes for torch ${TORCH_VERSION}, e.g. cu124/cu126/cu128)
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAMMO_NODE_AET=MAMMO_NODE \
    MAMMO_HEALTHCHECK_AET=HEALTHCHECK

# dcmtk only for echoscu in the health check. Not version-pinned (DL3008): bookworm's
# security updates replace exact package versions, so a pin would break rebuilds; the
# Debian release in the base image tag is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends dcmtk \
    && rm -rf /var/lib/apt/lists/*

# torch first and alone, from the chosen wheel index, so the project install below never
# resolves another torch (plain PyPI would bring the CUDA build and its nvidia-* packages).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/mammo-node
COPY pyproject.toml README.md ./
COPY node/ node/
COPY pipelines/ pipelines/
RUN printf 'torch==%s\n' "${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install --no-cache-dir --constraint /tmp/constraints.txt . \
    && rm /tmp/constraints.txt
COPY models/ models/
COPY config/ config/

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/mammo-node \
        --shell /usr/sbin/nologin mammo \
    && mkdir -p /var/lib/mammo-node/spool /etc/mammo-node \
    && chown -R mammo:mammo /var/lib/mammo-node

# numeric, so runtimes that check for a non-root user (runAsNonRoot) can tell
USER 10001:10001
VOLUME ["/var/lib/mammo-node/spool"]
EXPOSE 11112

# C-ECHO ourselves; the config must allow ${MAMMO_HEALTHCHECK_AET} from 127.0.0.1.
# (The worker container has no listener: docker-compose.yml gives it its own check.)
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "echoscu -to 10 -aet \"$MAMMO_HEALTHCHECK_AET\" -aec \"$MAMMO_NODE_AET\" 127.0.0.1 11112 || exit 1"]

ENTRYPOINT ["mammo-node"]
CMD ["serve", "--config", "/etc/mammo-node/node.yaml"]
