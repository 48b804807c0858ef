# capguard: the caption server and its demo checkpoint. Uses CUDA when the host gives it a GPU, CPU otherwise.
#
#   docker build -t capguard .
#   docker run --rm -p 127.0.0.1:8000:8000 capguard            # add --gpus all on a GPU host
#   docker run ... -v /path/to/checkpoints:/app/checkpoints/extra:ro capguard   # served as extra/NAME
#
# The base brings CUDA 12.6 and cuDNN 9, pinned by tag. The image carries the vLLM engine (CAPGUARD_ENGINE=auto
# takes it on a GPU): vllm==0.32.0 pins torch 2.13.0 / torchvision 0.28.0, so those replace the base's 2.14.1
# (PyPI's CUDA builds, with their nvidia libraries); capguard then installs against that torch.
# No secrets are baked in: pass CAPGUARD_ADMIN_TOKEN and friends at run time.
FROM pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# vLLM first, with the torch it was built against. VLLM_NO_USAGE_STATS / DO_NOT_TRACK: the engine does not
# phone home (capguard sets them too unless a user opts in).
RUN pip install --no-cache-dir "vllm==0.32.0" "torch==2.13.0" "torchvision==0.28.0"
ENV VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

# Install the project (decord and PyAV come with its dependencies). The constraint keeps vLLM's torch and
# torchvision: without it pip could swap in another wheel from PyPI.
COPY pyproject.toml README.md /tmp/capguard/
COPY models /tmp/capguard/models
COPY server /tmp/capguard/server
# capguard/ holds the package's __init__ and links to models/ and server/ (one import name: capguard)
COPY capguard /tmp/capguard/capguard
RUN pip list --format=freeze | grep -iE '^(torch|torchvision)==' > /tmp/base-torch.txt \
    && pip install --no-cache-dir --constraint /tmp/base-torch.txt /tmp/capguard \
    && rm -rf /tmp/capguard /tmp/base-torch.txt \
    && capguard --help > /dev/null

RUN groupadd --gid 10001 capguard \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin capguard \
    && mkdir -p /data /app/checkpoints/extra \
    && chown capguard:capguard /data

WORKDIR /app
# The shipped demo stacks (read-only for the server user).
COPY checkpoints/ /app/checkpoints/

# HF_HUB_OFFLINE: weights only ever come from checkpoint directories. CAPGUARD_CHECKPOINTS_ROOT: the
# installed package does not live next to checkpoints/, so say where they are. CAPGUARD_HOST: the bind
# address (CMD passes it to `capguard serve` explicitly too); on it, admin routes need CAPGUARD_ADMIN_TOKEN.
ENV HF_HUB_OFFLINE=1 \
    CAPGUARD_CHECKPOINTS_ROOT=/app/checkpoints \
    CAPGUARD_DATA_DIR=/data \
    CAPGUARD_HOST=0.0.0.0

# /data: caption log (refills the guard window after a restart) and uploads in flight.
# /app/checkpoints/extra: your own checkpoint directories.
VOLUME ["/data", "/app/checkpoints/extra"]

# numeric, so Kubernetes runAsNonRoot can check it (the `capguard` user above)
USER 10001:10001
EXPOSE 8000

# Liveness only (/readyz says when the model serves). Loading a large checkpoint takes a while, hence the
# start period. Python's urllib, so the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["capguard", "serve", "--host", "0.0.0.0"]
