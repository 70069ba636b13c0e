# Tandem on NVIDIA GPUs: the image the Helm chart runs on the Ray head, the Ray workers and the router.
#
#   docker build -t tandem:0.1.0 .                     # CPU-only image: Dockerfile.cpu
#   docker run --gpus all -p 8000:8000 -p 8001:8001 tandem:0.1.0 serve
#
# torch comes with its CUDA libraries from PyPI; the base image adds the CUDA runtime for NIXL,
# and gcc and the Python headers that Triton needs to build its kernel launchers.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# bash and wget: KubeRay runs `ray start` with bash and probes Ray pods with wget.
# tini: PID 1 of the router pod (reaps Ray's daemons, forwards SIGTERM).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev bash wget tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tandem/src
COPY pyproject.toml constraints.txt README.md ./
COPY docker/profile.sh /etc/profile.d/tandem.sh
COPY proto ./proto
COPY engine ./engine
COPY kv_transfer ./kv_transfer
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
COPY elastic ./elastic
COPY router ./router
COPY planner ./planner
COPY deploy ./deploy
COPY benchmarks ./benchmarks

# The CUDA build of torch from PyPI, and the triton that comes with it (as scripts/setup.sh
# does on a GPU machine): the constraints pin everything else.
ENV PATH=/opt/tandem/venv/bin:$PATH
RUN python3 -m venv /opt/tandem/venv \
 && grep -v '^triton==' constraints.txt > /tmp/constraints.txt \
 && echo "torch==2.13.0" >> /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt "torch==2.13.0" \
 && pip install -c /tmp/constraints.txt ".[gpu]" \
 && pip check \
 && rm /tmp/constraints.txt

# The embedded default model, built here (about a minute) so that pods never build or fetch it.
ENV TANDEM_CACHE_DIR=/opt/tandem
# It is written through a private temporary directory: make it readable by the non-root user.
RUN tandem make-model --out /opt/tandem/models/tandem-tiny-stories-v1 \
 && chmod -R a+rX /opt/tandem/models

# The non-root user the chart runs as (podSecurityContext.runAsUser and runAsGroup).
RUN groupadd --gid 10001 tandem \
 && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash tandem
USER 10001
WORKDIR /home/tandem
EXPOSE 8000 8001
ENTRYPOINT ["tini", "--", "tandem"]
CMD ["serve"]
